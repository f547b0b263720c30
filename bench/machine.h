/* machine.h: what the machine can do, measured in the same run as the benchmarks
 * (bench/machine.c, shared by `make bench` and `make bench-full`). */
#ifndef ZIMAGE_BENCH_MACHINE_H
#define ZIMAGE_BENCH_MACHINE_H

typedef struct {
    double peak;        /* fp32 FMA FLOP per wall second, all threads */
    double peak_cpu;    /* the same per CPU second (less disturbed on a shared machine) */
    double bandwidth;   /* bytes per second read from memory, all threads */
} bench_machine;

/* Measures all three with zi_nthreads() threads (about a second). */
void bench_measure(bench_machine *m);
/* Process CPU seconds (all threads). */
double bench_cpu_now(void);

#endif
