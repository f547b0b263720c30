/* machine.c: the machine's fp32 FMA peak, bf16 dot-product peak and memory read bandwidth
 * (machine.h). */
#include "machine.h"
#include "../tensor.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Process CPU seconds (all threads). The machine may be shared: rates per CPU-second are less
 * disturbed by other processes than wall-clock rates, so both are printed. */
double bench_cpu_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* A vector of the widest float SIMD the compiler targets; a*b+c becomes one FMA
 * (-ffp-contract=fast). */
#if defined(__AVX512F__)
#define VLEN 16
#elif defined(__AVX__)
#define VLEN 8
#else
#define VLEN 4
#endif
typedef float vf __attribute__((vector_size(VLEN * 4)));
enum { CHAINS = 12 };           /* independent accumulators: enough to cover the FMA latency */
#if defined(__x86_64__) || defined(__i386__)
#define VREG(v) "+x"(v)         /* "a vector register" in the asm constraint syntax */
#else
#define VREG(v) "+w"(v)
#endif

static double peak_sink;

/* The peaks are rates of all threads together: every thread repeats a block of `iters`
 * iterations until `stop`, and the blocks of all are counted. (A fixed amount of work per
 * thread would be timed by the slowest thread: on a VM whose vCPUs run at unequal speeds, as
 * when another guest uses a sibling hyperthread, that came out at T x the slowest, 1544
 * against the 2231 GFLOP/s of the 16 vCPUs' own rates added up; the kernels hand their tasks
 * out dynamically and get the sum.) */
typedef struct {
    int64_t iters;
    double stop;
    atomic_llong blocks;
} peak_job;

/* 12 named accumulators (an array would be kept in memory); the empty asm stops the compiler
 * from collapsing the chains. */
static void fma_loop(void *ctx, int64_t begin, int64_t end) {
    peak_job *j = ctx;
    for (int64_t t = begin; t < end; t++) {
        vf m, a;
        for (int i = 0; i < VLEN; i++) m[i] = 0.999999f, a[i] = 1e-7f;
        vf c0 = m, c1 = m, c2 = m, c3 = m, c4 = m, c5 = m, c6 = m, c7 = m, c8 = m, c9 = m, c10 = m, c11 = m;
        long long n = 0;
        do {
            for (int64_t k = 0; k < j->iters; k++) {
                c0 = c0 * m + a; c1 = c1 * m + a; c2 = c2 * m + a; c3 = c3 * m + a;
                c4 = c4 * m + a; c5 = c5 * m + a; c6 = c6 * m + a; c7 = c7 * m + a;
                c8 = c8 * m + a; c9 = c9 * m + a; c10 = c10 * m + a; c11 = c11 * m + a;
                __asm__ volatile("" : VREG(c0), VREG(c1), VREG(c2), VREG(c3), VREG(c4), VREG(c5),
                                      VREG(c6), VREG(c7), VREG(c8), VREG(c9), VREG(c10), VREG(c11));
            }
            n++;
        } while (zi_now() < j->stop);
        vf s = c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + c8 + c9 + c10 + c11;
        peak_sink += s[0];
        atomic_fetch_add(&j->blocks, n);
    }
}

/* FLOP/s of fn on all threads for 0.1 s (flop_per_iter per iteration): the best of three runs */
static void measure_rate(zi_range_fn fn, int64_t iters, double flop_per_iter, double *peak, double *peak_cpu) {
    int T = zi_nthreads();
    for (int rep = 0; rep < 3; rep++) {
        peak_job j = { iters, 0, 0 };
        double t0 = zi_now(), c0 = bench_cpu_now();
        j.stop = t0 + 0.1;
        zi_parallel_for(T, 1, fn, &j);
        double flop = flop_per_iter * iters * (double)atomic_load(&j.blocks);
        double f = flop / (zi_now() - t0), fc = flop / (bench_cpu_now() - c0);
        *peak = f > *peak ? f : *peak;
        *peak_cpu = fc > *peak_cpu ? fc : *peak_cpu;
    }
}

/* The bf16 dot-product peak, measured like the FMA peak: independent chains of vdpbf16ps
 * (64 FLOP each: 16 lanes x 2 products), or of AMX tile products where the fast path uses AMX
 * (16 x 16 x 32 x 2 FLOP each). */
#if defined(__AVX512BF16__)
#include <immintrin.h>
static void dp_loop(void *ctx, int64_t begin, int64_t end) {
    peak_job *j = ctx;
    for (int64_t t = begin; t < end; t++) {
        __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
        __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
               c8 = c0, c9 = c0, c10 = c0, c11 = c0;
        long long n = 0;
        do {
            for (int64_t k = 0; k < j->iters; k++) {
#define DP(c) c = _mm512_dpbf16_ps(c, a, b);
                DP(c0) DP(c1) DP(c2) DP(c3) DP(c4) DP(c5) DP(c6) DP(c7) DP(c8) DP(c9) DP(c10) DP(c11)
#undef DP
                __asm__ volatile("" : VREG(c0), VREG(c1), VREG(c2), VREG(c3), VREG(c4), VREG(c5),
                                      VREG(c6), VREG(c7), VREG(c8), VREG(c9), VREG(c10), VREG(c11));
            }
            n++;
        } while (zi_now() < j->stop);
        peak_sink += _mm512_reduce_add_ps(c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + c8 + c9 + c10 + c11);
        atomic_fetch_add(&j->blocks, n);
    }
}
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
static void amx_loop(void *ctx, int64_t begin, int64_t end) {
    peak_job *j = ctx;
    struct { uint8_t palette, start_row, zero[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg = { .palette = 1 };
    for (int i = 0; i < 8; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
    /* bf16 values in (-1, 1), not zeros: a tile product's power, and so the clock it runs at,
     * depends on the data */
    uint16_t vals[16 * 32];
    uint32_t seed = 12345;
    for (int i = 0; i < 16 * 32; i++) {
        seed = seed * 1103515245u + 12345u;
        vals[i] = zi_f32_to_bf16((float)((seed >> 8) & 0xffff) / 32768.0f - 1.0f);
    }
    for (int64_t t = begin; t < end; t++) {
        _tile_loadconfig(&cfg);
        _tile_loadd(4, vals, 64); _tile_loadd(5, vals, 64); _tile_loadd(6, vals, 64); _tile_loadd(7, vals, 64);
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        long long n = 0;
        do {
            for (int64_t k = 0; k < j->iters; k++) {
                _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
            }
            n++;
        } while (zi_now() < j->stop);
        _tile_release();
        atomic_fetch_add(&j->blocks, n);
    }
}
#endif

static void measure_bf16_peak(double *bpeak, double *bpeak_cpu) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (!strcmp(zi_fast_kernel(), "amx")) {
        measure_rate(amx_loop, 20000, 4 * 16 * 16 * 32 * 2.0, bpeak, bpeak_cpu);
        return;
    }
#endif
#if defined(__AVX512BF16__)
    measure_rate(dp_loop, 100000, 64.0 * CHAINS, bpeak, bpeak_cpu);
#endif
    (void)bpeak, (void)bpeak_cpu;
}

typedef struct { const float *x; int64_t n; double sum[256]; } bw_job;

static void bw_range(void *ctx, int64_t begin, int64_t end) {
    bw_job *b = ctx;
    for (int64_t t = begin; t < end; t++) {
        vf s = {0};
        const vf *v = (const vf *)(b->x + t * b->n);
        for (int64_t i = 0; i < b->n / VLEN; i++) s += v[i];
        b->sum[t % 256] += s[0];
    }
}

/* bytes/s of reading a 256 MB buffer with all threads */
static double measure_bandwidth(void) {
    int64_t n = 64 << 20, chunks = 64;
    float *x = aligned_alloc(64, (size_t)n * 4);
    memset(x, 0, (size_t)n * 4);
    bw_job b = { x, n / chunks, {0} };
    double best = 0;
    for (int rep = 0; rep < 4; rep++) {
        double t0 = zi_now();
        zi_parallel_for(chunks, 1, bw_range, &b);
        double r = (double)n * 4 / (zi_now() - t0);
        best = r > best ? r : best;
    }
    free(x);
    return best;
}

void bench_measure(bench_machine *m) {
    m->peak = m->peak_cpu = 0;
    measure_rate(fma_loop, 100000, 2.0 * VLEN * CHAINS, &m->peak, &m->peak_cpu);
    m->bandwidth = measure_bandwidth();
    m->bpeak = m->bpeak_cpu = 0;
    measure_bf16_peak(&m->bpeak, &m->bpeak_cpu);
}
