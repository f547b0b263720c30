/* tensor.h: dtypes, errors, the thread pool and the numeric kernels (tensor.c).
 *
 * Conventions used by every kernel:
 *   - activations are float32, row-major, with an explicit leading dimension (ld = elements
 *     between consecutive rows) where a kernel may read a sub-matrix;
 *   - weights may be float32, bfloat16 or float16; they are converted inside the kernels,
 *     never materialised as an fp32 copy of the model;
 *   - accumulation is float32 in a fixed order: every result is bit-identical for any
 *     number of threads.
 */
#ifndef ZIMAGE_TENSOR_H
#define ZIMAGE_TENSOR_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- dtypes */
typedef enum {
    ZI_F32, ZI_F16, ZI_BF16, ZI_F64, ZI_I64, ZI_I32, ZI_I16, ZI_I8, ZI_U8, ZI_BOOL,
    ZI_F8_E4M3, ZI_F8_E5M2, ZI_NDTYPES
} zi_dtype;

size_t zi_dtype_size(zi_dtype t);
const char *zi_dtype_name(zi_dtype t);          /* safetensors spelling: "F32", "BF16", ... */
int zi_dtype_parse(const char *s, zi_dtype *out);/* 0 on success, -1 for an unknown name */

static inline float zi_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}
uint16_t zi_f32_to_bf16(float f);               /* round to nearest even, NaN kept NaN */
float zi_f16_to_f32(uint16_t h);
uint16_t zi_f32_to_f16(float f);                /* round to nearest even */
/* x rounded to bfloat16 and back: what a bf16 tensor holds */
static inline float zi_bf16_round(float x) { return zi_bf16_to_f32(zi_f32_to_bf16(x)); }
/* n values of dtype t (F32, F16, BF16, F64, F8_*, integers) to float32 */
void zi_to_f32(float *dst, const void *src, zi_dtype t, size_t n);
/* n float32 values to dtype t (F32, F16, BF16; round to nearest even) */
void zi_from_f32(void *dst, const float *src, zi_dtype t, size_t n);

/* PyTorch rounds the result of every tensor operation to float32: `a + b*c` in Python is two
 * kernels and two roundings. The build lets the compiler fuse a*b + c into one FMA (one
 * rounding), which changes the last bit. zi_rnd() makes its argument opaque to the optimiser,
 * so a product passed through it is rounded before it is added. */
static inline float zi_rnd(float x) {
    __asm__("" : "+m"(x));
    return x;
}

/* 64-bit FNV-1a of n bytes, continuing from h (start with ZI_FNV1A_BASIS) */
#define ZI_FNV1A_BASIS 0xcbf29ce484222325ull
static inline uint64_t zi_fnv1a(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

/* ---------------------------------------------------------------- errors and memory
 * Library functions report failure by returning -1 / NULL after zi_seterr() recorded a
 * one-line message (naming the file or flag at fault); programs print it and exit nonzero. */
void zi_seterr(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
const char *zi_err(void);
_Noreturn void zi_die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Progress on stderr, one line rewritten in place ('\r'); zi_progress_end() ends the line.
 * zi_die() ends an open progress line first, so an error never lands in the middle of one. */
void zi_progress(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void zi_progress_end(void);
void *zi_malloc(size_t n);                      /* dies with "out of memory" */
void *zi_calloc(size_t n, size_t size);
void *zi_realloc(void *p, size_t n);
char *zi_strdup(const char *s);
double zi_now(void);                            /* monotonic seconds */
/* Wall seconds the calling thread has spent in zi_gemm and in zi_attention (and its backward)
 * since it started (bench_full compares a DiT step with their sum: the rest is glue). */
typedef struct { double gemm, attention; } zi_kernel_seconds;
zi_kernel_seconds zi_kernel_time(void);

/* ---------------------------------------------------------------- threads
 * One pool, created on first use. Thread count: zi_threads_init(n) (n <= 0: $ZIMAGE_THREADS,
 * else the online cores). With OMP=1 the same interface runs on OpenMP. */
void zi_threads_init(int n);
int zi_nthreads(void);
typedef void (*zi_range_fn)(void *ctx, int64_t begin, int64_t end);
/* Calls fn on disjoint sub-ranges covering [0, n), in parallel; returns when all are done.
 * Ranges are at least `grain` long (except the last). Kernels must make each result depend
 * only on its index, never on how [0, n) was split. Nested calls run serially. */
void zi_parallel_for(int64_t n, int64_t grain, zi_range_fn fn, void *ctx);

/* ---------------------------------------------------------------- GEMM
 * C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C      (beta = 0: C is not read)
 *   A: float32. transA = 0: A is [M,K] (lda); transA = 1: A is stored [K,M] (lda).
 *   B: dtype bt (F32, BF16, F16). transB = 1: B is stored [N,K] (ldb), the layout of a
 *      Linear weight (y = x·Wᵀ); transB = 0: B is stored [K,N] (ldb).
 * One blocked, packed kernel serves Linear layers, attention and convolutions (im2col); with
 * few rows (a short prompt) and transB, a variant reads W's rows in place. Both sum each
 * element in the same order, so a row's result does not depend on how many rows come with it. */
void zi_gemm(int transA, int transB, int M, int N, int K, float alpha,
             const float *A, int64_t lda, const void *B, zi_dtype bt, int64_t ldb,
             float beta, float *C, int64_t ldc);
/* The plain triple loop, in the same summation order as zi_gemm's reference semantics
 * (used by tests). */
void zi_gemm_ref(int transA, int transB, int M, int N, int K, float alpha,
                 const float *A, int64_t lda, const void *B, zi_dtype bt, int64_t ldb,
                 float beta, float *C, int64_t ldc);

/* The opt-in fast path (`--fast` of sample and train, or ZIMAGE_FAST=1 in the environment):
 * zi_gemm, hence zi_linear and zi_conv2d, rounds both operands to bfloat16 and sums their
 * products in float32: on AMX tiles or AVX512-BF16 dot products where the CPU has them, else
 * by widening bf16 to fp32 in registers. Off by default; off again, results are bit-identical
 * to a run that never turned it on. Fast results are also the same for any thread count, but
 * differ between kinds of CPU (each kernel sums in its own order). */
void zi_set_fast(int on);
int zi_fast(void);                  /* 1 when on (first call: $ZIMAGE_FAST unless zi_set_fast ran) */
const char *zi_fast_kernel(void);   /* what the fast path runs on here: "amx", "avx512bf16", "rounding" */

/* A 2-D weight as stored in the checkpoint: [rows = out features, cols = in features]. */
typedef struct {
    const void *data;
    zi_dtype dtype;
    int64_t rows, cols;
} zi_mat;

/* y[M, W.rows] = x[M, W.cols] · Wᵀ + bias (bias float32, may be NULL). */
void zi_linear(float *y, const float *x, int M, const zi_mat *W, const float *bias);

/* ---------------------------------------------------------------- attention
 * Scaled-dot-product attention, computed tile by tile with an online softmax: memory is
 * linear in the sequence length (no [Sq, Sk] score matrix).
 *   q: [Sq, Hq, D] with row stride ldq (elements between tokens), k, v: [Sk, Hkv, D] (ldk, ldv),
 *   out: [Sq, Hq, D] (ldo). Hq must be a multiple of Hkv (grouped-query attention).
 *   scale: usually 1/sqrt(D). causal: query i sees keys 0..i. n_keys <= Sk: keys at
 *   positions >= n_keys are masked out (right padding of a batch).
 *   lse (may be NULL): [Hq, Sq] log-sum-exp of the scaled scores, kept for the backward. */
void zi_attention(float *out, int64_t ldo, const float *q, int64_t ldq,
                  const float *k, int64_t ldk, const float *v, int64_t ldv,
                  int Sq, int Sk, int Hq, int Hkv, int D, float scale, int causal,
                  int n_keys, float *lse);

/* ---------------------------------------------------------------- convolution
 * One sample: x [Cin, H, W] -> y [Cout, Ho, Wo], Ho = (H + pad_t + pad_b - kh) / stride + 1
 * (likewise Wo). w: [Cout, Cin·kh·kw] (the checkpoint's [Cout, Cin, kh, kw] flattened);
 * bias float32, may be NULL. Zero padding. */
void zi_conv2d(float *y, const float *x, int Cin, int H, int W, const zi_mat *w, const float *bias,
               int kh, int kw, int stride, int pad_t, int pad_l, int pad_b, int pad_r);

/* ---------------------------------------------------------------- row and elementwise kernels
 * Weights/biases of norms are float32 (small vectors are converted once at load time). */
void zi_rmsnorm(float *y, const float *x, const float *w, int64_t rows, int dim, float eps);
void zi_layernorm(float *y, const float *x, const float *w, const float *b,
                  int64_t rows, int dim, float eps);        /* w, b may be NULL (no affine) */
/* x: [C, HW] (one sample, channels first); groups split C evenly. w, b may be NULL. */
void zi_groupnorm(float *y, const float *x, const float *w, const float *b,
                  int C, int64_t HW, int groups, float eps);
/* silu(groupnorm(x)) in one pass over y, the same bits as the two calls */
void zi_groupnorm_silu(float *y, const float *x, const float *w, const float *b,
                       int C, int64_t HW, int groups, float eps);
void zi_softmax(float *y, const float *x, int64_t rows, int n);
void zi_silu(float *y, const float *x, int64_t n);
void zi_silu_mul(float *y, const float *gate, const float *up, int64_t n);   /* silu(gate)·up */
void zi_tanh(float *y, const float *x, int64_t n);
void zi_add(float *y, const float *a, const float *b, int64_t n);
void zi_mul(float *y, const float *a, const float *b, int64_t n);
void zi_scale(float *y, const float *x, float s, int64_t n);
/* RoPE on x [S, H, D] (row stride ld) with cos/sin tables [S, D/2]:
 * interleaved pairs (2m, 2m+1) (the DiT) or rotate-half pairs (m, m + D/2) (Qwen3). */
void zi_rope_interleaved(float *x, int64_t ld, int S, int H, int D, const float *cos_, const float *sin_);
void zi_rope_half(float *x, int64_t ld, int S, int H, int D, const float *cos_, const float *sin_);

/* ---------------------------------------------------------------- backward kernels (training)
 * Gradients of the kernels above with respect to their inputs (weights of norms are frozen:
 * no gradient for them). Shapes as in the forward. Deterministic for any thread count: every
 * output element is computed by one task, in a fixed order. */
/* dx += dL/dx of y = zi_rmsnorm(x, w) given dy (rows x dim). w may be NULL. */
void zi_rmsnorm_backward(float *dx, const float *dy, const float *x, const float *w,
                         int64_t rows, int dim, float eps);
/* dx += dL/dx of y = zi_layernorm(x, w, b) given dy. w may be NULL (b needs no gradient). */
void zi_layernorm_backward(float *dx, const float *dy, const float *x, const float *w,
                           int64_t rows, int dim, float eps);
/* y = silu(x): dx = dy·silu'(x) (written; dx may alias dy). */
void zi_silu_backward(float *dx, const float *dy, const float *x, int64_t n);
/* y = silu(gate)·up: dgate = dy·up·silu'(gate), dup = dy·silu(gate) (written; dgate may alias dy). */
void zi_silu_mul_backward(float *dgate, float *dup, const float *dy, const float *gate, const float *up,
                          int64_t n);
/* The backward of zi_rope_interleaved, in place on the gradient dx [S, H, D] (row stride ld):
 * the rotation is orthogonal, so the gradient turns back by the same angle. */
void zi_rope_interleaved_backward(float *dx, int64_t ld, int S, int H, int D, const float *cos_,
                                  const float *sin_);
/* The backward of zi_attention without masking (causal = 0, n_keys = Sk) and with as many
 * key heads as query heads, FlashAttention-2 style: scores are recomputed tile by tile from
 * q, k and the forward's lse [H, Sq]; with D_i = rowsum(dO ∘ O) and P = exp(scale·q·kᵀ − lse),
 *   dV = Pᵀ·dO,  dS = P ∘ (dO·Vᵀ − D),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q.
 * q, o, dout, dq: [Sq, H, D]; k, v, dk, dv: [Sk, H, D]; all with row stride ld. dq, dk, dv are
 * written. dK/dV are summed over queries by one task per key block, dQ over keys by one
 * task per query block (scores are recomputed in both passes): no atomics, no thread-count
 * dependence. */
void zi_attention_backward(float *dq, float *dk, float *dv, const float *q, const float *k,
                           const float *v, const float *o, const float *dout, const float *lse,
                           int64_t ld, int Sq, int Sk, int H, int D, float scale);

#endif
