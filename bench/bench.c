/* bench.c: kernel benchmarks (`make bench`, BENCH=substring runs the matching cases).
 * First measures the machine: fp32 FMA peak over all threads and memory read bandwidth; then
 * times the GEMM (bf16 weights, the shapes of the DiT's and the text encoder's Linear layers;
 * f32 LoRA adapter products),
 * attention and their thread scaling, printing each rate as a percentage of the measured peak,
 * the thread pool's cost per parallel call,
 * the VAE's convolutions, and last the tokenizer (goals: loading tokenizer.json < 0.5 s, 1 MB of mixed text < 1 s). Rates are also
 * given per CPU-second (process CPU time), which on a machine shared with other jobs is the
 * steadier figure. */
#include "../zimage.h"
#include "../test/mixed_text.h"
#include "machine.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static bench_machine mach;    /* peaks, for the percentages */

/* wall time, GFLOP/s and % of the peak pk (pk_cpu per CPU second); then the same per CPU second */
static void report_of(const char *name, double flop, double wall, double cpu, double pk, double pk_cpu) {
    printf("%-34s %8.1f ms %7.1f GFLOP/s %5.1f%% of peak | per CPU-s %7.1f GFLOP/s %5.1f%%\n", name, wall * 1e3,
           flop / wall * 1e-9, 100 * flop / wall / pk, flop / cpu * 1e-9, 100 * flop / cpu / pk_cpu);
    fflush(stdout);
}

static void report(const char *name, double flop, double wall, double cpu) {
    report_of(name, flop, wall, cpu, mach.peak, mach.peak_cpu);
}

static int selected(const char *filter, const char *name) { return !filter || strstr(name, filter); }

/* y[M, N] = x[M, K] · Wᵀ with W [N, K] in bf16 (a Linear layer) or f32 (a LoRA adapter's
 * matrix); fixed input values */
typedef struct { int M, K, N; float *x, *y; zi_mat W; } linear_case;

static linear_case linear_new(int M, int K, int N, zi_dtype wt) {
    linear_case c = { M, K, N, malloc((size_t)M * K * 4), malloc((size_t)M * N * 4), { NULL, wt, N, K } };
    float *w = malloc((size_t)N * K * 4);
    for (size_t i = 0; i < (size_t)M * K; i++) c.x[i] = (float)((i * 7919) % 1000) * 1e-3f - 0.5f;
    for (size_t i = 0; i < (size_t)N * K; i++) w[i] = (float)((i * 104729) % 1000) * 1e-3f - 0.5f;
    c.W.data = w;
    if (wt != ZI_F32) {
        c.W.data = malloc((size_t)N * K * zi_dtype_size(wt));
        zi_from_f32((void *)c.W.data, w, wt, (size_t)N * K);
        free(w);
    }
    return c;
}

static void linear_free(linear_case *c) { free(c->x); free(c->y); free((void *)c->W.data); }

/* The best of a few runs (after a warm-up that pages the weight in and sizes the pack
 * buffers): wall seconds; its CPU seconds in *cpu. */
static double linear_time(const linear_case *c, double *cpu) {
    zi_linear(c->y, c->x, c->M < 64 ? c->M : 64, &c->W, NULL);
    double best = 1e30;
    *cpu = 1e30;
    for (int r = 0; r < ((double)c->M * c->N * c->K < 2e10 ? 3 : 1); r++) {
        double t0 = zi_now(), c0 = bench_cpu_now();
        zi_linear(c->y, c->x, c->M, &c->W, NULL);
        double t = zi_now() - t0, u = bench_cpu_now() - c0;
        best = t < best ? t : best;
        *cpu = u < *cpu ? u : *cpu;
    }
    return best;
}

/* The text encoder's Linear layers (a few rows) read their weight once per forward, from
 * memory, and are timed that way: one pass of calls through copies of W that together exceed
 * any cache (COLD_BYTES, the first copy written longest ago), averaged per call. Timed like
 * linear_time, the smaller ones (5-21 MB) would be read from the last-level cache. */
enum { COLD_BYTES = 512 << 20 };

static double linear_time_cold(const linear_case *c, double *cpu) {
    size_t wb = (size_t)c->N * c->K * zi_dtype_size(c->W.dtype);
    int n = (int)((COLD_BYTES + wb - 1) / wb);
    void **w = malloc(n * sizeof *w);
    for (int i = 0; i < n; i++) w[i] = memcpy(malloc(wb), c->W.data, wb);
    zi_mat W = c->W;
    zi_linear(c->y, c->x, c->M, &W, NULL);        /* sizes the pack buffers */
    double t0 = zi_now(), c0 = bench_cpu_now();
    for (int i = 0; i < n; i++) {
        W.data = w[i];
        zi_linear(c->y, c->x, c->M, &W, NULL);
    }
    double t = (zi_now() - t0) / n;
    *cpu = (bench_cpu_now() - c0) / n;
    for (int i = 0; i < n; i++) free(w[i]);
    free(w);
    return t;
}

/* fast = 1: the same with zi_set_fast(1) (bf16 activations too), as a percentage of the bf16
 * peak (of the fp32 peak where the CPU has no bf16 dot products), and its error against the
 * exact path: max |fast - exact| / max |exact| over the output. */
static void bench_linear(const char *filter, int M, int K, int N, int fast) {
    char name[64];
    snprintf(name, sizeof name, "gemm %s %dx%dx%d", fast ? "fast" : "bf16", M, N, K);
    if (!selected(filter, name)) return;
    linear_case c = linear_new(M, K, N, ZI_BF16);
    float *exact = NULL;
    if (fast) {
        exact = malloc((size_t)M * N * 4);
        zi_linear(exact, c.x, M, &c.W, NULL);
    }
    zi_set_fast(fast);
    double cpu, best = M <= 64 ? linear_time_cold(&c, &cpu) : linear_time(&c, &cpu);
    zi_set_fast(0);
    if (!fast) report(name, 2.0 * M * N * K, best, cpu);
    else report_of(name, 2.0 * M * N * K, best, cpu, mach.bpeak ? mach.bpeak : mach.peak,
                   mach.bpeak ? mach.bpeak_cpu : mach.peak_cpu);
    if (M <= 64)
        printf("%-34s W from memory: %.1f GB/s, %.0f%% of the read bandwidth\n", "", 2.0 * N * K / best * 1e-9,
               100 * 2.0 * N * K / best / mach.bandwidth);
    if (!fast) {
        linear_free(&c);
        return;
    }
    double d = 0, m = 0;
    for (size_t i = 0; i < (size_t)M * N; i++) {
        d = fmax(d, fabs((double)c.y[i] - exact[i]));
        m = fmax(m, fabs((double)exact[i]));
    }
    printf("%-34s error vs exact: max %.2e of max |exact| %.3g (%.1e relative)\n", "", d, m, d / m);
    linear_free(&c);
    free(exact);
}

/* y = x·Wᵀ with W in f32: the products of a LoRA adapter (N or K = the rank) */
static void bench_lora(const char *filter, int M, int K, int N) {
    char name[64];
    snprintf(name, sizeof name, "gemm f32 %dx%dx%d", M, N, K);
    if (!selected(filter, name)) return;
    linear_case c = linear_new(M, K, N, ZI_F32);
    double cpu, best = linear_time(&c, &cpu);
    report(name, 2.0 * M * N * K, best, cpu);
    linear_free(&c);
}

/* self-attention of S tokens, H heads of D, as in the DiT; fixed input values */
typedef struct { int S, H, D; float *q, *k, *v, *o; } attention_case;

static attention_case attention_new(int S, int H, int D) {
    size_t n = (size_t)S * H * D;
    attention_case c = { S, H, D, malloc(n * 4), malloc(n * 4), malloc(n * 4), malloc(n * 4) };
    for (size_t i = 0; i < n; i++) c.q[i] = (float)((i * 7919) % 1000) * 2e-3f - 1;
    for (size_t i = 0; i < n; i++) c.k[i] = c.q[(i * 31) % n], c.v[i] = c.q[(i * 17) % n];
    return c;
}

static void attention_free(attention_case *c) { free(c->q); free(c->k); free(c->v); free(c->o); }

/* the best of two runs (one above 2048 tokens): wall seconds; its CPU seconds in *cpu */
static double attention_time(const attention_case *c, double *cpu) {
    int ld = c->H * c->D;
    double best = 1e30;
    *cpu = 1e30;
    for (int r = 0; r < (c->S > 2048 ? 1 : 2); r++) {
        double t0 = zi_now(), c0 = bench_cpu_now();
        zi_attention(c->o, ld, c->q, ld, c->k, ld, c->v, ld, c->S, c->S, c->H, c->H, c->D, 1 / 11.3f, 0, c->S, NULL);
        double t = zi_now() - t0, u = bench_cpu_now() - c0;
        best = t < best ? t : best;
        *cpu = u < *cpu ? u : *cpu;
    }
    return best;
}

static void bench_attention(const char *filter, int S, int H, int D) {
    char name[64];
    snprintf(name, sizeof name, "attention %d heads x %d, S=%d", H, D, S);
    if (!selected(filter, name)) return;
    attention_case c = attention_new(S, H, D);
    double cpu, best = attention_time(&c, &cpu);
    report(name, 4.0 * S * S * H * D, best, cpu);
    attention_free(&c);
}

/* The thread pool's own cost: zi_parallel_for over n items that do (almost) nothing, the price
 * every parallel step pays; the text encoder at 32 tokens makes about 900 such calls. */
static void count_items(void *ctx, int64_t b, int64_t e) { atomic_fetch_add((atomic_llong *)ctx, e - b); }

static void bench_dispatch(const char *filter) {
    if (!selected(filter, "dispatch")) return;
    atomic_llong items = 0;
    for (int n = 16; n <= 256; n *= 4) {
        double best = 1e30;
        for (int r = 0; r < 3; r++) {
            double t0 = zi_now();
            for (int i = 0; i < 10000; i++) zi_parallel_for(n, 1, count_items, &items);
            double t = (zi_now() - t0) / 10000;
            best = t < best ? t : best;
        }
        printf("dispatch: zi_parallel_for over %3d items on %d threads: %6.2f us\n", n, zi_nthreads(), best * 1e6);
    }
}

/* Thread scaling: a Linear layer and attention at 1056 tokens, timed with one thread and with
 * all of them. The speed-up is printed as a percentage of linear (the goal: >= 85%) and next
 * to the speed-up of the FMA peak itself, which is less than linear where clocks drop with
 * more busy cores or vCPUs share a core. */
static void bench_scaling(const char *filter) {
    if (!selected(filter, "scaling")) return;
    linear_case lc = linear_new(1056, 3840, 3840, ZI_BF16);
    attention_case ac = attention_new(1056, 30, 128);
    int T = zi_nthreads();
    double cpu, all[2] = { linear_time(&lc, &cpu), attention_time(&ac, &cpu) }, one[2];
    zi_threads_init(1);
    bench_machine m1;
    bench_measure(&m1);
    one[0] = linear_time(&lc, &cpu), one[1] = attention_time(&ac, &cpu);
    zi_threads_init(T);
    for (int a = 0; a < 2; a++)
        printf("scaling %-26s 1 thread %6.1f ms, %d threads %6.1f ms: %5.2fx = %5.1f%% of linear "
               "(the FMA peak: %.2fx; relative to it %5.1f%%)\n", a ? "attention S=1056" : "gemm bf16 1056x3840x3840",
               one[a] * 1e3, T, all[a] * 1e3, one[a] / all[a], 100 * one[a] / all[a] / T, mach.peak / m1.peak,
               100 * (one[a] / all[a]) / (mach.peak / m1.peak));
    linear_free(&lc);
    attention_free(&ac);
}

/* a 3x3 convolution (pad 1) of Ci -> C channels, W wide, H rows (the width of a VAE decoder layer, fewer
 * rows: the time per pixel depends on the width, the height only multiplies the pixels) */
static void bench_conv(const char *filter, int Ci, int C, int H, int W) {
    char name[64];
    snprintf(name, sizeof name, "conv3x3 %d->%d at %dx%d", Ci, C, W, H);   /* width x rows */
    if (!selected(filter, name)) return;
    size_t nx = (size_t)(Ci > C ? Ci : C) * H * W, nw = (size_t)C * Ci * 9;
    float *x = malloc(nx * 4), *y = malloc(nx * 4), *w = malloc(nw * 4);
    for (size_t i = 0; i < nx; i++) x[i] = (float)((i * 7919) % 1000) * 2e-3f - 1;
    for (size_t i = 0; i < nw; i++) w[i] = (float)((i * 104729) % 1000) * 1e-4f - 0.05f;
    zi_mat wm = { w, ZI_F32, C, (int64_t)Ci * 9 };
    double best = 1e30, best_cpu = 1e30;
    for (int r = 0; r < 2; r++) {
        double t0 = zi_now(), c0 = bench_cpu_now();
        zi_conv2d(y, x, Ci, H, W, &wm, NULL, 3, 3, 1, 1, 1, 1, 1);
        double t = zi_now() - t0, c = bench_cpu_now() - c0;
        best = t < best ? t : best;
        best_cpu = c < best_cpu ? c : best_cpu;
    }
    report(name, 2.0 * C * Ci * 9 * H * W, best, best_cpu);
    free(x); free(y); free(w);
}

/* Loading the real tokenizer.json (the Qwen2 vocabulary, 151k tokens, 151k merges) and
 * encoding 1 MB of mixed text, single-threaded. */
static void bench_tokenizer(const char *filter) {
    if (!selected(filter, "tokenizer")) return;
    double t0 = zi_now();
    zi_tokenizer *t = zi_tok_load("test/golden/tiny-zimage/tokenizer/tokenizer.json");
    double load = zi_now() - t0;
    size_t n;
    char *text = t ? zt_mixed_text("test/tokenizer-corpus.json", 1 << 20, &n) : NULL;
    if (!text) {
        printf("tokenizer: %s\n", zi_err());
        zi_tok_free(t);
        return;
    }
    int32_t *ids;
    t0 = zi_now();
    int nids = zi_tok_encode(t, text, n, &ids);
    double enc = zi_now() - t0;
    printf("tokenizer: load tokenizer.json %.3f s (goal < 0.5 s); encode %.2f MB of mixed text %.3f s "
           "(goal < 1 s), %.1f MB/s, %d ids\n", load, n / 1e6, enc, n / 1e6 / enc, nids);
    free(ids);
    free(text);
    zi_tok_free(t);
}

int main(int argc, char **argv) {
    const char *filter = argc > 1 && argv[1][0] ? argv[1] : NULL;
    zi_threads_init(0);
    bench_measure(&mach);
    printf("threads %d, fp32 FMA peak %.1f GFLOP/s (per CPU-s %.1f), memory read %.1f GB/s\n", zi_nthreads(),
           mach.peak * 1e-9, mach.peak_cpu * 1e-9, mach.bandwidth * 1e-9);
    if (mach.bpeak)
        printf("bf16 peak (%s) %.1f GFLOP/s (per CPU-s %.1f): the reference of the 'gemm fast' lines\n",
               zi_fast_kernel(), mach.bpeak * 1e-9, mach.bpeak_cpu * 1e-9);
    else printf("no bf16 dot products: 'gemm fast' (kernel %s) is given as %% of the fp32 peak\n", zi_fast_kernel());
    fflush(stdout);
    bench_linear(filter, 1024, 3840, 3840, 0);
    static const int Ms[3] = { 288, 1056, 4128 }, KN[3][2] = { {3840, 3840}, {3840, 10240}, {10240, 3840} };
    for (int f = 0; f < 2; f++)
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++) bench_linear(filter, Ms[i], KN[j][0], KN[j][1], f);
    /* the text encoder's (Qwen3-4B) Linear layers on a 32-token prompt: q, k and v, o, gate and up, down */
    static const int te[][2] = { {2560, 4096}, {2560, 1024}, {4096, 2560}, {2560, 9728}, {9728, 2560} };
    for (int f = 0; f < 2; f++)
        for (size_t i = 0; i < sizeof te / sizeof *te; i++) bench_linear(filter, 32, te[i][0], te[i][1], f);
    /* a rank-32 LoRA adapter at 288 rows (K, N): x·Aᵀ and h·Bᵀ of a 3840 -> 3840 and a 10240 -> 3840 layer */
    static const int lora[][2] = { {3840, 32}, {32, 3840}, {10240, 32} };
    for (size_t i = 0; i < sizeof lora / sizeof *lora; i++) bench_lora(filter, 288, lora[i][0], lora[i][1]);
    for (int i = 0; i < 3; i++) bench_attention(filter, Ms[i], 30, 128);
    bench_scaling(filter);
    bench_dispatch(filter);
    /* the VAE decoder's layers: C -> C at 128², 256², 512², 1024², and the channel changes */
    static const int convs[][4] = { {512, 512, 64, 128}, {512, 512, 32, 256}, {512, 256, 16, 512},
                                    {256, 256, 32, 512}, {256, 128, 16, 1024}, {128, 128, 64, 1024},
                                    {128, 128, 256, 256}, {512, 512, 64, 64} };
    for (size_t i = 0; i < sizeof convs / sizeof *convs; i++)
        bench_conv(filter, convs[i][0], convs[i][1], convs[i][2], convs[i][3]);
    bench_tokenizer(filter);
    return 0;
}
