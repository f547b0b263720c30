/* bench.c: kernel benchmarks (`make bench`, BENCH=substring runs the matching cases).
 * First measures the machine: fp32 FMA peak over all threads and memory read bandwidth; then
 * times the GEMM (bf16 weights, the shapes of the model's Linear layers) and attention,
 * printing each rate as a percentage of the measured peak. Rates are also given per CPU-second
 * (process CPU time), which on a machine shared with other jobs is the steadier figure. */
#include "../tensor.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Process CPU seconds (all threads). The machine may be shared: rates per CPU-second are less
 * disturbed by other processes than wall-clock rates, so both are printed. */
static double cpu_now(void) {
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

/* 12 named accumulators (an array would be kept in memory); the empty asm stops the compiler
 * from collapsing the chains. */
static void fma_loop(void *ctx, int64_t begin, int64_t end) {
    int64_t iters = *(const int64_t *)ctx;
    for (int64_t t = begin; t < end; t++) {
        vf m, a;
        for (int i = 0; i < VLEN; i++) m[i] = 0.999999f, a[i] = 1e-7f;
        vf c0 = m, c1 = m, c2 = m, c3 = m, c4 = m, c5 = m, c6 = m, c7 = m, c8 = m, c9 = m, c10 = m, c11 = m;
        for (int64_t k = 0; k < iters; k++) {
            c0 = c0 * m + a; c1 = c1 * m + a; c2 = c2 * m + a; c3 = c3 * m + a;
            c4 = c4 * m + a; c5 = c5 * m + a; c6 = c6 * m + a; c7 = c7 * m + a;
            c8 = c8 * m + a; c9 = c9 * m + a; c10 = c10 * m + a; c11 = c11 * m + a;
            __asm__ volatile("" : VREG(c0), VREG(c1), VREG(c2), VREG(c3), VREG(c4), VREG(c5),
                                  VREG(c6), VREG(c7), VREG(c8), VREG(c9), VREG(c10), VREG(c11));
        }
        vf s = c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + c8 + c9 + c10 + c11;
        peak_sink += s[0];
    }
}

static double peak, peak_cpu;   /* FLOP per wall second (all threads), per CPU second */
static double bpeak, bpeak_cpu; /* the same for bf16 dot products (0: the CPU has none) */

/* FLOP/s of independent FMA chains, one per thread */
static void measure_peak(void) {
    int T = zi_nthreads();
    int64_t iters = 20000000;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = zi_now(), c0 = cpu_now();
        zi_parallel_for(T, 1, fma_loop, &iters);
        double flop = 2.0 * VLEN * CHAINS * iters * T, f = flop / (zi_now() - t0), fc = flop / (cpu_now() - c0);
        peak = f > peak ? f : peak;
        peak_cpu = fc > peak_cpu ? fc : peak_cpu;
    }
}

/* The bf16 dot-product peak, measured like the FMA peak: independent chains of vdpbf16ps
 * (64 FLOP each: 16 lanes x 2 products), or of AMX tile products where the fast path uses AMX
 * (16 x 16 x 32 x 2 FLOP each). */
#if defined(__AVX512BF16__)
#include <immintrin.h>
static void dp_loop(void *ctx, int64_t begin, int64_t end) {
    int64_t iters = *(const int64_t *)ctx;
    for (int64_t t = begin; t < end; t++) {
        __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
        __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0,
               c8 = c0, c9 = c0, c10 = c0, c11 = c0;
        for (int64_t k = 0; k < iters; k++) {
#define DP(c) c = _mm512_dpbf16_ps(c, a, b);
            DP(c0) DP(c1) DP(c2) DP(c3) DP(c4) DP(c5) DP(c6) DP(c7) DP(c8) DP(c9) DP(c10) DP(c11)
#undef DP
            __asm__ volatile("" : VREG(c0), VREG(c1), VREG(c2), VREG(c3), VREG(c4), VREG(c5),
                                  VREG(c6), VREG(c7), VREG(c8), VREG(c9), VREG(c10), VREG(c11));
        }
        peak_sink += _mm512_reduce_add_ps(c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + c8 + c9 + c10 + c11);
    }
}
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
static void amx_loop(void *ctx, int64_t begin, int64_t end) {
    int64_t iters = *(const int64_t *)ctx;
    struct { uint8_t palette, start_row, zero[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg = { .palette = 1 };
    for (int i = 0; i < 8; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
    static const uint16_t ones[16 * 32] = {0};
    for (int64_t t = begin; t < end; t++) {
        _tile_loadconfig(&cfg);
        _tile_loadd(4, ones, 64); _tile_loadd(5, ones, 64); _tile_loadd(6, ones, 64); _tile_loadd(7, ones, 64);
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t k = 0; k < iters; k++) {
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        }
        _tile_release();
    }
}
#endif

static void measure_bf16_peak(void) {
    int T = zi_nthreads();
    zi_range_fn fn = NULL;
    double flop_per_iter = 0;
    int64_t iters = 0;
#if defined(__AVX512BF16__)
    fn = dp_loop, flop_per_iter = 64.0 * CHAINS, iters = 20000000;
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (!strcmp(zi_fast_kernel(), "amx")) fn = amx_loop, flop_per_iter = 4 * 16 * 16 * 32 * 2.0, iters = 2000000;
#endif
    for (int rep = 0; fn && rep < 3; rep++) {
        double t0 = zi_now(), c0 = cpu_now();
        zi_parallel_for(T, 1, fn, &iters);
        double flop = flop_per_iter * iters * T, f = flop / (zi_now() - t0), fc = flop / (cpu_now() - c0);
        bpeak = f > bpeak ? f : bpeak;
        bpeak_cpu = fc > bpeak_cpu ? fc : bpeak_cpu;
    }
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

/* wall time, GFLOP/s and % of the peak pk (pk_cpu per CPU second); then the same per CPU second */
static void report_of(const char *name, double flop, double wall, double cpu, double pk, double pk_cpu) {
    printf("%-34s %8.1f ms %7.1f GFLOP/s %5.1f%% of peak | per CPU-s %7.1f GFLOP/s %5.1f%%\n", name, wall * 1e3,
           flop / wall * 1e-9, 100 * flop / wall / pk, flop / cpu * 1e-9, 100 * flop / cpu / pk_cpu);
    fflush(stdout);
}

static void report(const char *name, double flop, double wall, double cpu) {
    report_of(name, flop, wall, cpu, peak, peak_cpu);
}

static int selected(const char *filter, const char *name) { return !filter || strstr(name, filter); }

/* y[M, N] = x[M, K] · Wᵀ with W [N, K] in bf16, like a Linear layer */
/* fast = 1: the same with zi_set_fast(1) (bf16 activations too), as a percentage of the bf16
 * peak (of the fp32 peak where the CPU has no bf16 dot products), and its error against the
 * exact path: max |fast - exact| / max |exact| over the output. */
static void bench_linear(const char *filter, int M, int K, int N, int fast) {
    char name[64];
    snprintf(name, sizeof name, "gemm %s %dx%dx%d", fast ? "fast" : "bf16", M, N, K);
    if (!selected(filter, name)) return;
    float *x = malloc((size_t)M * K * 4), *y = malloc((size_t)M * N * 4);
    uint16_t *w = malloc((size_t)N * K * 2);
    for (size_t i = 0; i < (size_t)M * K; i++) x[i] = (float)((i * 7919) % 1000) * 1e-3f - 0.5f;
    for (size_t i = 0; i < (size_t)N * K; i++) w[i] = zi_f32_to_bf16((float)((i * 104729) % 1000) * 1e-3f - 0.5f);
    zi_mat W = { w, ZI_BF16, N, K };
    float *exact = NULL;
    if (fast) {
        exact = malloc((size_t)M * N * 4);
        zi_linear(exact, x, M, &W, NULL);
    }
    zi_set_fast(fast);
    zi_linear(y, x, M < 64 ? M : 64, &W, NULL);   /* warm-up: page the weight in, pack buffers */
    double best = 1e30, best_cpu = 1e30;
    int reps = (double)M * N * K < 2e10 ? 3 : 1;
    for (int r = 0; r < reps; r++) {
        double t0 = zi_now(), c0 = cpu_now();
        zi_linear(y, x, M, &W, NULL);
        double t = zi_now() - t0, c = cpu_now() - c0;
        best = t < best ? t : best;
        best_cpu = c < best_cpu ? c : best_cpu;
    }
    zi_set_fast(0);
    if (!fast) {
        report(name, 2.0 * M * N * K, best, best_cpu);
        free(x); free(y); free(w);
        return;
    }
    report_of(name, 2.0 * M * N * K, best, best_cpu, bpeak ? bpeak : peak, bpeak ? bpeak_cpu : peak_cpu);
    double d = 0, m = 0;
    for (size_t i = 0; i < (size_t)M * N; i++) {
        d = fmax(d, fabs((double)y[i] - exact[i]));
        m = fmax(m, fabs((double)exact[i]));
    }
    printf("%-34s error vs exact: max %.2e of max |exact| %.3g (%.1e relative)\n", "", d, m, d / m);
    free(x); free(y); free(w); free(exact);
}

/* self-attention of S tokens, H heads of D, as in the DiT */
static void bench_attention(const char *filter, int S, int H, int D) {
    char name[64];
    snprintf(name, sizeof name, "attention %d heads x %d, S=%d", H, D, S);
    if (!selected(filter, name)) return;
    size_t n = (size_t)S * H * D;
    float *q = malloc(n * 4), *k = malloc(n * 4), *v = malloc(n * 4), *o = malloc(n * 4);
    for (size_t i = 0; i < n; i++) q[i] = (float)((i * 7919) % 1000) * 2e-3f - 1, k[i] = q[(i * 31) % n], v[i] = q[(i * 17) % n];
    double best = 1e30, best_cpu = 1e30;
    for (int r = 0; r < (S > 2048 ? 1 : 2); r++) {
        double t0 = zi_now(), c0 = cpu_now();
        zi_attention(o, H * D, q, H * D, k, H * D, v, H * D, S, S, H, H, D, 1 / 11.3f, 0, S, NULL);
        double t = zi_now() - t0, c = cpu_now() - c0;
        best = t < best ? t : best;
        best_cpu = c < best_cpu ? c : best_cpu;
    }
    report(name, 4.0 * S * S * H * D, best, best_cpu);
    free(q); free(k); free(v); free(o);
}

/* a 3x3 convolution (pad 1) of C -> C channels at H x W, as in the VAE decoder */
static void bench_conv(const char *filter, int C, int H, int W) {
    char name[64];
    snprintf(name, sizeof name, "conv3x3 %d->%d at %dx%d", C, C, H, W);
    if (!selected(filter, name)) return;
    size_t nx = (size_t)C * H * W, nw = (size_t)C * C * 9;
    float *x = malloc(nx * 4), *y = malloc(nx * 4), *w = malloc(nw * 4);
    for (size_t i = 0; i < nx; i++) x[i] = (float)((i * 7919) % 1000) * 2e-3f - 1;
    for (size_t i = 0; i < nw; i++) w[i] = (float)((i * 104729) % 1000) * 1e-4f - 0.05f;
    zi_mat wm = { w, ZI_F32, C, (int64_t)C * 9 };
    double best = 1e30, best_cpu = 1e30;
    for (int r = 0; r < 2; r++) {
        double t0 = zi_now(), c0 = cpu_now();
        zi_conv2d(y, x, C, H, W, &wm, NULL, 3, 3, 1, 1, 1, 1, 1);
        double t = zi_now() - t0, c = cpu_now() - c0;
        best = t < best ? t : best;
        best_cpu = c < best_cpu ? c : best_cpu;
    }
    report(name, 2.0 * C * C * 9 * H * W, best, best_cpu);
    free(x); free(y); free(w);
}

int main(int argc, char **argv) {
    const char *filter = argc > 1 && argv[1][0] ? argv[1] : NULL;
    zi_threads_init(0);
    measure_peak();
    printf("threads %d, fp32 FMA peak %.1f GFLOP/s (per CPU-s %.1f), memory read %.1f GB/s\n", zi_nthreads(),
           peak * 1e-9, peak_cpu * 1e-9, measure_bandwidth() * 1e-9);
    measure_bf16_peak();
    if (bpeak) printf("bf16 peak (%s) %.1f GFLOP/s (per CPU-s %.1f): the reference of the 'gemm fast' lines\n",
                      zi_fast_kernel(), bpeak * 1e-9, bpeak_cpu * 1e-9);
    else printf("no bf16 dot products: 'gemm fast' (kernel %s) is given as %% of the fp32 peak\n", zi_fast_kernel());
    fflush(stdout);
    bench_linear(filter, 1024, 3840, 3840, 0);
    static const int Ms[3] = { 288, 1056, 4128 }, KN[3][2] = { {3840, 3840}, {3840, 10240}, {10240, 3840} };
    for (int f = 0; f < 2; f++)
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++) bench_linear(filter, Ms[i], KN[j][0], KN[j][1], f);
    for (int i = 0; i < 3; i++) bench_attention(filter, Ms[i], 30, 128);
    bench_conv(filter, 128, 256, 256);
    bench_conv(filter, 512, 64, 64);
    return 0;
}
