/* tensor.c: dtypes, errors, the thread pool and the numeric kernels. See tensor.h. */
#include "tensor.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <stdatomic.h>
#include <pthread.h>
#ifdef ZI_OMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

/* ---------------------------------------------------------------- dtypes */
static const struct { const char *name; size_t size; } dtypes[ZI_NDTYPES] = {
    [ZI_F32] = {"F32", 4},  [ZI_F16] = {"F16", 2},  [ZI_BF16] = {"BF16", 2}, [ZI_F64] = {"F64", 8},
    [ZI_I64] = {"I64", 8},  [ZI_I32] = {"I32", 4},  [ZI_I16] = {"I16", 2},   [ZI_I8] = {"I8", 1},
    [ZI_U8] = {"U8", 1},    [ZI_BOOL] = {"BOOL", 1}, [ZI_F8_E4M3] = {"F8_E4M3", 1},
    [ZI_F8_E5M2] = {"F8_E5M2", 1},
};

size_t zi_dtype_size(zi_dtype t) { return (unsigned)t < ZI_NDTYPES ? dtypes[t].size : 0; }
const char *zi_dtype_name(zi_dtype t) { return (unsigned)t < ZI_NDTYPES ? dtypes[t].name : "?"; }

int zi_dtype_parse(const char *s, zi_dtype *out) {
    for (int i = 0; i < ZI_NDTYPES; i++)
        if (!strcmp(s, dtypes[i].name)) { *out = (zi_dtype)i; return 0; }
    return -1;
}

/* ---------------------------------------------------------------- errors and memory */
static _Thread_local char errbuf[1024];

void zi_seterr(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, sizeof errbuf, fmt, ap);
    va_end(ap);
}

const char *zi_err(void) { return errbuf[0] ? errbuf : "unknown error"; }

void zi_die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

void *zi_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) zi_die("out of memory (%zu bytes)", n);
    return p;
}

void *zi_calloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) zi_die("out of memory (%zu x %zu bytes)", n, size);
    return p;
}

void *zi_realloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) zi_die("out of memory (%zu bytes)", n);
    return q;
}

char *zi_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    return memcpy(zi_malloc(n), s, n);
}

double zi_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------- conversions */
static inline uint32_t f32_bits(float f) { union { float f; uint32_t u; } v = { f }; return v.u; }
static inline float bits_f32(uint32_t u) { union { uint32_t u; float f; } v = { u }; return v.f; }

uint16_t zi_f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1);            /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

float zi_f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {                              /* zero or subnormal: m · 2^-24, exact */
        float f = (float)m * 0x1p-24f;
        return s ? -f : f;
    }
    if (e == 31) return bits_f32(s | 0x7f800000u | (m << 13));   /* inf, NaN */
    return bits_f32(s | ((e + 112) << 23) | (m << 13));
}

uint16_t zi_f32_to_f16(float f) {
    uint32_t u = f32_bits(f), s = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(s | 0x7e00 | ((a >> 13) & 0x3ff));  /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(s | 0x7c00);  /* >= 65520 rounds to inf */
    if (a >= 0x38800000u) {                    /* normal half: drop 13 mantissa bits */
        uint32_t h = (((a >> 23) - 112) << 10) | ((a >> 13) & 0x3ff), rem = a & 0x1fff;
        if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;   /* a carry may bump the exponent */
        return (uint16_t)(s | h);
    }
    if (a <= 0x33000000u) return (uint16_t)s;  /* <= 2^-25: rounds (ties to even) to zero */
    /* subnormal half: value / 2^-24 = m · 2^(E-126), with the implicit bit in m */
    uint32_t m = (a & 0x7fffff) | 0x800000, shift = 126 - (a >> 23);
    uint32_t h = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) h++;
    return (uint16_t)(s | h);
}

/* float8 e4m3fn: bias 7, no infinities, S.1111.111 is NaN */
static float f8e4m3_to_f32(uint8_t b) {
    int e = (b >> 3) & 0xf, m = b & 7;
    float v = e == 0 ? ldexpf((float)m, -9) : (e == 15 && m == 7) ? NAN : ldexpf(1 + m / 8.0f, e - 7);
    return (b & 0x80) ? -v : v;
}

void zi_to_f32(float *dst, const void *src, zi_dtype t, size_t n) {
    size_t i = 0;
    switch (t) {
    case ZI_F32: memmove(dst, src, n * sizeof(float)); break;
    case ZI_BF16: { const uint16_t *s = src; for (; i < n; i++) dst[i] = zi_bf16_to_f32(s[i]); } break;
    case ZI_F16: {
        const uint16_t *s = src;
#ifdef __F16C__
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
        for (; i < n; i++) dst[i] = zi_f16_to_f32(s[i]);
    } break;
    case ZI_F64: { const double *s = src; for (; i < n; i++) dst[i] = (float)s[i]; } break;
    case ZI_I64: { const int64_t *s = src; for (; i < n; i++) dst[i] = (float)s[i]; } break;
    case ZI_I32: { const int32_t *s = src; for (; i < n; i++) dst[i] = (float)s[i]; } break;
    case ZI_I16: { const int16_t *s = src; for (; i < n; i++) dst[i] = (float)s[i]; } break;
    case ZI_I8: { const int8_t *s = src; for (; i < n; i++) dst[i] = (float)s[i]; } break;
    case ZI_U8: { const uint8_t *s = src; for (; i < n; i++) dst[i] = (float)s[i]; } break;
    case ZI_BOOL: { const uint8_t *s = src; for (; i < n; i++) dst[i] = s[i] ? 1.0f : 0.0f; } break;
    case ZI_F8_E4M3: { const uint8_t *s = src; for (; i < n; i++) dst[i] = f8e4m3_to_f32(s[i]); } break;
    case ZI_F8_E5M2: {  /* the top byte of a float16 */
        const uint8_t *s = src;
        for (; i < n; i++) dst[i] = zi_f16_to_f32((uint16_t)(s[i] << 8));
    } break;
    default: zi_die("zi_to_f32: bad dtype %d", (int)t);
    }
}

/* ---------------------------------------------------------------- threads */
static int default_threads(void) {
    const char *e = getenv("ZIMAGE_THREADS");
    int n = e ? atoi(e) : 0;
    if (n <= 0) n = (int)sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? n : 1;
}

/* Chunk length for n items: about four chunks per thread (dynamic load balancing), never
 * below grain. The split only decides who computes what, never how. */
static int64_t chunk_len(int64_t n, int64_t grain, int T) {
    int64_t c = (n + 4 * (int64_t)T - 1) / (4 * (int64_t)T);
    return c > grain ? c : grain > 0 ? grain : 1;
}

#ifdef ZI_OMP
static int omp_n;

void zi_threads_init(int n) { omp_n = n > 0 ? n : default_threads(); }

int zi_nthreads(void) {
    if (!omp_n) zi_threads_init(0);
    return omp_n;
}

void zi_parallel_for(int64_t n, int64_t grain, zi_range_fn fn, void *ctx) {
    if (n <= 0) return;
    int T = zi_nthreads();
    int64_t chunk = chunk_len(n, grain, T), nchunks = (n + chunk - 1) / chunk;
    if (nchunks <= 1 || T == 1 || omp_in_parallel()) { fn(ctx, 0, n); return; }
#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t b = c * chunk, e = b + chunk < n ? b + chunk : n;
        fn(ctx, b, e);
    }
}
#else
/* The pool: T-1 workers plus the calling thread. A job is published under the mutex with a
 * new generation number; workers sleep on `wake` between jobs and take chunks from an atomic
 * counter; the caller waits on `done` until every worker has left the job. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    pthread_t *tid;
    int n, started, quit, busy;
    int64_t gen, gen0;     /* job generation; gen0: its value when the workers were created */
    zi_range_fn fn;
    void *ctx;
    int64_t len, chunk;
    atomic_llong next;
} pool = { .mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
           .done = PTHREAD_COND_INITIALIZER };
static pthread_mutex_t pool_job = PTHREAD_MUTEX_INITIALIZER;   /* one job (or resize) at a time */
static _Thread_local int in_job;                                /* nested calls run serially */

static void pool_run_chunks(void) {
    for (;;) {
        int64_t b = atomic_fetch_add(&pool.next, pool.chunk);
        if (b >= pool.len) break;
        pool.fn(pool.ctx, b, b + pool.chunk < pool.len ? b + pool.chunk : pool.len);
    }
}

static void *pool_worker(void *arg) {
    (void)arg;
    in_job = 1;
    pthread_mutex_lock(&pool.mu);
    int64_t seen = pool.gen0;      /* not pool.gen: a job may have been published already */
    for (;;) {
        while (pool.gen == seen && !pool.quit) pthread_cond_wait(&pool.wake, &pool.mu);
        if (pool.quit) break;
        seen = pool.gen;
        pthread_mutex_unlock(&pool.mu);
        pool_run_chunks();
        pthread_mutex_lock(&pool.mu);
        if (--pool.busy == 0) pthread_cond_signal(&pool.done);
    }
    pthread_mutex_unlock(&pool.mu);
    return NULL;
}

static void pool_stop(void) {              /* called with pool_job held */
    if (!pool.started) return;
    pthread_mutex_lock(&pool.mu);
    pool.quit = 1;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 0; i < pool.n - 1; i++) pthread_join(pool.tid[i], NULL);
    free(pool.tid);
    pool.tid = NULL;
    pool.quit = pool.started = 0;
}

static void pool_start(int n) {            /* called with pool_job held */
    pool.n = n;
    pool.gen0 = pool.gen;
    pool.tid = zi_calloc((size_t)n, sizeof(pthread_t));
    for (int i = 0; i < n - 1; i++)
        if (pthread_create(&pool.tid[i], NULL, pool_worker, NULL))
            zi_die("cannot create thread %d", i);
    pool.started = 1;
}

void zi_threads_init(int n) {
    if (n <= 0) n = default_threads();
    pthread_mutex_lock(&pool_job);
    if (!pool.started || pool.n != n) {
        pool_stop();
        pool_start(n);
    }
    pthread_mutex_unlock(&pool_job);
}

int zi_nthreads(void) {
    if (!pool.started) zi_threads_init(0);
    return pool.n;
}

void zi_parallel_for(int64_t n, int64_t grain, zi_range_fn fn, void *ctx) {
    if (n <= 0) return;
    int T = zi_nthreads();
    int64_t chunk = chunk_len(n, grain, T);
    /* serial: one chunk, one thread, a nested call, or another thread's job in flight */
    if (chunk >= n || T == 1 || in_job || pthread_mutex_trylock(&pool_job)) { fn(ctx, 0, n); return; }
    pthread_mutex_lock(&pool.mu);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.len = n;
    pool.chunk = chunk;
    atomic_store(&pool.next, 0);
    pool.busy = pool.n - 1;
    pool.gen++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    in_job = 1;
    pool_run_chunks();
    in_job = 0;
    pthread_mutex_lock(&pool.mu);
    while (pool.busy > 0) pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool_job);
}
#endif

/* Per-thread scratch buffers (64-byte aligned, grown on demand, freed at thread exit).
 * Slots: 0, 1 = the GEMM's packed panels, 2 = attention tiles, 3 = conv. */
enum { SCRATCH_SLOTS = 4 };
typedef struct { float *p[SCRATCH_SLOTS]; size_t n[SCRATCH_SLOTS]; } scratch_set;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *v) {
    scratch_set *s = v;
    for (int i = 0; i < SCRATCH_SLOTS; i++) free(s->p[i]);
    free(s);
}

static void scratch_key_init(void) { pthread_key_create(&scratch_key, scratch_free); }

static float *scratch(int slot, size_t n) {
    pthread_once(&scratch_once, scratch_key_init);
    scratch_set *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = zi_calloc(1, sizeof *s);
        pthread_setspecific(scratch_key, s);
    }
    if (s->n[slot] < n) {
        free(s->p[slot]);
        s->p[slot] = aligned_alloc(64, (n * sizeof(float) + 63) & ~(size_t)63);
        if (!s->p[slot]) zi_die("out of memory (%zu floats of scratch)", n);
        s->n[slot] = n;
    }
    return s->p[slot];
}

/* ---------------------------------------------------------------- GEMM
 * Goto/BLIS blocking. For each column block of C (at most NC wide) and each KC-deep slice of
 * K: op(B)'s slice is packed (and converted to fp32) into strips of NR columns, op(A)'s slice
 * into strips of MR rows (MC rows at a time), and the micro-kernel computes an MR x NR tile of
 * A·B in registers over the KC slice, then adds it into C.
 * Determinism: every C element is summed over k in the same order (k = 0..K-1 within fixed
 * KC slices, slice results added to C in order) wherever its tile lands, so the result does
 * not depend on how M and N are split among threads. K is never split. */
#if defined(__AVX512F__)
enum { MR = 12, NR = 32 };
#elif defined(__AVX2__) && defined(__FMA__)
enum { MR = 6, NR = 16 };
#elif defined(__ARM_NEON) && defined(__aarch64__)
enum { MR = 8, NR = 12 };
#else
enum { MR = 4, NR = 8 };
#endif
enum { KC = 256, MC = 40 * MR, NC = 16 * NR };

typedef struct {
    int transA, transB, M, N, K;
    float alpha, beta;
    const float *A;
    int64_t lda;
    const void *B;
    zi_dtype bt;
    int64_t ldb;
    float *C;
    int64_t ldc;
} gemm_args;

/* C tile (mr x nr valid) = alpha·acc + beta·C; beta = 0: C is not read. The same formula
 * (one fma after the beta product) is used by the SIMD stores below. */
static void tile_store(const float *acc, float *C, int64_t ldc, int mr, int nr, float alpha, float beta) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float *c = C + i * ldc + j;
            *c = beta == 0 ? alpha * acc[i * NR + j] : fmaf(alpha, acc[i * NR + j], beta * *c);
        }
}

/* The micro-kernel: acc[MR][NR] = Σ_p a[p][0..MR) ⊗ b[p][0..NR) over kc packed rows, then
 * stored into the mr x nr tile of C. */
#if defined(__AVX512F__)
static void micro(int kc, const float *a, const float *b, float *C, int64_t ldc, int mr, int nr,
                  float alpha, float beta) {
    __m512 acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int p = 0; p < kc; p++, a += MR, b += NR) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        for (int i = 0; i < MR; i++) {
            __m512 ai = _mm512_set1_ps(a[i]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    if (mr == MR && nr == NR) {
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < 2; j++) {
                float *c = C + i * ldc + 16 * j;
                _mm512_storeu_ps(c, beta == 0 ? _mm512_mul_ps(va, acc[i][j])
                                              : _mm512_fmadd_ps(va, acc[i][j], _mm512_mul_ps(vb, _mm512_loadu_ps(c))));
            }
        return;
    }
    float t[MR * NR];
    for (int i = 0; i < MR; i++) {
        _mm512_storeu_ps(t + i * NR, acc[i][0]);
        _mm512_storeu_ps(t + i * NR + 16, acc[i][1]);
    }
    tile_store(t, C, ldc, mr, nr, alpha, beta);
}
#elif defined(__AVX2__) && defined(__FMA__)
static void micro(int kc, const float *a, const float *b, float *C, int64_t ldc, int mr, int nr,
                  float alpha, float beta) {
    __m256 acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int p = 0; p < kc; p++, a += MR, b += NR) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        for (int i = 0; i < MR; i++) {
            __m256 ai = _mm256_broadcast_ss(a + i);
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    if (mr == MR && nr == NR) {
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < 2; j++) {
                float *c = C + i * ldc + 8 * j;
                _mm256_storeu_ps(c, beta == 0 ? _mm256_mul_ps(va, acc[i][j])
                                              : _mm256_fmadd_ps(va, acc[i][j], _mm256_mul_ps(vb, _mm256_loadu_ps(c))));
            }
        return;
    }
    float t[MR * NR];
    for (int i = 0; i < MR; i++) {
        _mm256_storeu_ps(t + i * NR, acc[i][0]);
        _mm256_storeu_ps(t + i * NR + 8, acc[i][1]);
    }
    tile_store(t, C, ldc, mr, nr, alpha, beta);
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
static void micro(int kc, const float *a, const float *b, float *C, int64_t ldc, int mr, int nr,
                  float alpha, float beta) {
    float32x4_t acc[MR][3];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = acc[i][2] = vdupq_n_f32(0);
    for (int p = 0; p < kc; p++, a += MR, b += NR) {
        float32x4_t b0 = vld1q_f32(b), b1 = vld1q_f32(b + 4), b2 = vld1q_f32(b + 8);
        float32x4_t a0 = vld1q_f32(a), a1 = vld1q_f32(a + 4);
#define ZI_ROW(i, av, lane) \
        acc[i][0] = vfmaq_laneq_f32(acc[i][0], b0, av, lane); \
        acc[i][1] = vfmaq_laneq_f32(acc[i][1], b1, av, lane); \
        acc[i][2] = vfmaq_laneq_f32(acc[i][2], b2, av, lane);
        ZI_ROW(0, a0, 0) ZI_ROW(1, a0, 1) ZI_ROW(2, a0, 2) ZI_ROW(3, a0, 3)
        ZI_ROW(4, a1, 0) ZI_ROW(5, a1, 1) ZI_ROW(6, a1, 2) ZI_ROW(7, a1, 3)
#undef ZI_ROW
    }
    float t[MR * NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 3; j++) vst1q_f32(t + i * NR + 4 * j, acc[i][j]);
    tile_store(t, C, ldc, mr, nr, alpha, beta);
}
#else
static void micro(int kc, const float *a, const float *b, float *C, int64_t ldc, int mr, int nr,
                  float alpha, float beta) {
    float acc[MR * NR] = {0};
    for (int p = 0; p < kc; p++, a += MR, b += NR)
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[i * NR + j] += a[i] * b[j];
    tile_store(acc, C, ldc, mr, nr, alpha, beta);
}
#endif

/* op(A)[i0 .. i0+mc, p0 .. p0+kc] -> strips of MR rows: ap[strip][p][MR], zero padded. */
static void pack_A(float *ap, const gemm_args *g, int i0, int mc, int p0, int kc) {
    for (int ir = 0; ir < mc; ir += MR, ap += (size_t)MR * kc) {
        int mr = mc - ir < MR ? mc - ir : MR;
        if (g->transA) {                       /* A stored [K, M]: rows of the strip are contiguous */
            for (int p = 0; p < kc; p++) {
                const float *s = g->A + (int64_t)(p0 + p) * g->lda + i0 + ir;
                for (int i = 0; i < MR; i++) ap[p * MR + i] = i < mr ? s[i] : 0;
            }
        } else {
            for (int i = 0; i < MR; i++) {
                const float *s = g->A + (int64_t)(i0 + ir + i) * g->lda + p0;
                for (int p = 0; p < kc; p++) ap[p * MR + i] = i < mr ? s[p] : 0;
            }
        }
    }
}

/* op(B)[p0 .. p0+kc, j0 .. j0+nc] -> fp32 strips of NR columns: bp[strip][p][NR], zero padded.
 * This is where bf16/f16 weights become fp32, one KC x NC panel at a time. */
static void pack_B(float *bp, const gemm_args *g, int p0, int kc, int j0, int nc) {
    size_t es = zi_dtype_size(g->bt);
    const char *B = g->B;
    float row[KC];
    for (int jr = 0; jr < nc; jr += NR, bp += (size_t)NR * kc) {
        int nr = nc - jr < NR ? nc - jr : NR;
        if (g->transB) {                       /* B stored [N, K]: a column of op(B) is contiguous */
            for (int j = 0; j < NR; j++) {
                if (j < nr) zi_to_f32(row, B + ((int64_t)(j0 + jr + j) * g->ldb + p0) * es, g->bt, (size_t)kc);
                for (int p = 0; p < kc; p++) bp[p * NR + j] = j < nr ? row[p] : 0;
            }
        } else {
            for (int p = 0; p < kc; p++) {
                zi_to_f32(bp + p * NR, B + ((int64_t)(p0 + p) * g->ldb + j0 + jr) * es, g->bt, (size_t)nr);
                for (int j = nr; j < NR; j++) bp[p * NR + j] = 0;
            }
        }
    }
}

/* C[i0 .. i0+m, j0 .. j0+n] of the product, serially (one thread's share). */
static void gemm_tile(const gemm_args *g, int i0, int m, int j0, int n) {
    float *bp = scratch(0, (size_t)KC * NC), *ap = scratch(1, (size_t)KC * MC);
    for (int jc = 0; jc < n; jc += NC) {
        int nc = n - jc < NC ? n - jc : NC;
        for (int pc = 0; pc < g->K; pc += KC) {
            int kc = g->K - pc < KC ? g->K - pc : KC;
            float beta = pc == 0 ? g->beta : 1.0f;    /* later slices accumulate into C */
            pack_B(bp, g, pc, kc, j0 + jc, nc);
            for (int ic = 0; ic < m; ic += MC) {
                int mc = m - ic < MC ? m - ic : MC;
                pack_A(ap, g, i0 + ic, mc, pc, kc);
                for (int jr = 0; jr < nc; jr += NR)
                    for (int ir = 0; ir < mc; ir += MR)
                        micro(kc, ap + (size_t)ir * kc, bp + (size_t)jr * kc,
                              g->C + (int64_t)(i0 + ic + ir) * g->ldc + j0 + jc + jr, g->ldc,
                              mc - ir < MR ? mc - ir : MR, nc - jr < NR ? nc - jr : NR, g->alpha, beta);
            }
        }
    }
}

/* Tasks are rectangles of C: row blocks of mb (a multiple of MR) x column blocks of NC. */
typedef struct { const gemm_args *g; int mb, nmb; } gemm_job;

static void gemm_task(void *ctx, int64_t begin, int64_t end) {
    const gemm_job *jb = ctx;
    for (int64_t t = begin; t < end; t++) {
        int i0 = (int)(t % jb->nmb) * jb->mb, j0 = (int)(t / jb->nmb) * NC;
        int m = jb->g->M - i0 < jb->mb ? jb->g->M - i0 : jb->mb;
        int n = jb->g->N - j0 < NC ? jb->g->N - j0 : NC;
        gemm_tile(jb->g, i0, m, j0, n);
    }
}

static void check_gemm_dtype(zi_dtype bt) {
    if (bt != ZI_F32 && bt != ZI_BF16 && bt != ZI_F16) zi_die("zi_gemm: unsupported B dtype %s", zi_dtype_name(bt));
}

void zi_gemm(int transA, int transB, int M, int N, int K, float alpha,
             const float *A, int64_t lda, const void *B, zi_dtype bt, int64_t ldb,
             float beta, float *C, int64_t ldc) {
    check_gemm_dtype(bt);
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {                              /* empty sum: C = beta·C */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) C[(int64_t)i * ldc + j] = beta == 0 ? 0 : beta * C[(int64_t)i * ldc + j];
        return;
    }
    gemm_args g = { transA, transB, M, N, K, alpha, beta, A, lda, B, bt, ldb, C, ldc };
    /* Split M only as far as needed to give every thread about three tasks. */
    int T = zi_nthreads(), ncb = (N + NC - 1) / NC, nmb = 1;
    if ((double)M * N * K < 1e6) T = 1;        /* too small to be worth waking the pool */
    while (ncb * nmb < 3 * T && (M + nmb) / (nmb + 1) >= 4 * MR) nmb++;
    int mb = ((M + nmb - 1) / nmb + MR - 1) / MR * MR;
    nmb = (M + mb - 1) / mb;
    gemm_job jb = { &g, mb, nmb };
    if (T == 1) gemm_task(&jb, 0, (int64_t)ncb * nmb);
    else zi_parallel_for((int64_t)ncb * nmb, 1, gemm_task, &jb);
}

void zi_gemm_ref(int transA, int transB, int M, int N, int K, float alpha,
                 const float *A, int64_t lda, const void *B, zi_dtype bt, int64_t ldb,
                 float beta, float *C, int64_t ldc) {
    check_gemm_dtype(bt);
    size_t es = zi_dtype_size(bt);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0;
            for (int p = 0; p < K; p++) {
                float a = transA ? A[(int64_t)p * lda + i] : A[(int64_t)i * lda + p], b;
                int64_t bi = transB ? (int64_t)j * ldb + p : (int64_t)p * ldb + j;
                zi_to_f32(&b, (const char *)B + bi * es, bt, 1);
                s += a * b;
            }
            float *c = C + (int64_t)i * ldc + j;
            *c = beta == 0 ? alpha * s : alpha * s + beta * *c;
        }
}

typedef struct { float *y; const float *bias; int64_t n; } bias_job;

static void bias_rows(void *ctx, int64_t begin, int64_t end) {
    const bias_job *b = ctx;
    for (int64_t i = begin; i < end; i++)
        for (int64_t j = 0; j < b->n; j++) b->y[i * b->n + j] += b->bias[j];
}

void zi_linear(float *y, const float *x, int M, const zi_mat *W, const float *bias) {
    zi_gemm(0, 1, M, (int)W->rows, (int)W->cols, 1.0f, x, W->cols, W->data, W->dtype, W->cols, 0.0f, y, W->rows);
    if (bias) {
        bias_job b = { y, bias, W->rows };
        zi_parallel_for(M, 16, bias_rows, &b);
    }
}

/* ---------------------------------------------------------------- attention
 * Flash-style: for one head and a block of ATT_BQ queries, walk the keys in blocks of ATT_BK:
 * S = scale·Q·Kᵀ (a small GEMM), then per query row the online softmax keeps the running
 * maximum m and sum l: with m' = max(m, max S), the old sum and output are rescaled by
 * exp(m - m'), P = exp(S - m') is added to l and P·V to the output. At the end out = O / l
 * and lse = m + log l. Blocks are fixed, so the result does not depend on the thread count. */
enum { ATT_BQ = 64, ATT_BK = 128 };

typedef struct {
    float *out; int64_t ldo;
    const float *q, *k, *v; int64_t ldq, ldk, ldv;
    int Sq, Sk, Hq, Hkv, D, causal, n_keys, nqb;
    float scale;
    float *lse;
} att_args;

/* Online-softmax update of one query row with its block of scores s[0..bk) (keys j0..);
 * keys at or past `lim` are masked. s becomes P (zeros where masked). Returns the factor
 * by which the row's running output must be rescaled. */
static float softmax_update(float *s, int bk, int lim, float *m, float *l) {
    if (lim <= 0) {
        memset(s, 0, (size_t)bk * sizeof(float));
        return 1.0f;
    }
    float mx = *m;
    for (int j = 0; j < lim; j++) mx = s[j] > mx ? s[j] : mx;
    float corr = *m == -INFINITY ? 0.0f : expf(*m - mx), sum = 0;
    for (int j = 0; j < lim; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    for (int j = lim; j < bk; j++) s[j] = 0;
    *l = *l * corr + sum;
    *m = mx;
    return corr;
}

static void att_block(const att_args *a, int h, int q0) {
    int D = a->D, bq = a->Sq - q0 < ATT_BQ ? a->Sq - q0 : ATT_BQ, g = h / (a->Hq / a->Hkv);
    float *S = scratch(2, (size_t)ATT_BQ * ATT_BK + (size_t)ATT_BQ * D + 2 * ATT_BQ);
    float *O = S + ATT_BQ * ATT_BK, *m = O + (size_t)ATT_BQ * D, *l = m + ATT_BQ;
    for (int i = 0; i < bq; i++) m[i] = -INFINITY, l[i] = 0;
    memset(O, 0, (size_t)bq * D * sizeof(float));
    int kend = a->n_keys < a->Sk ? a->n_keys : a->Sk;
    if (a->causal && q0 + bq < kend) kend = q0 + bq;
    for (int j0 = 0; j0 < kend; j0 += ATT_BK) {
        int bk = kend - j0 < ATT_BK ? kend - j0 : ATT_BK;
        gemm_args qk = { 0, 1, bq, bk, D, a->scale, 0.0f, a->q + (int64_t)q0 * a->ldq + (int64_t)h * D, a->ldq,
                         a->k + (int64_t)j0 * a->ldk + (int64_t)g * D, ZI_F32, a->ldk, S, ATT_BK };
        gemm_tile(&qk, 0, bq, 0, bk);
        for (int i = 0; i < bq; i++) {
            int lim = a->causal && q0 + i + 1 - j0 < bk ? q0 + i + 1 - j0 : bk;
            float corr = softmax_update(S + i * ATT_BK, bk, lim, &m[i], &l[i]);
            if (corr != 1.0f)
                for (int d = 0; d < D; d++) O[i * D + d] *= corr;
        }
        gemm_args pv = { 0, 0, bq, D, bk, 1.0f, 1.0f, S, ATT_BK,
                         a->v + (int64_t)j0 * a->ldv + (int64_t)g * D, ZI_F32, a->ldv, O, D };
        gemm_tile(&pv, 0, bq, 0, D);
    }
    for (int i = 0; i < bq; i++) {
        float *o = a->out + (int64_t)(q0 + i) * a->ldo + (int64_t)h * D;
        /* l = 0: every key masked. A NaN l (NaN scores: NaN weights upstream) must stay NaN
         * rather than become zeros, so that the pipeline can see it (l >= 0 otherwise) */
        for (int d = 0; d < D; d++) o[d] = l[i] != 0 ? O[i * D + d] / l[i] : 0.0f;
        if (a->lse) a->lse[(int64_t)h * a->Sq + q0 + i] = l[i] != 0 ? m[i] + logf(l[i]) : -INFINITY;
    }
}

static void att_task(void *ctx, int64_t begin, int64_t end) {
    const att_args *a = ctx;
    for (int64_t t = begin; t < end; t++) att_block(a, (int)(t / a->nqb), (int)(t % a->nqb) * ATT_BQ);
}

void zi_attention(float *out, int64_t ldo, const float *q, int64_t ldq,
                  const float *k, int64_t ldk, const float *v, int64_t ldv,
                  int Sq, int Sk, int Hq, int Hkv, int D, float scale, int causal,
                  int n_keys, float *lse) {
    if (Sq <= 0 || Hq <= 0) return;
    if (Hkv <= 0 || Hq % Hkv) zi_die("zi_attention: %d query heads is not a multiple of %d kv heads", Hq, Hkv);
    att_args a = { out, ldo, q, k, v, ldq, ldk, ldv, Sq, Sk, Hq, Hkv, D, causal, n_keys,
                   (Sq + ATT_BQ - 1) / ATT_BQ, scale, lse };
    zi_parallel_for((int64_t)Hq * a.nqb, 1, att_task, &a);
}

/* ---------------------------------------------------------------- convolution
 * y[Cout, pixels] = W[Cout, Cin·kh·kw] · col[Cin·kh·kw, pixels], where col (im2col) holds, for
 * each (ci, ky, kx), the input pixel each output pixel sees through that tap. col is built for
 * a band of output rows at a time so that its size stays bounded (the VAE's 1024² layers would
 * need gigabytes at once). W is the GEMM's A operand, which is fp32: a bf16/f16 conv weight is
 * converted once per call (conv weights are small next to the activations). */
enum { CONV_COL_FLOATS = 1 << 22 };    /* im2col band budget: 16 MB */

typedef struct {
    float *col; const float *x;
    int H, W, Wo, kh, kw, stride, pad_t, pad_l, oy0, npix;
} im2col_job;

static void im2col_rows(void *ctx, int64_t begin, int64_t end) {
    const im2col_job *c = ctx;
    for (int64_t r = begin; r < end; r++) {         /* r = (ci·kh + ky)·kw + kx */
        int kx = (int)(r % c->kw), ky = (int)(r / c->kw % c->kh), ci = (int)(r / c->kw / c->kh);
        const float *xc = c->x + (int64_t)ci * c->H * c->W;
        float *dst = c->col + r * c->npix;
        for (int p = 0; p < c->npix; p++) {
            int oy = c->oy0 + p / c->Wo, ox = p % c->Wo;
            int iy = oy * c->stride - c->pad_t + ky, ix = ox * c->stride - c->pad_l + kx;
            dst[p] = iy >= 0 && iy < c->H && ix >= 0 && ix < c->W ? xc[(int64_t)iy * c->W + ix] : 0.0f;
        }
    }
}

typedef struct { float *y; const float *bias; int64_t n; } chan_bias_job;

static void chan_bias(void *ctx, int64_t begin, int64_t end) {
    const chan_bias_job *b = ctx;
    for (int64_t c = begin; c < end; c++)
        for (int64_t i = 0; i < b->n; i++) b->y[c * b->n + i] += b->bias[c];
}

void zi_conv2d(float *y, const float *x, int Cin, int H, int W, const zi_mat *w, const float *bias,
               int kh, int kw, int stride, int pad_t, int pad_l, int pad_b, int pad_r) {
    int Ho = (H + pad_t + pad_b - kh) / stride + 1, Wo = (W + pad_l + pad_r - kw) / stride + 1;
    int Cout = (int)w->rows, K = Cin * kh * kw;
    if (w->cols != K) zi_die("zi_conv2d: weight has %lld columns, expected %d", (long long)w->cols, K);
    if (Ho <= 0 || Wo <= 0) return;
    float *wf = NULL;
    const float *A = w->data;
    if (w->dtype != ZI_F32) {
        wf = zi_malloc((size_t)Cout * K * sizeof(float));
        zi_to_f32(wf, w->data, w->dtype, (size_t)Cout * K);
        A = wf;
    }
    int64_t HWo = (int64_t)Ho * Wo;
    int direct = kh == 1 && kw == 1 && stride == 1 && !pad_t && !pad_l && !pad_b && !pad_r;
    if (direct) {                                   /* 1x1: x itself is the im2col matrix */
        zi_gemm(0, 0, Cout, (int)HWo, K, 1.0f, A, K, x, ZI_F32, HWo, 0.0f, y, HWo);
    } else {
        int band = (int)(CONV_COL_FLOATS / ((int64_t)K * Wo));
        band = band < 1 ? 1 : band > Ho ? Ho : band;
        float *col = zi_malloc((size_t)K * band * Wo * sizeof(float));
        for (int oy0 = 0; oy0 < Ho; oy0 += band) {
            int rows = Ho - oy0 < band ? Ho - oy0 : band, npix = rows * Wo;
            im2col_job c = { col, x, H, W, Wo, kh, kw, stride, pad_t, pad_l, oy0, npix };
            zi_parallel_for(K, 1, im2col_rows, &c);
            zi_gemm(0, 0, Cout, npix, K, 1.0f, A, K, col, ZI_F32, npix, 0.0f, y + (int64_t)oy0 * Wo, HWo);
        }
        free(col);
    }
    free(wf);
    if (bias) {
        chan_bias_job b = { y, bias, HWo };
        zi_parallel_for(Cout, 1, chan_bias, &b);
    }
}

/* ---------------------------------------------------------------- row kernels
 * Statistics are accumulated in double: the result is then the correctly rounded fp32 value
 * (within an ulp), which is what PyTorch's pairwise fp32 sums approximate. Each row is
 * computed by one thread. */
typedef struct {
    float *y; const float *x, *w, *b;
    int64_t dim;        /* elements per row (groupnorm: per group) */
    int64_t inner;      /* groupnorm: HW (the weight index is channel = element / inner) */
    float eps;
} row_job;

static void rmsnorm_rows(void *ctx, int64_t begin, int64_t end) {
    const row_job *r = ctx;
    for (int64_t i = begin; i < end; i++) {
        const float *x = r->x + i * r->dim;
        float *y = r->y + i * r->dim;
        double ss = 0;
        for (int64_t j = 0; j < r->dim; j++) ss += (double)x[j] * x[j];
        float inv = 1.0f / sqrtf((float)(ss / r->dim) + r->eps);
        for (int64_t j = 0; j < r->dim; j++) y[j] = r->w ? r->w[j] * (x[j] * inv) : x[j] * inv;
    }
}

void zi_rmsnorm(float *y, const float *x, const float *w, int64_t rows, int dim, float eps) {
    row_job r = { y, x, w, NULL, dim, 1, eps };
    zi_parallel_for(rows, 1 + 16384 / (dim + 1), rmsnorm_rows, &r);
}

/* mean and 1/sqrt(biased variance + eps) of n values (two passes, in double) */
static void moments(const float *x, int64_t n, float eps, float *mean, float *rstd) {
    double s = 0, ss = 0;
    for (int64_t j = 0; j < n; j++) s += x[j];
    double mu = s / n;
    for (int64_t j = 0; j < n; j++) ss += (x[j] - mu) * (x[j] - mu);
    *mean = (float)mu;
    *rstd = 1.0f / sqrtf((float)(ss / n) + eps);
}

/* y = (x - mean)·rstd·w + b over a row (layernorm) or a group of channels (groupnorm) */
static void norm_rows(void *ctx, int64_t begin, int64_t end) {
    const row_job *r = ctx;
    for (int64_t i = begin; i < end; i++) {
        const float *x = r->x + i * r->dim;
        float *y = r->y + i * r->dim, mean, rstd;
        int64_t c0 = r->inner ? i * (r->dim / r->inner) : 0;     /* first channel of the group */
        moments(x, r->dim, r->eps, &mean, &rstd);
        for (int64_t j = 0; j < r->dim; j++) {
            int64_t c = r->inner ? c0 + j / r->inner : j;
            float t = (x[j] - mean) * rstd;
            if (r->w) t *= r->w[c];
            if (r->b) t += r->b[c];
            y[j] = t;
        }
    }
}

void zi_layernorm(float *y, const float *x, const float *w, const float *b,
                  int64_t rows, int dim, float eps) {
    row_job r = { y, x, w, b, dim, 0, eps };
    zi_parallel_for(rows, 1 + 16384 / (dim + 1), norm_rows, &r);
}

void zi_groupnorm(float *y, const float *x, const float *w, const float *b,
                  int C, int64_t HW, int groups, float eps) {
    if (groups <= 0 || C % groups) zi_die("zi_groupnorm: %d channels in %d groups", C, groups);
    row_job r = { y, x, w, b, (int64_t)(C / groups) * HW, HW, eps };
    zi_parallel_for(groups, 1, norm_rows, &r);
}

static void softmax_rows(void *ctx, int64_t begin, int64_t end) {
    const row_job *r = ctx;
    for (int64_t i = begin; i < end; i++) {
        const float *x = r->x + i * r->dim;
        float *y = r->y + i * r->dim, mx = -INFINITY;
        for (int64_t j = 0; j < r->dim; j++) mx = x[j] > mx ? x[j] : mx;
        double s = 0;
        for (int64_t j = 0; j < r->dim; j++) s += y[j] = expf(x[j] - mx);
        float inv = (float)(1.0 / s);
        for (int64_t j = 0; j < r->dim; j++) y[j] *= inv;
    }
}

void zi_softmax(float *y, const float *x, int64_t rows, int n) {
    row_job r = { y, x, NULL, NULL, n, 0, 0 };
    zi_parallel_for(rows, 1 + 16384 / (n + 1), softmax_rows, &r);
}

/* ---------------------------------------------------------------- elementwise kernels */
typedef enum { EW_SILU, EW_SILU_MUL, EW_TANH, EW_ADD, EW_MUL, EW_SCALE } ew_op;
typedef struct { ew_op op; float *y; const float *a, *b; float s; } ew_job;
enum { EW_GRAIN = 16384 };

static void ew_range(void *ctx, int64_t begin, int64_t end) {
    const ew_job *e = ctx;
    float *y = e->y;
    const float *a = e->a, *b = e->b;
    switch (e->op) {
    case EW_SILU: for (int64_t i = begin; i < end; i++) y[i] = a[i] / (1.0f + expf(-a[i])); break;
    case EW_SILU_MUL:
        for (int64_t i = begin; i < end; i++) y[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
        break;
    case EW_TANH: for (int64_t i = begin; i < end; i++) y[i] = tanhf(a[i]); break;
    case EW_ADD: for (int64_t i = begin; i < end; i++) y[i] = a[i] + b[i]; break;
    case EW_MUL: for (int64_t i = begin; i < end; i++) y[i] = a[i] * b[i]; break;
    case EW_SCALE: for (int64_t i = begin; i < end; i++) y[i] = a[i] * e->s; break;
    }
}

static void ew(ew_op op, float *y, const float *a, const float *b, float s, int64_t n) {
    ew_job e = { op, y, a, b, s };
    zi_parallel_for(n, EW_GRAIN, ew_range, &e);
}

void zi_silu(float *y, const float *x, int64_t n) { ew(EW_SILU, y, x, NULL, 0, n); }
void zi_silu_mul(float *y, const float *gate, const float *up, int64_t n) { ew(EW_SILU_MUL, y, gate, up, 0, n); }
void zi_tanh(float *y, const float *x, int64_t n) { ew(EW_TANH, y, x, NULL, 0, n); }
void zi_add(float *y, const float *a, const float *b, int64_t n) { ew(EW_ADD, y, a, b, 0, n); }
void zi_mul(float *y, const float *a, const float *b, int64_t n) { ew(EW_MUL, y, a, b, 0, n); }
void zi_scale(float *y, const float *x, float s, int64_t n) { ew(EW_SCALE, y, x, NULL, s, n); }

/* ---------------------------------------------------------------- RoPE */
typedef struct { float *x; int64_t ld; int H, D, half; const float *c, *s; } rope_job;

static void rope_rows(void *ctx, int64_t begin, int64_t end) {
    const rope_job *r = ctx;
    int P = r->D / 2;
    for (int64_t t = begin; t < end; t++) {       /* t = token */
        const float *c = r->c + t * P, *s = r->s + t * P;
        for (int h = 0; h < r->H; h++) {
            float *x = r->x + t * r->ld + (int64_t)h * r->D;
            for (int m = 0; m < P; m++) {
                /* pair (i, j): interleaved (2m, 2m+1) or rotate-half (m, m + D/2) */
                int i = r->half ? m : 2 * m, j = r->half ? m + P : 2 * m + 1;
                float a = x[i], b = x[j];
                x[i] = a * c[m] - b * s[m];
                x[j] = b * c[m] + a * s[m];
            }
        }
    }
}

void zi_rope_interleaved(float *x, int64_t ld, int S, int H, int D, const float *cos_, const float *sin_) {
    rope_job r = { x, ld, H, D, 0, cos_, sin_ };
    zi_parallel_for(S, 16, rope_rows, &r);
}

void zi_rope_half(float *x, int64_t ld, int S, int H, int D, const float *cos_, const float *sin_) {
    rope_job r = { x, ld, H, D, 1, cos_, sin_ };
    zi_parallel_for(S, 16, rope_rows, &r);
}
