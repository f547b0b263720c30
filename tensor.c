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
#include <sched.h>
#ifdef ZI_OMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
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

/* The message is kept on one line: a control character in it (a file name or a prompt may
 * hold a newline) is written as \n, \r, \t or \xHH. */
void zi_seterr(const char *fmt, ...) {
    char msg[sizeof errbuf];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)msg; *p && n + 5 < sizeof errbuf; p++) {
        if (*p >= 0x20 && *p != 0x7f) errbuf[n++] = (char)*p;
        else if (*p == '\n' || *p == '\r' || *p == '\t') {
            errbuf[n++] = '\\';
            errbuf[n++] = *p == '\n' ? 'n' : *p == '\r' ? 'r' : 't';
        } else n += (size_t)snprintf(errbuf + n, sizeof errbuf - n, "\\x%02x", *p);
    }
    errbuf[n] = 0;
}

const char *zi_err(void) { return errbuf[0] ? errbuf : "unknown error"; }

static int progress_open;

void zi_progress(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputc('\r', stderr);
    vfprintf(stderr, fmt, ap);
    fflush(stderr);
    va_end(ap);
    progress_open = 1;
}

void zi_progress_end(void) {
    if (progress_open) fputc('\n', stderr);
    progress_open = 0;
}

void zi_die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    zi_progress_end();
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

static _Thread_local zi_kernel_seconds kernel_time;

zi_kernel_seconds zi_kernel_time(void) { return kernel_time; }

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
    case ZI_BF16: {
        const uint16_t *s = src;
#ifdef __AVX2__
        for (; i + 8 <= n; i += 8)              /* the 16 bits become the top half of a float */
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                          _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i))), 16)));
#endif
        for (; i < n; i++) dst[i] = zi_bf16_to_f32(s[i]);
    } break;
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

void zi_from_f32(void *dst, const float *src, zi_dtype t, size_t n) {
    uint16_t *d = dst;
    switch (t) {
    case ZI_F32: memmove(dst, src, n * sizeof(float)); break;
    case ZI_BF16: for (size_t i = 0; i < n; i++) d[i] = zi_f32_to_bf16(src[i]); break;
    case ZI_F16: for (size_t i = 0; i < n; i++) d[i] = zi_f32_to_f16(src[i]); break;
    default: zi_die("zi_from_f32: bad dtype %d", (int)t);
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

/* items [0, n) in chunks of `chunk`, handed out one chunk at a time */
static void parallel_chunks(int64_t n, int64_t chunk, zi_range_fn fn, void *ctx) {
    if (n <= 0) return;
    int T = zi_nthreads();
    int64_t nchunks = (n + chunk - 1) / chunk;
    if (nchunks <= 1 || T == 1 || omp_in_parallel()) { fn(ctx, 0, n); return; }
#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t b = c * chunk, e = b + chunk < n ? b + chunk : n;
        fn(ctx, b, e);
    }
}
#else
/* The pool: T-1 workers plus the calling thread. A job is published by bumping the generation
 * number `gen`; workers take chunks from an atomic counter and count `busy` down when they
 * leave the job. Between jobs a worker first spins on `gen` for a short while, and the caller
 * spins on `busy` the same way: a job of a few microseconds (the text encoder at 32 tokens
 * makes about 900 per forward) would otherwise wait 40 µs for the kernel to wake 15 threads one
 * after another (bench: BENCH=dispatch). After SPIN_S without news they sleep on `wake` / `done`. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    pthread_t *tid;
    int n, started, quit;
    atomic_llong gen, busy;    /* job generation; workers still in the job */
    long long gen0;            /* gen when the workers were created */
    zi_range_fn fn;
    void *ctx;
    int64_t len, chunk;
    atomic_llong next;
} pool = { .mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
           .done = PTHREAD_COND_INITIALIZER };
static pthread_mutex_t pool_job = PTHREAD_MUTEX_INITIALIZER;   /* one job (or resize) at a time */
static _Thread_local int in_job;                                /* nested calls run serially */

#define SPIN_S 100e-6

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Spins until (*v == x) == want, for at most SPIN_S seconds: whether that came. It yields the
 * CPU now and then, so that with more threads than free cores the spinning does not keep a
 * thread with work from running. */
static int spin_for(atomic_llong *v, long long x, int want) {
    double t0 = 0;
    for (int i = 1;; i++) {
        if ((atomic_load_explicit(v, memory_order_acquire) == x) == want) return 1;
        cpu_relax();
        if (i % 64 == 0) {
            sched_yield();
            double t = zi_now();
            if (t0 == 0) t0 = t;
            else if (t - t0 > SPIN_S) return 0;
        }
    }
}

static void pool_run_chunks(void) {
    for (;;) {
        int64_t b = atomic_fetch_add(&pool.next, pool.chunk);
        if (b >= pool.len) break;
        pool.fn(pool.ctx, b, b + pool.chunk < pool.len ? b + pool.chunk : pool.len);
    }
}

/* The sleeping side of both waits: the test is repeated under the mutex that the publishing
 * side takes before it signals, so a signal cannot fall between test and sleep. */
static void *pool_worker(void *arg) {
    (void)arg;
    in_job = 1;
    long long seen = pool.gen0;    /* not pool.gen: a job may have been published already */
    for (;;) {
        if (!spin_for(&pool.gen, seen, 0)) {
            pthread_mutex_lock(&pool.mu);
            while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        if (pool.quit) break;      /* written before gen was bumped */
        seen = atomic_load(&pool.gen);
        pool_run_chunks();
        if (atomic_fetch_sub(&pool.busy, 1) == 1) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.mu);
        }
    }
    return NULL;
}

/* Publishes a job (fn, ctx, ... already set) or the order to quit. */
static void pool_publish(void) {
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    pthread_mutex_lock(&pool.mu);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
}

static void pool_stop(void) {              /* called with pool_job held */
    if (!pool.started) return;
    pool.quit = 1;
    pool_publish();
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
    if (in_job) return;                    /* the pool cannot be resized from inside a job */
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

/* items [0, n) in chunks of `chunk`, handed out one chunk at a time */
static void parallel_chunks(int64_t n, int64_t chunk, zi_range_fn fn, void *ctx) {
    if (n <= 0) return;
    int T = zi_nthreads();
    /* serial: one chunk, one thread, a nested call, or another thread's job in flight */
    if (chunk >= n || T == 1 || in_job || pthread_mutex_trylock(&pool_job)) { fn(ctx, 0, n); return; }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.len = n;
    pool.chunk = chunk;
    atomic_store(&pool.next, 0);
    atomic_store(&pool.busy, pool.n - 1);
    pool_publish();
    in_job = 1;
    pool_run_chunks();
    in_job = 0;
    if (!spin_for(&pool.busy, 0, 1)) {
        pthread_mutex_lock(&pool.mu);
        while (atomic_load(&pool.busy) > 0) pthread_cond_wait(&pool.done, &pool.mu);
        pthread_mutex_unlock(&pool.mu);
    }
    pthread_mutex_unlock(&pool_job);
}
#endif

void zi_parallel_for(int64_t n, int64_t grain, zi_range_fn fn, void *ctx) {
    if (n > 0) parallel_chunks(n, chunk_len(n, grain, zi_nthreads()), fn, ctx);
}

/* The least work of a chunk of a cheap job (elementwise, norms, RoPE), in elements; rows of
 * row_len elements are grouped to about that much. Below it the handout costs more than the
 * chunk saves; above it the text encoder's small jobs (32 tokens: a norm is 82K elements) went
 * to a few threads while the rest idled: at 16384, a RoPE of 32 rows was 2 chunks. */
enum { EW_GRAIN = 4096 };

static int64_t row_grain(int64_t row_len) { return 1 + EW_GRAIN / (row_len + 1); }

/* Per-thread scratch buffers (64-byte aligned, grown on demand, freed at thread exit).
 * Slots: 0 = the GEMM's packed B panel (AMX: a task's partial Cᵀ blocks), 1 = a packed A
 * panel (AMX: the copied W slice), 2 = attention tiles, 3 = zi_gemm's packed op(A) (of the
 * calling thread), 4 = attention's packed keys and values (a task's own, or every head's,
 * shared, in the calling thread's),
 * 5 = zi_gemm's op(B) packed once for all tasks (of the calling thread: the fast path's, or the
 * exact path's single NR strip). */
enum { SCRATCH_SLOTS = 6 };
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
 * Goto/BLIS blocking. zi_gemm packs op(A) once (strips of MR rows for every KC-deep slice of
 * K, shared by all threads), then splits C into rectangles (tasks). A task walks its columns
 * in blocks of at most NC and K in slices of KC: op(B)'s KC x NC panel is packed, converting
 * bf16/f16 to fp32, into strips of NR columns, and the micro-kernel computes each MR x NR tile
 * of the slice's product in registers and adds it into C.
 * Determinism: every C element is summed over k in the same order (k = 0..K-1 within fixed
 * KC slices, slice results added to C in order) wherever its tile lands, so the result does
 * not depend on how M and N are split among threads. K is never split. */
/* MR x NR: the register tile (MR·NR/lanes accumulators + NR/lanes B vectors + 1 A broadcast
 * fit the register file). KC x NR of B stays in L1, MC x KC of A in L2 (BLIS's choices). */
#if defined(__AVX512F__)
enum { MR = 12, NR = 32, KC = 384, MC = 20 * MR };
#elif defined(__AVX2__) && defined(__FMA__)
enum { MR = 6, NR = 16, KC = 256, MC = 24 * MR };
#elif defined(__ARM_NEON) && defined(__aarch64__)
enum { MR = 8, NR = 12, KC = 256, MC = 16 * MR };
#else
enum { MR = 4, NR = 8, KC = 256, MC = 32 * MR };
#endif
enum { NC = 256 / NR * NR };               /* widest column block (B panel: KC x NC floats) */

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
    int round_bf16;         /* the fast path without bf16 arithmetic: operands rounded to bf16 as packed */
} gemm_args;

/* C tile (mr x nr valid) = alpha·acc + beta·C (acc: rows ldacc apart); beta = 0: C is not
 * read. The same formula (one fma after the beta product) is used by the SIMD stores below. */
static void tile_store(const float *acc, int ldacc, float *C, int64_t ldc, int mr, int nr, float alpha, float beta) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float *c = C + i * ldc + j;
            *c = beta == 0 ? alpha * acc[i * ldacc + j] : fmaf(alpha, acc[i * ldacc + j], beta * *c);
        }
}

/* The micro-kernel: acc[MR][NR] = Σ_p a[p][0..MR) ⊗ b[p][0..NR) over kc packed rows, then
 * stored into the mr x nr tile of C. */
#if defined(__AVX512F__)
static void micro(int kc, const float *a, const float *b, float *C, int64_t ldc, int mr, int nr,
                  float alpha, float beta) {
    __m512 acc[MR][2];
    for (int i = 0; i < MR; i++) {
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        _mm_prefetch((const char *)(C + i * ldc), _MM_HINT_T0);        /* C is needed at the end */
        _mm_prefetch((const char *)(C + i * ldc + NR - 1), _MM_HINT_T0);
    }
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
    tile_store(t, NR, C, ldc, mr, nr, alpha, beta);
}
#elif defined(__AVX2__) && defined(__FMA__)
static void micro(int kc, const float *a, const float *b, float *C, int64_t ldc, int mr, int nr,
                  float alpha, float beta) {
    __m256 acc[MR][2];
    for (int i = 0; i < MR; i++) {
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        _mm_prefetch((const char *)(C + i * ldc), _MM_HINT_T0);        /* C is needed at the end */
        _mm_prefetch((const char *)(C + i * ldc + NR - 1), _MM_HINT_T0);
    }
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
    tile_store(t, NR, C, ldc, mr, nr, alpha, beta);
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
    tile_store(t, NR, C, ldc, mr, nr, alpha, beta);
}
#else
static void micro(int kc, const float *a, const float *b, float *C, int64_t ldc, int mr, int nr,
                  float alpha, float beta) {
    float acc[MR * NR] = {0};
    for (int p = 0; p < kc; p++, a += MR, b += NR)
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[i * NR + j] += a[i] * b[j];
    tile_store(acc, NR, C, ldc, mr, nr, alpha, beta);
}
#endif

/* p[0 .. n) rounded to the nearest bf16 (zi_bf16_round), kept as fp32 */
static void round_to_bf16(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = zi_bf16_round(p[i]);
}

/* op(A)[i0 .. i0+mc, p0 .. p0+kc] -> strips of MR rows: ap[strip][p][MR], zero padded. */
static void pack_A(float *ap, const gemm_args *g, int i0, int mc, int p0, int kc) {
    float *ap0 = ap;
    for (int ir = 0; ir < mc; ir += MR, ap += (size_t)MR * kc) {
        int mr = mc - ir < MR ? mc - ir : MR;
        if (g->transA) {                       /* A stored [K, M]: the strip's rows are contiguous */
            for (int p = 0; p < kc; p++) {
                const float *s = g->A + (int64_t)(p0 + p) * g->lda + i0 + ir;
                for (int i = 0; i < MR; i++) ap[p * MR + i] = i < mr ? s[i] : 0;
            }
        } else {                               /* A stored [M, K]: interleave MR rows */
            const float *s[MR];
            for (int i = 0; i < MR; i++) s[i] = g->A + (int64_t)(i0 + ir + (i < mr ? i : 0)) * g->lda + p0;
            for (int p = 0; p < kc; p++)
                for (int i = 0; i < MR; i++) ap[p * MR + i] = s[i][p];
            for (int p = 0; p < kc && mr < MR; p++)
                for (int i = mr; i < MR; i++) ap[p * MR + i] = 0;
        }
    }
    if (g->round_bf16) round_to_bf16(ap0, (size_t)(mc + MR - 1) / MR * MR * kc);
}

#if defined(__AVX2__) && defined(__F16C__)
/* 8 consecutive values of dtype bt (F32, BF16, F16) as fp32 */
static inline __m256 load8(const char *src, zi_dtype bt) {
    __m128i h = _mm_loadu_si128((const __m128i *)src);
    if (bt == ZI_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    if (bt == ZI_F16) return _mm256_cvtph_ps(h);
    return _mm256_loadu_ps((const float *)src);
}

static inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20); r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20); r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31); r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31); r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

/* op(B)[p0 .. p0+kc, j0 .. j0+nc] -> fp32 strips of NR columns: bp[strip][p][NR], zero padded.
 * This is where bf16/f16 weights become fp32, one KC x NC panel at a time. */
static void pack_B_f32(float *bp, const gemm_args *g, int p0, int kc, int j0, int nc) {
    size_t es = zi_dtype_size(g->bt);
    const char *B = g->B;
    if (!g->transB) {      /* B stored [K, N]: each row of the panel is read once, dealt into strips */
        float tmp[NC];
        for (int p = 0; p < kc; p++) {
            const char *src = B + ((int64_t)(p0 + p) * g->ldb + j0) * es;
            if (p + 8 < kc)         /* rows may be far apart (attention's V): fetch ahead */
                for (size_t off = 0; off < (size_t)nc * es; off += 64) __builtin_prefetch(src + 8 * g->ldb * es + off);
            const float *row = (const float *)src;
            if (g->bt != ZI_F32) zi_to_f32(tmp, src, g->bt, (size_t)nc), row = tmp;
            int jr = 0;
            for (; jr + NR <= nc; jr += NR) memcpy(bp + (size_t)jr * kc + p * NR, row + jr, NR * sizeof(float));
            for (int j = 0; jr < nc && j < NR; j++) bp[(size_t)jr * kc + p * NR + j] = jr + j < nc ? row[jr + j] : 0;
        }
        return;
    }
    /* B stored [N, K] (a Linear weight): columns of op(B) are contiguous, so transpose */
    float col[KC];
    for (int jr = 0; jr < nc; jr += NR, bp += (size_t)NR * kc) {
        int nr = nc - jr < NR ? nc - jr : NR, j = 0;
#if defined(__AVX2__) && defined(__F16C__)
        for (; j + 8 <= nr && kc >= 8; j += 8) {   /* 8 x 8 blocks: convert, transpose in registers */
            const char *src = B + ((int64_t)(j0 + jr + j) * g->ldb + p0) * es;
            int p = 0;
            for (; p + 8 <= kc; p += 8) {
                __m256 r[8];
                for (int t = 0; t < 8; t++) r[t] = load8(src + ((int64_t)t * g->ldb + p) * es, g->bt);
                transpose8(r);
                for (int t = 0; t < 8; t++) _mm256_storeu_ps(bp + (p + t) * NR + j, r[t]);
            }
            for (int t = 0; p < kc && t < 8; t++) {
                zi_to_f32(col, src + ((int64_t)t * g->ldb + p) * es, g->bt, (size_t)(kc - p));
                for (int q = p; q < kc; q++) bp[q * NR + j + t] = col[q - p];
            }
        }
#endif
        for (; j < NR; j++) {
            if (j < nr) zi_to_f32(col, B + ((int64_t)(j0 + jr + j) * g->ldb + p0) * es, g->bt, (size_t)kc);
            for (int p = 0; p < kc; p++) bp[p * NR + j] = j < nr ? col[p] : 0;
        }
    }
}

/* pack_B_f32, then rounded to bf16 where the fast path asks (bf16 weights are already) */
static void pack_B(float *bp, const gemm_args *g, int p0, int kc, int j0, int nc) {
    pack_B_f32(bp, g, p0, kc, j0, nc);
    if (g->round_bf16 && g->bt != ZI_BF16) round_to_bf16(bp, (size_t)(nc + NR - 1) / NR * NR * kc);
}

/* op(A) packed for a block of rows [r0, r0 + Mp) and every KC slice: the slice starting at pc
 * is at p + pc·Mp, row strip i (relative to r0) at + i·kc. */
typedef struct { const float *p; int r0, Mp; } packed_A;

/* C[i0 .. i0+m, j0 .. j0+n] of the product, serially (one task). pa: op(A) already packed
 * (i0 - pa->r0 a multiple of MR), or NULL to pack it here. pb: op(B)'s columns j0 .. j0+n
 * already packed by pack_B_all, or NULL to pack them here, panel by panel. */
static void gemm_tile_pb(const gemm_args *g, int i0, int m, int j0, int n, const packed_A *pa, const float *pb) {
    float *bp = pb ? NULL : scratch(0, (size_t)KC * NC), *ap = pa ? NULL : scratch(1, (size_t)KC * MC);
    size_t Np = (size_t)(n + NR - 1) / NR * NR;
    for (int jc = 0; jc < n; jc += NC) {
        int nc = n - jc < NC ? n - jc : NC;
        for (int pc = 0; pc < g->K; pc += KC) {
            int kc = g->K - pc < KC ? g->K - pc : KC;
            float beta = pc == 0 ? g->beta : 1.0f;    /* later slices accumulate into C */
            const float *b = bp;
            if (pb) b = pb + (size_t)pc * Np + (size_t)jc * kc;
            else pack_B(bp, g, pc, kc, j0 + jc, nc);
            for (int ic = 0; ic < m; ic += MC) {
                int mc = m - ic < MC ? m - ic : MC;
                const float *a = ap;
                if (pa) a = pa->p + (size_t)pc * pa->Mp + (size_t)(i0 + ic - pa->r0) * kc;
                else pack_A(ap, g, i0 + ic, mc, pc, kc);
                for (int jr = 0; jr < nc; jr += NR)
                    for (int ir = 0; ir < mc; ir += MR)
                        micro(kc, a + (size_t)ir * kc, b + (size_t)jr * kc,
                              g->C + (int64_t)(i0 + ic + ir) * g->ldc + j0 + jc + jr, g->ldc,
                              mc - ir < MR ? mc - ir : MR, nc - jr < NR ? nc - jr : NR, g->alpha, beta);
            }
        }
    }
}

static void gemm_tile(const gemm_args *g, int i0, int m, int j0, int n, const packed_A *pa) {
    gemm_tile_pb(g, i0, m, j0, n, pa, NULL);
}

/* The KC slice of op(B) starting at pc, columns j0 .. j0+n: its NR-column strips one after
 * another from dst. */
static void pack_B_slice(float *dst, const gemm_args *g, int pc, int j0, int n) {
    int kc = g->K - pc < KC ? g->K - pc : KC;
    for (int jc = 0; jc < n; jc += NC)
        pack_B(dst + (size_t)jc * kc, g, pc, kc, j0 + jc, n - jc < NC ? n - jc : NC);
}

/* op(B)'s columns j0 .. j0+n, every KC slice, packed for gemm_tile_pb: the slice starting at
 * pc is at dst + pc·Np (Np = n rounded up to NR). */
static void pack_B_all(float *dst, const gemm_args *g, int j0, int n) {
    size_t Np = (size_t)(n + NR - 1) / NR * NR;
    for (int pc = 0; pc < g->K; pc += KC) pack_B_slice(dst + (size_t)pc * Np, g, pc, j0, n);
}

/* One call's rows [r0, r0 + ms): op(A) packed once into `pa` (shared by all tasks), then tasks
 * = rectangles of C of mb rows x nb columns (multiples of MR, NR), each packing its own B panels
 * or, given pb, reading op(B) packed once for all of them (pack_B_all's layout, every column). */
typedef struct { const gemm_args *g; packed_A pa; const float *pb; int ms, mb, nmb, nb; } gemm_job;

/* Strip s (rows r0 + s·MR .., mr <= MR of them) of op(A), every KC slice, into pa. */
static void pack_A_strip(const packed_A *pa, const gemm_args *g, int s, int mr) {
    for (int pc = 0; pc < g->K; pc += KC) {
        int kc = g->K - pc < KC ? g->K - pc : KC;
        pack_A((float *)pa->p + (size_t)pc * pa->Mp + (size_t)s * MR * kc, g, pa->r0 + s * MR, mr, pc, kc);
    }
}

static void pack_A_strips(void *ctx, int64_t begin, int64_t end) {
    const gemm_job *jb = ctx;
    for (int64_t s = begin; s < end; s++) {
        int left = jb->ms - (int)s * MR;
        pack_A_strip(&jb->pa, jb->g, (int)s, left < MR ? left : MR);
    }
}

static void gemm_task(void *ctx, int64_t begin, int64_t end) {
    const gemm_job *jb = ctx;
    int r1 = jb->pa.r0 + jb->ms;
    for (int64_t t = begin; t < end; t++) {
        int i0 = jb->pa.r0 + (int)(t % jb->nmb) * jb->mb, j0 = (int)(t / jb->nmb) * jb->nb;
        int m = r1 - i0 < jb->mb ? r1 - i0 : jb->mb;
        int n = jb->g->N - j0 < jb->nb ? jb->g->N - j0 : jb->nb;
        gemm_tile_pb(jb->g, i0, m, j0, n, &jb->pa, jb->pb);
    }
}

/* KC slices [begin, end) of op(B), every column, into jb->pb: pack_B_all, by slices */
static void pack_B_slices(void *ctx, int64_t begin, int64_t end) {
    const gemm_job *jb = ctx;
    size_t Np = (size_t)(jb->g->N + NR - 1) / NR * NR;
    for (int64_t s = begin; s < end; s++) pack_B_slice((float *)jb->pb + s * KC * Np, jb->g, (int)s * KC, 0, jb->g->N);
}

static void check_gemm_dtype(zi_dtype bt) {
    if (bt != ZI_F32 && bt != ZI_BF16 && bt != ZI_F16) zi_die("zi_gemm: unsupported B dtype %s", zi_dtype_name(bt));
}

/* Packed op(A) is kept per calling thread up to this size; larger M is done in row blocks. */
enum { A_PACK_FLOATS = 1 << 23 };

/* n tasks that the caller sized (a few per thread, of equal work): handed out one at a time.
 * In chunks of several, as zi_parallel_for groups cheap items, the last round would leave
 * threads idle (80 tasks on 16 threads in chunks of 2: 40 chunks, 3 rounds for 2.5 rounds of
 * work). */
static void run_tasks(int T, int64_t n, zi_range_fn fn, void *ctx) {
    if (T == 1) fn(ctx, 0, n);
    else parallel_chunks(n, 1, fn, ctx);
}

static void gemm_exact(const gemm_args *g, int T);

/* ---------------------------------------------------------------- fast GEMM (opt-in: bf16 operands)
 * zi_set_fast(1): op(A) and op(B) are rounded to bf16 (nearest even) and their products summed
 * in fp32, by AMX tiles or AVX512-BF16 dot products (vdpbf16ps). On CPUs with neither a bf16
 * product costs an fp32 FMA anyway: there the exact kernels run on operands rounded to bf16 as
 * they are packed (gemm_args.round_bf16), the fast path's numbers at the exact path's speed.
 * The bf16 kernels use the same blocking as above (fixed KC slices added to C in order, K never
 * split), with a 32 x 32 block of C per kernel call and slices padded with zeros to a multiple
 * of 32 (an AMX tile's depth), so fast results too are the same for any thread count. Packed
 * layouts (bf16 as uint16):
 *   A strip [FMR rows][kcp]       row-major: an AMX A tile is 16 rows x 32 consecutive k;
 *   B strip [kcp/2][FNR][2]       pairs of consecutive k per column: the layout of an AMX B tile
 *                                 and of vdpbf16ps's second operand. */
enum { FMR = 32, FNR = 32, FKC = 384 };
_Static_assert(FKC % 32 == 0, "fast K slices must be whole AMX tiles deep");

static int fast_on = -1;                   /* -1: not yet decided, read $ZIMAGE_FAST */

void zi_set_fast(int on) { fast_on = on != 0; }

int zi_fast(void) {
    if (fast_on < 0) {
        const char *e = getenv("ZIMAGE_FAST");
        fast_on = e && atoi(e) > 0;
    }
    return fast_on;
}

/* (every CPU with AMX-BF16 has AVX512-BF16, which the kernels below also use) */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#include <sys/syscall.h>
#define ZI_AMX 1
static int amx_usable;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

/* Linux gives a process the 8 KB AMX tile state only on request (arch_prctl
 * ARCH_REQ_XCOMP_PERM = 0x1023 for XFEATURE_XTILEDATA = 18); a refusal leaves the dot kernel. */
static void amx_request(void) { amx_usable = syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

/* The tile configuration is per thread: each thread loads it once (8 tiles of 16 x 64 bytes). */
static void amx_configure(void) {
    static __thread int done;
    if (done) return;
    struct { uint8_t palette, start_row, zero[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg = { .palette = 1 };
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
    done = 1;
}

/* c[32][32] (rows ldc floats apart) = A strip · B strip, + c itself when add: C tiles 0..3
 * (2 x 2 of 16 x 16), A tiles 4, 5, B tiles 6, 7. Adding in the tiles spares a pass over C. */
static void amx_block(int kcp, const uint16_t *a, const uint16_t *b, float *c, int64_t ldc, int add) {
    amx_configure();
    if (add) {
        _tile_loadd(0, c, ldc * 4); _tile_loadd(1, c + 16, ldc * 4);
        _tile_loadd(2, c + 16 * ldc, ldc * 4); _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
    } else {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    }
    for (int k = 0; k < kcp; k += 32) {
        _tile_loadd(4, a + k, kcp * 2);
        _tile_loadd(5, a + 16 * kcp + k, kcp * 2);
        _tile_loadd(6, b + k * FNR, FNR * 4);
        _tile_loadd(7, b + k * FNR + 32, FNR * 4);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, ldc * 4); _tile_stored(1, c + 16, ldc * 4);
    _tile_stored(2, c + 16 * ldc, ldc * 4); _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}
#endif

const char *zi_fast_kernel(void) {
#ifdef ZI_AMX
    pthread_once(&amx_once, amx_request);
    if (amx_usable) return "amx";
#endif
#if defined(__AVX512BF16__)
    return "avx512bf16";
#else
    return "rounding";
#endif
}

/* The bf16 kernels and their packing, up to this path's gemm_fast: CPUs with AVX512-BF16 */
#if defined(__AVX512BF16__)
/* acc[i][0..FNR) for the rows i < mr (in blocks of 8: only those a partial strip needs):
 * Σ_k a[i][k]·b[k][j], k in pairs */
static void dot_block(int kcp, const uint16_t *a, const uint16_t *b, float *acc, int mr) {
    for (int i0 = 0; i0 < mr; i0 += 8) {
        __m512 c[8][2];
        for (int i = 0; i < 8; i++) c[i][0] = c[i][1] = _mm512_setzero_ps();
        for (int kp = 0; kp < kcp / 2; kp++) {
            __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kp * 2 * FNR);
            __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kp * 2 * FNR + 32);
            for (int i = 0; i < 8; i++) {
                int32_t pair;                  /* a[i][2kp], a[i][2kp+1] */
                memcpy(&pair, a + (size_t)(i0 + i) * kcp + 2 * kp, 4);
                __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
                c[i][0] = _mm512_dpbf16_ps(c[i][0], ai, b0);
                c[i][1] = _mm512_dpbf16_ps(c[i][1], ai, b1);
            }
        }
        for (int i = 0; i < 8; i++) {
            _mm512_storeu_ps(acc + (i0 + i) * FNR, c[i][0]);
            _mm512_storeu_ps(acc + (i0 + i) * FNR + 16, c[i][1]);
        }
    }
}


/* op(A)[i0 .. i0+mr, p0 .. p0+kc] -> one bf16 strip [FMR][kcp], zero padded */
static void pack_A_bf16(uint16_t *ap, const gemm_args *g, int i0, int mr, int p0, int kc, int kcp) {
    for (int i = 0; i < FMR; i++, ap += kcp) {
        int p = 0;
        if (i < mr && !g->transA) {
            const float *s = g->A + (int64_t)(i0 + i) * g->lda + p0;
            for (; p + 32 <= kc; p += 32)      /* vcvtne2ps2bf16: also nearest-even (denormals flushed) */
                _mm512_storeu_si512(ap + p, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + p + 16), _mm512_loadu_ps(s + p)));
            for (; p < kc; p++) ap[p] = zi_f32_to_bf16(s[p]);
        } else if (i < mr) {
            for (; p < kc; p++) ap[p] = zi_f32_to_bf16(g->A[(int64_t)(p0 + p) * g->lda + i0 + i]);
        }
        for (; p < kcp; p++) ap[p] = 0;
    }
}

/* op(B)[p0 .. p0+kc, j0 .. j0+nr] -> one bf16 strip [kcp/2][FNR][2], zero padded */
static void pack_B_bf16(uint16_t *bp, const gemm_args *g, int p0, int kc, int kcp, int j0, int nr) {
    size_t es = zi_dtype_size(g->bt);
    const char *B = g->B;
    if (nr < FNR || kc < kcp) memset(bp, 0, (size_t)kcp * FNR * sizeof *bp);   /* else all written below */
    if (g->transB) {                       /* B stored [N, K]: column j of op(B) is contiguous */
        int j = 0;
        /* bf16 weights (the Linear layers): a pair of k is one 32-bit word, so the strip is an
         * 8 x 8 word transpose per block, as in pack_B */
        for (; g->bt == ZI_BF16 && kc % 16 == 0 && j + 8 <= nr; j += 8) {
            const char *src = B + ((int64_t)(j0 + j) * g->ldb + p0) * 2;
            for (int w = 0; 2 * w < kc; w += 8) {
                __m256 r[8];
                for (int t = 0; t < 8; t++) r[t] = _mm256_loadu_ps((const float *)(src + (int64_t)t * g->ldb * 2) + w);
                transpose8(r);
                for (int t = 0; t < 8; t++) _mm256_storeu_ps((float *)bp + (w + t) * FNR + j, r[t]);
            }
        }
        float col[FKC];
        for (; j < nr; j++) {
            zi_to_f32(col, B + ((int64_t)(j0 + j) * g->ldb + p0) * es, g->bt, (size_t)kc);
            for (int p = 0; p < kc; p++) bp[(p / 2) * 2 * FNR + 2 * j + (p & 1)] = zi_f32_to_bf16(col[p]);
        }
    } else {                               /* B stored [K, N]: row p of op(B) is contiguous */
        float row[FNR];
        for (int p = 0; p < kc; p++) {
            zi_to_f32(row, B + ((int64_t)(p0 + p) * g->ldb + j0) * es, g->bt, (size_t)nr);
            for (int j = 0; j < nr; j++) bp[(p / 2) * 2 * FNR + 2 * j + (p & 1)] = zi_f32_to_bf16(row[j]);
        }
    }
}

/* The fast path's zi_gemm. op(A) is packed in bf16 strips once per block of rows, as above;
 * op(B) is packed once too, for a range of columns at a time, by all threads, and shared by the
 * tasks: the bf16 kernels outrun the conversion, and repacking B in every task (as the exact
 * path does) would cost a third of their time. Tasks are rectangles of C of mb x nb (multiples
 * of 32 from the origin, so a block of C is whole or partial whatever the thread count). */
typedef struct {
    const gemm_args *g;
    packed_A pa;                /* op(A) rows r0 .. r0+ms, bf16: slice pc at pc·Mp, strip at + i·kcp */
    const uint16_t *pb;         /* op(B) columns c0 .. c0+nw, bf16: slice pc at pc·Nw, strip at + j·kcp */
    int c0, nw, Nw, ms, mb, nmb, nb;
} fast_job;

static void fast_pack_A(void *ctx, int64_t begin, int64_t end) {
    const fast_job *f = ctx;
    for (int64_t s = begin; s < end; s++) {
        int i = (int)s * FMR, mr = f->ms - i < FMR ? f->ms - i : FMR;
        for (int pc = 0; pc < f->g->K; pc += FKC) {
            int kc = f->g->K - pc < FKC ? f->g->K - pc : FKC, kcp = (kc + 31) & ~31;
            pack_A_bf16((uint16_t *)f->pa.p + (size_t)pc * f->pa.Mp + (size_t)i * kcp, f->g, f->pa.r0 + i, mr, pc, kc, kcp);
        }
    }
}

static void fast_pack_B(void *ctx, int64_t begin, int64_t end) {
    const fast_job *f = ctx;
    for (int64_t s = begin; s < end; s++) {
        int j = (int)s * FNR, nr = f->nw - j < FNR ? f->nw - j : FNR;
        for (int pc = 0; pc < f->g->K; pc += FKC) {
            int kc = f->g->K - pc < FKC ? f->g->K - pc : FKC, kcp = (kc + 31) & ~31;
            pack_B_bf16((uint16_t *)f->pb + (size_t)pc * f->Nw + (size_t)j * kcp, f->g, pc, kc, kcp, f->c0 + j, nr);
        }
    }
}

/* C[i0 .. i0+m, j0 .. j0+n]: for each K slice, each 32-row strip of A (in L1) meets the task's
 * column strips of B (in L2) */
static void fast_tile(const fast_job *f, int i0, int m, int j0, int n) {
    const gemm_args *g = f->g;
    float acc[FMR * FNR] __attribute__((aligned(64)));
    for (int pc = 0; pc < g->K; pc += FKC) {
        int kc = g->K - pc < FKC ? g->K - pc : FKC, kcp = (kc + 31) & ~31;
        float beta = pc == 0 ? g->beta : 1.0f;     /* later slices accumulate into C */
        for (int ir = 0; ir < m; ir += FMR) {
            int mr = m - ir < FMR ? m - ir : FMR;
            const uint16_t *a = (const uint16_t *)f->pa.p + (size_t)pc * f->pa.Mp + (size_t)(i0 + ir - f->pa.r0) * kcp;
            for (int jr = 0; jr < n; jr += FNR) {
                int nr = n - jr < FNR ? n - jr : FNR;
                const uint16_t *b = f->pb + (size_t)pc * f->Nw + (size_t)(j0 + jr - f->c0) * kcp;
                float *c = g->C + (int64_t)(i0 + ir) * g->ldc + j0 + jr;
#ifdef ZI_AMX
                /* a whole block with alpha = 1 and beta 0 or 1: straight into C */
                if (amx_usable && mr == FMR && nr == FNR && g->alpha == 1.0f && (beta == 0.0f || beta == 1.0f)) {
                    amx_block(kcp, a, b, c, g->ldc, beta == 1.0f);
                    continue;
                }
                if (amx_usable) amx_block(kcp, a, b, acc, FNR, 0);
                else
#endif
                dot_block(kcp, a, b, acc, mr);
                tile_store(acc, FNR, c, g->ldc, mr, nr, g->alpha, beta);
            }
        }
    }
}

static void fast_task(void *ctx, int64_t begin, int64_t end) {
    const fast_job *f = ctx;
    for (int64_t t = begin; t < end; t++) {
        int i0 = f->pa.r0 + (int)(t % f->nmb) * f->mb, j0 = f->c0 + (int)(t / f->nmb) * f->nb;
        int m = f->pa.r0 + f->ms - i0 < f->mb ? f->pa.r0 + f->ms - i0 : f->mb;
        int n = f->c0 + f->nw - j0 < f->nb ? f->c0 + f->nw - j0 : f->nb;
        fast_tile(f, i0, m, j0, n);
    }
}

#ifdef ZI_AMX
/* AMX with the weight as stored. A bf16 Linear weight W [N, K] is row-major with consecutive
 * k, which is exactly an AMX A tile (16 rows x 32 k), so the product is computed transposed,
 * Cᵀ = W · op(A)ᵀ: W's tiles come from the (mmap'd) weight as it is, never converted or
 * rearranged (at most copied a slice at a time, amx_wx_copy), and only op(A) — M x K, far
 * smaller than W when M is a few hundred tokens — is packed, as the B operand: per block of
 * 32 rows, [K/2][32][2] (a pair of consecutive k of one row is one 32-bit word). Each 32 x 32
 * block of C is summed in four tiles, FKC slices of K in order, by one task (so any thread
 * count gives the same bits), and transposed on the way out. The packed-B path above remains
 * for other operands (f32/f16 B, B not transposed, K or N not a multiple of 32). */
typedef struct {
    const gemm_args *g;
    uint16_t *xp;               /* op(A) packed: block b (rows 32b ..) at xp + b·32·K */
    int nmblk, mtasks;          /* 32-row blocks of op(A), split into mtasks near-equal runs */
    int unit, nunits, nranges;  /* W in units of `unit` rows, split into nranges near-equal runs */
} amx_wx_job;

/* op(A) rows [32b, 32b + 32) x k [k0, k1) -> xp (rows past M are zeros) */
static void amx_wx_pack(void *ctx, int64_t begin, int64_t end) {
    const amx_wx_job *j = ctx;
    const gemm_args *g = j->g;
    int nk = (g->K + 255) / 256;
    for (int64_t t = begin; t < end; t++) {
        int b = (int)(t / nk), k0 = (int)(t % nk) * 256, k1 = k0 + 256 < g->K ? k0 + 256 : g->K;
        uint16_t *dst = j->xp + (size_t)b * 32 * g->K;
        /* 32 k at a time: rounded as pack_A_bf16 does, the 16 pairs scattered 32 words apart */
        const __m512i at = _mm512_setr_epi32(0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448, 480);
        for (int i = 0; i < 32; i++) {
            int m = b * 32 + i, k = k0;
            for (; m < g->M && !g->transA && k < k1; k += 32) {
                const float *s = g->A + (int64_t)m * g->lda + k;
                _mm512_i32scatter_epi32((int *)dst + (size_t)(k / 2) * 32 + i, at,
                                        (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + 16), _mm512_loadu_ps(s)), 4);
            }
            for (; k < k1; k++) {
                float v = m >= g->M ? 0.0f : g->transA ? g->A[(int64_t)k * g->lda + m] : g->A[(int64_t)m * g->lda + k];
                dst[(size_t)(k / 2) * 64 + 2 * i + (k & 1)] = zi_f32_to_bf16(v);
            }
        }
    }
}

/* Rows 0..15 of a 16 x 16 block (rows `ld` floats apart) transposed into r[0..15]. */
static void transpose16(const float *src, int ld, __m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ld);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {          /* r[i + c]: in each 128-bit lane l, column 4l + c of rows i .. i+3 */
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int h = 0; h < 16; h += 8)            /* lanes 0, 2 and 1, 3 of rows h .. h+3 and h+4 .. h+7 */
        for (int c = 0; c < 4; c++) {
            t[h + c] = _mm512_shuffle_f32x4(r[h + c], r[h + 4 + c], 0x88);
            t[h + 4 + c] = _mm512_shuffle_f32x4(r[h + c], r[h + 4 + c], 0xdd);
        }
    for (int c = 0; c < 8; c++) {              /* column c and c + 8 of all 16 rows */
        r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
        r[c + 8] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);
    }
}

/* W rows n0 .. n0+31, k [k0, k0 + kc) -> wc [32][FKC], whose rows are 768 bytes apart. In place
 * they are 2·K bytes apart, which the 64 sets of the 12-way L1 (4 KB apart) repeat: the 32 rows
 * of a tile step fall in one set at K = 10240 (20 KB), in 8 at K = 3840, and the slice could not
 * stay in L1 while it meets every row block. The copy made the DiT's layers 10-30% faster. */
static void amx_wx_copy(const gemm_args *g, int n0, int k0, int kc, uint16_t *wc) {
    for (int r = 0; r < 32; r++) {
        const uint16_t *w = (const uint16_t *)g->B + (int64_t)(n0 + r) * g->ldb + k0;
        for (int k = 0; k < kc; k += 32) _mm512_store_si512(wc + r * FKC + k, _mm512_loadu_si512(w + k));
    }
}

/* ct[32][32] (Cᵀ block: [n][m]) += the K slice [k0, k0 + kc) of W rows n0 .. n0+31 (wc, from
 * amx_wx_copy) times packed rows m0 .. m0+31 (x: their block at k0); first: ct starts from zero.
 * The x tiles come from L2, and a tile register is not reused before its products are done, so
 * each tile step's 2 KB of x is prefetched into L1 X_AHEAD steps ahead, past the slice's end
 * into the next row block's (xn, NULL if none): dit512 --fast 5-10% faster in five alternating
 * pairs of runs (16-core Xeon), where 1 and 4 steps measured about the same. */
enum { X_AHEAD = 2 };
static void amx_wx_slice(const uint16_t *w, int kc, const uint16_t *x, const uint16_t *xn, float *ct, int first) {
    const int64_t ldw = FKC * 2;
    amx_configure();
    if (first) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    } else {
        _tile_loadd(0, ct, 128); _tile_loadd(1, ct + 16, 128);
        _tile_loadd(2, ct + 16 * 32, 128); _tile_loadd(3, ct + 16 * 32 + 16, 128);
    }
    for (int k = 0; k < kc; k += 32) {
        int ka = k + X_AHEAD * 32;
        const char *xa = ka < kc ? (const char *)(x + (size_t)ka * 32) : xn ? (const char *)(xn + (size_t)(ka - kc) * 32) : NULL;
        for (int l = 0; xa && l < 32; l++) _mm_prefetch(xa + 64 * l, _MM_HINT_T0);
        _tile_loadd(4, w + k, ldw);                    /* W rows n0 .. n0+15 */
        _tile_loadd(5, w + 16 * FKC + k, ldw);         /* rows n0+16 .. n0+31 */
        _tile_loadd(6, x + (size_t)k * 32, 128);       /* pairs of k, rows m0 .. m0+15 */
        _tile_loadd(7, x + (size_t)k * 32 + 32, 128);  /* rows m0+16 .. m0+31 */
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, ct, 128); _tile_stored(1, ct + 16, 128);
    _tile_stored(2, ct + 16 * 32, 128); _tile_stored(3, ct + 16 * 32 + 16, 128);
}

/* C[m0 .. m0+mr, n0 .. n0+nr] = alpha · ctᵀ + beta · C (nr: 16 or 32 rows of ct) */
static void amx_wx_store(const gemm_args *g, const float *ct, int m0, int mr, int n0, int nr) {
    __m512 alpha = _mm512_set1_ps(g->alpha), beta = _mm512_set1_ps(g->beta);
    for (int mh = 0; mh < 32 && mh < mr; mh += 16)
        for (int nh = 0; nh < nr; nh += 16) {
            __m512 r[16];
            transpose16(ct + nh * 32 + mh, 32, r);     /* r[i]: row m0+mh+i, columns n0+nh .. +16 */
            for (int i = 0; i < 16 && mh + i < mr; i++) {
                float *c = g->C + (int64_t)(m0 + mh + i) * g->ldc + n0 + nh;
                __m512 v = _mm512_mul_ps(alpha, r[i]);
                if (g->beta != 0.0f) v = _mm512_fmadd_ps(beta, _mm512_loadu_ps(c), v);
                _mm512_storeu_ps(c, v);
            }
        }
}

/* The single row block (M ≤ 32: the text encoder), W rows n0 .. n0+15 over the whole K into
 * ct[16][32]: W meets no other block, so nothing is gained by slicing K, and the sums stay in
 * two tiles. W is read 16 rows at a time, not 32: half as many streams from memory per core,
 * which measured faster for this layer-sized streaming. Each row is also prefetched (into L1)
 * RW_AHEAD tile steps ahead: the hardware prefetchers alone, tracking 16 streams per core,
 * left the 16-core text encoder at 1.9-2.0x the time to stream its weights, against 1.5-1.8x
 * with this (4, 16 or 32 steps ahead, or into L2 only, measured slower: bench/README.md).
 * Past a row's end it fetches the start of the next row (of this unit or the next), which
 * is read soon anyway. The sums are those of the 32-row blocks of the general path, bit for
 * bit (each element's tile products, in the same order). */
enum { RW_AHEAD = 8 };
static void amx_wx_rows16(const gemm_args *g, int n0, const uint16_t *x, float *ct) {
    const uint16_t *w = (const uint16_t *)g->B + (int64_t)n0 * g->ldb;
    amx_configure();
    _tile_zero(0); _tile_zero(1);
    for (int k = 0; k < g->K; k += 32) {
        for (int r = 0; r < 16; r++) _mm_prefetch((const char *)(w + r * g->ldb + k + RW_AHEAD * 32), _MM_HINT_T0);
        _tile_loadd(4, w + k, g->ldb * 2);             /* W rows n0 .. n0+15 */
        _tile_loadd(6, x + (size_t)k * 32, 128);       /* pairs of k, rows 0 .. 15 */
        _tile_loadd(7, x + (size_t)k * 32 + 32, 128);  /* rows 16 .. 31 */
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
    }
    _tile_stored(0, ct, 128); _tile_stored(1, ct + 16, 128);
}

/* A task: a run of W's units against a run of 32-row blocks of op(A) (at most 1024 rows, their
 * K slice in L2), one K slice of FKC at a time: each 32 x FKC slice of W (24 KB) is read once,
 * from memory, into a contiguous copy that meets every row block in L1; the partial Cᵀ blocks wait
 * in ct between slices. (Software prefetch of W, other slice depths and task shapes measured no
 * better: bench/README.md.) A single row block streams its units of 16 W rows instead. */
static void amx_wx_task(void *ctx, int64_t begin, int64_t end) {
    const amx_wx_job *j = ctx;
    const gemm_args *g = j->g;
    for (int64_t t = begin; t < end; t++) {
        int mi = (int)(t % j->mtasks), ri = (int)(t / j->mtasks);
        int b0 = (int)((int64_t)mi * j->nmblk / j->mtasks), b1 = (int)((int64_t)(mi + 1) * j->nmblk / j->mtasks);
        int n0 = (int)((int64_t)ri * j->nunits / j->nranges) * j->unit;
        int n1 = (int)((int64_t)(ri + 1) * j->nunits / j->nranges) * j->unit, mb = b1 - b0;
        if (j->nmblk == 1) {
            float *ct = scratch(0, 16 * 32);
            for (int n = n0; n < n1; n += 16) {
                amx_wx_rows16(g, n, j->xp, ct);
                amx_wx_store(g, ct, 0, g->M, n, 16);
            }
            continue;
        }
        float *ct = scratch(0, (size_t)(n1 - n0) / 32 * mb * 1024);
        uint16_t *wc = (uint16_t *)scratch(1, 32 * FKC / 2);
        for (int k0 = 0; k0 < g->K; k0 += FKC) {
            int kc = g->K - k0 < FKC ? g->K - k0 : FKC;
            for (int n = n0; n < n1; n += 32) {
                amx_wx_copy(g, n, k0, kc, wc);
                for (int b = b0; b < b1; b++)
                    amx_wx_slice(wc, kc, j->xp + (size_t)b * 32 * g->K + (size_t)k0 * 32,
                                 b + 1 < b1 ? j->xp + (size_t)(b + 1) * 32 * g->K + (size_t)k0 * 32 : NULL,
                                 ct + ((size_t)(n - n0) / 32 * mb + (b - b0)) * 1024, k0 == 0);
            }
        }
        for (int n = n0; n < n1; n += 32)
            for (int b = b0; b < b1; b++)
                amx_wx_store(g, ct + ((size_t)(n - n0) / 32 * mb + (b - b0)) * 1024, b * 32,
                             g->M - b * 32 < 32 ? g->M - b * 32 : 32, n, 32);
    }
}

static int amx_wx_fits(const gemm_args *g) {
    return amx_usable && g->transB && g->bt == ZI_BF16 && g->K % 32 == 0 && g->N % 32 == 0;
}

static int gcd(int a, int b) { return b ? gcd(b, a % b) : a; }

static void amx_wx(const gemm_args *g, int T) {
    amx_wx_job j = { g, NULL, (g->M + 31) / 32, 0, g->M <= 32 ? 16 : 32, 0, 0 };
    j.xp = (uint16_t *)scratch(3, (size_t)j.nmblk * 32 * g->K / 2);
    run_tasks(T, (int64_t)j.nmblk * ((g->K + 255) / 256), amx_wx_pack, &j);
    /* Tasks of near-equal work, about four per thread and, where W has the units for it, a
     * multiple of T of them: with equal tasks one more than a multiple of T would keep a
     * single thread busy for a whole extra round. */
    j.mtasks = (j.nmblk + 31) / 32;
    j.nunits = g->N / j.unit;
    int step = T / gcd(j.mtasks, T), want = (4 * T + j.mtasks - 1) / j.mtasks;
    j.nranges = (want + step - 1) / step * step;
    j.nranges = j.nranges < j.nunits ? j.nranges : j.nunits;
    run_tasks(T, (int64_t)j.mtasks * j.nranges, amx_wx_task, &j);
}
#endif

static void gemm_fast(const gemm_args *g, int T) {
    zi_fast_kernel();                          /* asks for the AMX state once */
#ifdef ZI_AMX
    if (amx_wx_fits(g)) {
        amx_wx(g, T);
        return;
    }
#endif
    int64_t Kp = g->K / FKC * FKC + ((g->K % FKC + 31) & ~31);   /* K padded to whole tiles per slice */
    /* rows of op(A) and columns of op(B) packed at a time: 2·A_PACK_FLOATS bf16 each */
    int per = (int)(2 * A_PACK_FLOATS / Kp) / FMR * FMR;
    per = per < FMR ? FMR : per;
    int ms_max = per < (g->M + FMR - 1) / FMR * FMR ? per : (g->M + FMR - 1) / FMR * FMR;
    int nw_max = per < (g->N + FNR - 1) / FNR * FNR ? per : (g->N + FNR - 1) / FNR * FNR;
    float *ap = scratch(3, (size_t)ms_max * Kp / 2), *bp = scratch(5, (size_t)nw_max * Kp / 2);
    for (int r0 = 0; r0 < g->M; r0 += ms_max) {
        fast_job f = { g, { ap, r0, 0 }, (const uint16_t *)bp, 0, 0, 0, g->M - r0 < ms_max ? g->M - r0 : ms_max, 0, 1, 0 };
        f.pa.Mp = (f.ms + FMR - 1) / FMR * FMR;
        run_tasks(T, f.pa.Mp / FMR, fast_pack_A, &f);
        for (f.c0 = 0; f.c0 < g->N; f.c0 += nw_max) {
            f.nw = g->N - f.c0 < nw_max ? g->N - f.c0 : nw_max;
            f.Nw = (f.nw + FNR - 1) / FNR * FNR;
            run_tasks(T, f.Nw / FNR, fast_pack_B, &f);
            /* tasks: about three per thread, NC columns wide (each packed row of A is read by
             * few tasks), rows split down to 2·FMR */
            f.nb = NC / FNR * FNR < f.Nw ? NC / FNR * FNR : f.Nw;
            int ncb = (f.nw + f.nb - 1) / f.nb, nmb = 1;
            while (ncb * nmb < 3 * T && (f.ms + nmb) / (nmb + 1) >= 2 * FMR) nmb++;
            f.mb = ((f.ms + nmb - 1) / nmb + FMR - 1) / FMR * FMR;
            f.nmb = (f.ms + f.mb - 1) / f.mb;
            run_tasks(T, (int64_t)ncb * f.nmb, fast_task, &f);
        }
    }
}
#else
/* no bf16 arithmetic: the exact kernels, on operands rounded to bf16 as they are packed */
static void gemm_fast(const gemm_args *g, int T) {
    gemm_args r = *g;
    r.round_bf16 = 1;
    gemm_exact(&r, T);
}
#endif

/* ---------------------------------------------------------------- GEMM for few rows
 * y = x·Wᵀ for a short sequence (the text encoder: M ≈ 32 tokens, W [N, K] bf16). Each element
 * of W meets only M rows of x there, so the packed path's conversion and transposition of W
 * into panels is paid for few products (and MR rarely divides M). Here the roles are swapped:
 * Cᵀ = W·xᵀ, with W the broadcast operand, read along its rows as stored. xᵀ is packed once per
 * call into strips of NR rows of x ([K][NR] each, zero padded). W is taken MR rows at a time (a
 * group; a task is a range of groups): for each K slice of KC, the group's slice is converted
 * to fp32 rows (no transpose) and micro_rows multiplies it with each strip's slice (in L1).
 * The results are the packed path's, bit for bit: each C element is summed in the same order
 * (k in order within a KC slice, from zero; slices added in order, the first to beta·C), here
 * in a small buffer [MR][Mp] stored into C, transposed, at the end. So a row of C depends
 * neither on how many rows are computed together (batches, tiles) nor on the thread count.
 * W is read from memory once: while a group is computed, the next group's rows (contiguous in
 * a weight matrix) are prefetched, a few lines per micro_rows call spread over its loop, so
 * that the memory traffic overlaps the arithmetic.
 * Used for transB (any dtype of B) and alpha = 1 (a Linear layer: another alpha would need the
 * packed path's rounding of alpha·acc per slice, and a vector register AVX2 lacks) when
 * NR/2 <= M <= SMALL_M. Measured on Zen 3 (AVX2, one thread, N x K = 4096 x 2560, best of
 * several runs): with bf16 W this path beats the packed one from M = 8 (M = 16: 67 against 41
 * GFLOP/s; M = 32: 80-90% of the fp32 peak against 50-65%) to M ~ 200; with f16 or f32 W up to
 * M ~ 32-64 (beyond, the packed path's reuse of op(B) panels across MR-row strips wins). Below
 * NR/2 rows, xᵀ's padding to NR rows costs more than the packed path's to MR (M = 1: 2.5
 * against 3.7 GFLOP/s). */
enum { SMALL_M = 64, SMALL_MP = (SMALL_M + NR - 1) / NR * NR };

/* acc[MR][NR] = Σ_p a[i·KC + p] ⊗ b[p][0..NR) over kc (a: MR rows of W as fp32; b: a slice of
 * a strip of xᵀ), then the tile of c (MR x NR, rows ldc apart) = acc (first) or c + acc: the
 * packed path's alpha·acc and fma(alpha, acc, c) for alpha = 1. Meanwhile prefetches npf lines
 * from pf on, spread over the loop (a burst of them at once would stall it, waiting for free
 * miss buffers). */
#if defined(__AVX512F__)
static void micro_rows(int kc, const float *a, const float *b, float *c, int ldc, int first,
                       const char *pf, int npf) {
    __m512 acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    int per = (npf * 8 + kc - 1) / kc;         /* lines to prefetch every 8 steps */
    for (int p = 0; p < kc; p++, b += NR) {
        if (p % 8 == 0)
            for (int l = 0; l < per && npf > 0; l++, npf--, pf += 64) __builtin_prefetch(pf);
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        for (int i = 0; i < MR; i++) {
            __m512 ai = _mm512_set1_ps(a[i * KC + p]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 2; j++) {
            float *t = c + i * ldc + 16 * j;
            _mm512_storeu_ps(t, first ? acc[i][j] : _mm512_add_ps(acc[i][j], _mm512_loadu_ps(t)));
        }
}
#elif defined(__AVX2__) && defined(__FMA__)
static void micro_rows(int kc, const float *a, const float *b, float *c, int ldc, int first,
                       const char *pf, int npf) {
    __m256 acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    int per = (npf * 8 + kc - 1) / kc;         /* lines to prefetch every 8 steps */
    for (int p = 0; p < kc; p++, b += NR) {
        if (p % 8 == 0)
            for (int l = 0; l < per && npf > 0; l++, npf--, pf += 64) __builtin_prefetch(pf);
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        for (int i = 0; i < MR; i++) {
            __m256 ai = _mm256_broadcast_ss(a + i * KC + p);
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 2; j++) {
            float *t = c + i * ldc + 8 * j;
            _mm256_storeu_ps(t, first ? acc[i][j] : _mm256_add_ps(acc[i][j], _mm256_loadu_ps(t)));
        }
}
#else
static void micro_rows(int kc, const float *a, const float *b, float *c, int ldc, int first,
                       const char *pf, int npf) {
    float acc[MR * NR] = {0};
    for (int l = 0; l < npf; l++) __builtin_prefetch(pf + 64 * l);
    for (int p = 0; p < kc; p++, b += NR)
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[i * NR + j] += a[i * KC + p] * b[j];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) c[i * ldc + j] = first ? acc[i * NR + j] : acc[i * NR + j] + c[i * ldc + j];
}
#endif

typedef struct { const gemm_args *g; float *xt; int Mp, ngroups, ntasks; } small_job;

/* op(A) as strips of NR rows: xt[s][k][j] = op(A)[s·NR + j][k], zero past row M. Items: a
 * strip's k in blocks of 256, whose 16 KB (AVX2) of xt stay in L1 while the strip's rows are
 * written into it one after another. (Written whole by the calling thread, strip by strip, it
 * took 0.12 ms at K = 2560 and 0.66 ms at K = 9728 on the 2-core EPYC, 50 ms of each text
 * encoder call: 2% there, but a part that more threads did not shorten.) */
static void small_pack_x(void *ctx, int64_t begin, int64_t end) {
    const small_job *sj = ctx;
    const gemm_args *g = sj->g;
    int nkb = (g->K + 255) / 256;
    for (int64_t t = begin; t < end; t++) {
        int s = (int)(t / nkb) * NR, k0 = (int)(t % nkb) * 256, k1 = k0 + 256 < g->K ? k0 + 256 : g->K;
        float *xt = sj->xt + (size_t)s * g->K;
        for (int j = 0; j < NR; j++) {
            int i = s + j;
            for (int k = k0; k < k1; k++)
                xt[(size_t)k * NR + j] = i >= g->M ? 0 : g->transA ? g->A[(int64_t)k * g->lda + i] : g->A[(int64_t)i * g->lda + k];
        }
        if (g->round_bf16) round_to_bf16(xt + (size_t)k0 * NR, (size_t)(k1 - k0) * NR);
    }
}

/* C's columns j .. j+n (n <= MR: one group of W's rows), every row */
static void small_group(const small_job *s, int j, int n) {
    const gemm_args *g = s->g;
    size_t es = zi_dtype_size(g->bt);
    float wf[MR * KC], acc[MR * SMALL_MP];     /* W's rows in fp32; Cᵀ's rows j .. j+MR */
    memset(wf + n * KC, 0, (size_t)(MR - n) * KC * sizeof(float));   /* rows past N */
    if (g->beta != 0) {                        /* the first slice adds to beta·C, as in tile_store */
        memset(acc, 0, sizeof acc);
        for (int i = 0; i < g->M; i++)
            for (int r = 0; r < n; r++) acc[r * s->Mp + i] = g->beta * g->C[(int64_t)i * g->ldc + j + r];
    }
    /* the next group's rows: `lines` lines from row j + n on (rows·K values: within W even when
     * ldb > K), npf of them during each micro_rows call */
    int64_t lines = (int64_t)(g->N - j - n < MR ? g->N - j - n : MR) * g->K * es / 64, done = 0;
    const char *next = lines ? (const char *)g->B + (int64_t)(j + n) * g->ldb * es : g->B;
    int calls = (g->K + KC - 1) / KC * (s->Mp / NR), npf = (int)((lines + calls - 1) / calls);
    for (int pc = 0; pc < g->K; pc += KC) {
        int kc = g->K - pc < KC ? g->K - pc : KC;
        for (int r = 0; r < n; r++) {
            zi_to_f32(wf + r * KC, (const char *)g->B + ((int64_t)(j + r) * g->ldb + pc) * es, g->bt, (size_t)kc);
            if (g->round_bf16 && g->bt != ZI_BF16) round_to_bf16(wf + r * KC, (size_t)kc);
        }
        for (int m = 0; m < s->Mp; m += NR) {
            int nf = lines - done < npf ? (int)(lines - done) : npf;
            micro_rows(kc, wf, s->xt + (size_t)m * g->K + (size_t)pc * NR, acc + m, s->Mp, pc == 0 && g->beta == 0,
                       next + 64 * done, nf);
            done += nf;
        }
    }
    for (int i = 0; i < g->M; i++)
        for (int r = 0; r < n; r++) g->C[(int64_t)i * g->ldc + j + r] = acc[r * s->Mp + i];
}

/* tasks [begin, end): each a run of consecutive groups (so that the prefetch of the next group
 * serves the same thread, and two threads share no line of C) */
static void small_task(void *ctx, int64_t begin, int64_t end) {
    const small_job *s = ctx;
    for (int64_t t = begin; t < end; t++)
        for (int64_t q = t * s->ngroups / s->ntasks; q < (t + 1) * s->ngroups / s->ntasks; q++) {
            int j = (int)q * MR;
            small_group(s, j, s->g->N - j < MR ? s->g->N - j : MR);
        }
}

static void gemm_small(const gemm_args *g, int T) {
    int Mp = (g->M + NR - 1) / NR * NR;
    small_job s = { g, scratch(3, (size_t)Mp * g->K), Mp, (g->N + MR - 1) / MR, 0 };
    run_tasks(T, (int64_t)Mp / NR * ((g->K + 255) / 256), small_pack_x, &s);
    s.ntasks = s.ngroups < 4 * T ? s.ngroups : 4 * T;   /* four near-equal runs per thread */
    run_tasks(T, s.ntasks, small_task, &s);
}

static void gemm_run(int transA, int transB, int M, int N, int K, float alpha,
                     const float *A, int64_t lda, const void *B, zi_dtype bt, int64_t ldb,
                     float beta, float *C, int64_t ldc) {
    check_gemm_dtype(bt);
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {                              /* empty sum: C = beta·C */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) C[(int64_t)i * ldc + j] = beta == 0 ? 0 : beta * C[(int64_t)i * ldc + j];
        return;
    }
    gemm_args g = { transA, transB, M, N, K, alpha, beta, A, lda, B, bt, ldb, C, ldc, 0 };
    int T = zi_nthreads();
    if ((double)M * N * K < 1e6) T = 1;        /* too small to be worth waking the pool */
    if (zi_fast()) gemm_fast(&g, T);
    else gemm_exact(&g, T);
}

/* The fp32 kernels: the few-row path or the packed one */
static void gemm_exact(const gemm_args *g, int T) {
    int M = g->M, N = g->N, K = g->K;
    if (g->transB && M >= NR / 2 && M <= SMALL_M && g->alpha == 1) {
        gemm_small(g, T);
        return;
    }
    /* Tasks: about three per thread. Columns are split first (down to single NR strips), so
     * that each B panel is converted once; rows only when there are too few strips, each task
     * packing the same B panels again, so not below 4·MR rows. A single strip (N <= NR: a LoRA
     * adapter's x·Aᵀ or dy·B, N = the rank) is packed once for all tasks instead, and its rows
     * are split down to MR: 24 tasks at 288 rows rather than 6 (16 cores: 2.5x faster). */
    int want = 3 * T, strips = (N + NR - 1) / NR, spb = (strips + want - 1) / want;
    spb = spb > NC / NR ? NC / NR : spb;
    int nb = spb * NR, ncb = (N + nb - 1) / nb;
    int ms_max = A_PACK_FLOATS / K / MR * MR;
    if (ms_max < MR) ms_max = MR;
    if (ms_max > (M + MR - 1) / MR * MR) ms_max = (M + MR - 1) / MR * MR;
    float *ap = scratch(3, (size_t)ms_max * K);
    gemm_job jb = { g, { ap, 0, 0 }, NULL, 0, 0, 0, nb };
    if (strips == 1) {
        jb.pb = scratch(5, (size_t)K * NR);
        run_tasks(T, (K + KC - 1) / KC, pack_B_slices, &jb);
    }
    for (int r0 = 0; r0 < M; r0 += ms_max) {
        int ms = M - r0 < ms_max ? M - r0 : ms_max, nmb = 1;
        while (ncb * nmb < want && (ms + nmb) / (nmb + 1) >= (jb.pb ? MR : 4 * MR)) nmb++;
        jb.mb = ((ms + nmb - 1) / nmb + MR - 1) / MR * MR;
        jb.pa = (packed_A){ ap, r0, (ms + MR - 1) / MR * MR };
        jb.ms = ms, jb.nmb = (ms + jb.mb - 1) / jb.mb;
        run_tasks(T, jb.pa.Mp / MR, pack_A_strips, &jb);
        run_tasks(T, (int64_t)ncb * jb.nmb, gemm_task, &jb);
    }
}

void zi_gemm(int transA, int transB, int M, int N, int K, float alpha,
             const float *A, int64_t lda, const void *B, zi_dtype bt, int64_t ldb,
             float beta, float *C, int64_t ldc) {
    double t0 = zi_now();
    gemm_run(transA, transB, M, N, K, alpha, A, lda, B, bt, ldb, beta, C, ldc);
    kernel_time.gemm += zi_now() - t0;
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
enum { ATT_BQ = 256, ATT_BK = 128 };
/* a task packs the key/value blocks up to its causal limit, which must fall on a key-block
 * boundary: hence whole key blocks per query block */
_Static_assert(ATT_BQ % ATT_BK == 0, "ATT_BQ must be a multiple of ATT_BK");

/* floats of one packed key block (D x ATT_BK) and value block (ATT_BK x D), see pack_B_all */
static size_t att_kstride(int D) { return (size_t)D * ((ATT_BK + NR - 1) / NR * NR); }
static size_t att_vstride(int D) { return (size_t)ATT_BK * ((D + NR - 1) / NR * NR); }

typedef struct {
    float *out; int64_t ldo;
    const float *q, *k, *v; int64_t ldq, ldk, ldv;
    int Sq, Sk, Hq, Hkv, D, causal, n_keys, nqb;
    int qchunk, nchunks;    /* a task: one head, qchunk query blocks (nchunks tasks per head) */
    float scale;
    float *lse;
    float *kv;              /* NULL, or every kv head's K and V packed once (att_pack_shared) */
    int nkb;                /* key blocks of kv: of the first min(n_keys, Sk) keys */
} att_args;

/* e^x for x <= 0 (softmax arguments), within 2 ulp: x = n·ln 2 + r with |r| <= ln2/2, e^r by
 * Cephes' degree-6 polynomial, 2^n added to the exponent bits. Below -86 (e^x < 5e-38) the
 * result is 0, selected by a bit mask: without branches, loops over it vectorise. */
static inline float exp_le0(float x) {
    float t = x * 1.44269504f + 12582912.0f;  /* 1.5·2^23: round(x·log2 e) lands in the low bits */
    float n = t - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;    /* ln 2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    /* NaN is kept (p is NaN then): a NaN score must reach the output, as in PyTorch */
    uint32_t pu = f32_bits(p), keep = 0u - (uint32_t)!(x < -86.0f);
    return bits_f32((pu + ((f32_bits(t) - 0x4b400000u) << 23)) & keep);
}

/* max(init, s[0..n)) */
static float row_max(const float *s, int n, float init) {
    int j = 0;
#ifdef __AVX__
    __m256 m8 = _mm256_set1_ps(init);
    for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
    float t[8];
    _mm256_storeu_ps(t, m8);
    for (int k = 0; k < 8; k++) init = t[k] > init ? t[k] : init;
#endif
    for (; j < n; j++) init = s[j] > init ? s[j] : init;
    return init;
}

/* Online-softmax update of one query row with its block of scores s[0..bk) (keys j0..);
 * keys at or past `lim` are masked. s becomes P (zeros where masked). Returns the factor
 * by which the row's running output must be rescaled. */
static float softmax_update(float *s, int bk, int lim, float *m, float *l) {
    if (lim <= 0) {
        memset(s, 0, (size_t)bk * sizeof(float));
        return 1.0f;
    }
    float mx = row_max(s, lim, *m);
    float corr = *m == -INFINITY ? 0.0f : exp_le0(*m - mx), sum = 0;
    for (int j = 0; j < lim; j++) s[j] = exp_le0(s[j] - mx);
    /* the row sum in 8 interleaved partial sums (one vector add per 8 terms, not a chain of
     * dependent scalar adds), combined in a fixed order */
    float part[8] = {0};
    int j = 0;
    for (; j + 8 <= lim; j += 8)
        for (int k = 0; k < 8; k++) part[k] += s[j + k];
    for (; j < lim; j++) part[0] += s[j];
    sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (j = lim; j < bk; j++) s[j] = 0;
    *l = *l * corr + sum;
    *m = mx;
    return corr;
}

/* Kp, Vp: the head's key and value blocks, packed (see att_task) */
static void att_block(const att_args *a, int h, int q0, const float *Kp, const float *Vp) {
    int D = a->D, bq = a->Sq - q0 < ATT_BQ ? a->Sq - q0 : ATT_BQ;
    float *S = scratch(2, (size_t)ATT_BQ * ATT_BK + (size_t)(2 * ATT_BQ + MR) * D + 2 * ATT_BQ);
    float *O = S + ATT_BQ * ATT_BK, *m = O + (size_t)ATT_BQ * D, *l = m + ATT_BQ, *Qp = l + ATT_BQ;
    for (int i = 0; i < bq; i++) m[i] = -INFINITY, l[i] = 0;
    memset(O, 0, (size_t)bq * D * sizeof(float));
    /* S = scale·Q·Kᵀ: the query block is packed once, for all key blocks */
    gemm_args qk = { 0, 1, bq, 0, D, a->scale, 0.0f, a->q + (int64_t)q0 * a->ldq + (int64_t)h * D, a->ldq,
                     NULL, ZI_F32, a->ldk, S, ATT_BK, 0 };
    packed_A pq = { Qp, 0, (bq + MR - 1) / MR * MR };
    for (int s = 0; s * MR < bq; s++) pack_A_strip(&pq, &qk, s, bq - s * MR < MR ? bq - s * MR : MR);
    int kend = a->n_keys < a->Sk ? a->n_keys : a->Sk;
    if (a->causal && q0 + bq < kend) kend = q0 + bq;
    for (int j0 = 0; j0 < kend; j0 += ATT_BK) {
        int bk = kend - j0 < ATT_BK ? kend - j0 : ATT_BK;
        const float *kp = Kp + (size_t)(j0 / ATT_BK) * att_kstride(D), *vp = Vp + (size_t)(j0 / ATT_BK) * att_vstride(D);
        qk.N = bk;
        gemm_tile_pb(&qk, 0, bq, 0, bk, &pq, kp);
        for (int i = 0; i < bq; i++) {
            int lim = a->causal && q0 + i + 1 - j0 < bk ? q0 + i + 1 - j0 : bk;
            float corr = softmax_update(S + i * ATT_BK, bk, lim, &m[i], &l[i]);
            if (corr != 1.0f)
                for (int d = 0; d < D; d++) O[i * D + d] *= corr;
        }
        /* O += P·V */
        gemm_args pv = { 0, 0, bq, D, bk, 1.0f, 1.0f, S, ATT_BK, NULL, ZI_F32, a->ldv, O, D, 0 };
        gemm_tile_pb(&pv, 0, bq, 0, D, NULL, vp);
    }
    for (int i = 0; i < bq; i++) {
        float *o = a->out + (int64_t)(q0 + i) * a->ldo + (int64_t)h * D;
        /* l = 0: every key masked. A NaN l (NaN scores: NaN weights upstream) must stay NaN
         * rather than become zeros, so that the pipeline can see it (l >= 0 otherwise) */
        for (int d = 0; d < D; d++) o[d] = l[i] != 0 ? O[i * D + d] / l[i] : 0.0f;
        if (a->lse) a->lse[(int64_t)h * a->Sq + q0 + i] = l[i] != 0 ? m[i] + logf(l[i]) : -INFINITY;
    }
}

/* Key block jb (keys jb·ATT_BK .. up to kend) of kv head g, packed as the B operands of
 * S = Q·Kᵀ and O = P·V: block jb of the head's K blocks at Kp and of its V blocks at Vp */
static void att_pack_block(const att_args *a, int g, int jb, int kend, float *Kp, float *Vp) {
    int D = a->D, j0 = jb * ATT_BK, bk = kend - j0 < ATT_BK ? kend - j0 : ATT_BK;
    const float *k = a->k + (int64_t)j0 * a->ldk + (int64_t)g * D, *v = a->v + (int64_t)j0 * a->ldv + (int64_t)g * D;
    gemm_args kb = { 0, 1, 0, bk, D, 0, 0, NULL, 0, k, ZI_F32, a->ldk, NULL, 0, 0 };
    gemm_args vb = { 0, 0, 0, D, bk, 0, 0, NULL, 0, v, ZI_F32, a->ldv, NULL, 0, 0 };
    pack_B_all(Kp + (size_t)jb * att_kstride(D), &kb, 0, bk);
    pack_B_all(Vp + (size_t)jb * att_vstride(D), &vb, 0, D);
}

/* kv head g's blocks in the shared pack a->kv: its nkb K blocks at *Kp, then its V blocks */
static void att_shared_head(const att_args *a, int g, float **Kp, float **Vp) {
    *Kp = a->kv + (size_t)g * a->nkb * (att_kstride(a->D) + att_vstride(a->D));
    *Vp = *Kp + (size_t)a->nkb * att_kstride(a->D);
}

/* Every kv head's key blocks into a->kv, one item per (head, key block) */
static void att_pack_shared(void *ctx, int64_t begin, int64_t end) {
    const att_args *a = ctx;
    int kend = a->n_keys < a->Sk ? a->n_keys : a->Sk;
    for (int64_t t = begin; t < end; t++) {
        int g = (int)(t / a->nkb), jb = (int)(t % a->nkb);
        float *Kp, *Vp;
        att_shared_head(a, g, &Kp, &Vp);
        att_pack_block(a, g, jb, kend, Kp, Vp);
    }
}

/* A task: query blocks c·qchunk .. of head h, chunk-major (t = c·Hq + h: a head's last query
 * block, often partial, comes in the last round). Without a shared pack the task packs its
 * head's keys and values (those any of its queries may see) itself, once for all its blocks. */
static void att_task(void *ctx, int64_t begin, int64_t end) {
    const att_args *a = ctx;
    int D = a->D;
    for (int64_t t = begin; t < end; t++) {
        int h = (int)(t % a->Hq), g = h / (a->Hq / a->Hkv), qb0 = (int)(t / a->Hq) * a->qchunk;
        int qb1 = qb0 + a->qchunk < a->nqb ? qb0 + a->qchunk : a->nqb;
        int kend = a->n_keys < a->Sk ? a->n_keys : a->Sk, qend = qb1 * ATT_BQ < a->Sq ? qb1 * ATT_BQ : a->Sq;
        if (a->causal && qend < kend) kend = qend;
        int nkb = (kend + ATT_BK - 1) / ATT_BK;
        float *Kp, *Vp;
        if (a->kv) {                               /* packed once for all tasks */
            att_shared_head(a, g, &Kp, &Vp);
        } else {                                   /* this task's own copy of the head's blocks */
            Kp = scratch(4, (size_t)nkb * (att_kstride(D) + att_vstride(D)));
            Vp = Kp + (size_t)nkb * att_kstride(D);
            for (int jb = 0; jb < nkb; jb++) att_pack_block(a, g, jb, kend, Kp, Vp);
        }
        for (int qb = qb0; qb < qb1; qb++) att_block(a, h, qb * ATT_BQ, Kp, Vp);
    }
}

void zi_attention(float *out, int64_t ldo, const float *q, int64_t ldq,
                  const float *k, int64_t ldk, const float *v, int64_t ldv,
                  int Sq, int Sk, int Hq, int Hkv, int D, float scale, int causal,
                  int n_keys, float *lse) {
    if (Sq <= 0 || Hq <= 0) return;
    if (Hkv <= 0 || Hq % Hkv) zi_die("zi_attention: %d query heads is not a multiple of %d kv heads", Hq, Hkv);
    int nqb = (Sq + ATT_BQ - 1) / ATT_BQ, T = zi_nthreads();
    att_args a = { out, ldo, q, k, v, ldq, ldk, ldv, Sq, Sk, Hq, Hkv, D, causal, n_keys, nqb,
                   1, nqb, scale, lse, NULL, 0 };
    double t0 = zi_now();
    if (!causal && (Hq < 3 * T || Hkv < T)) {
        /* Too few heads for tasks of whole heads to keep every thread busy (the DiT's 30 on 16
         * threads), or several tasks would pack the same kv head: every kv head's K and V is
         * packed once, by key blocks in parallel, and shared, and a task is one query block of
         * one head (the DiT at 1056 tokens: 150 tasks, where whole-head tasks split in chunks
         * of blocks made 60 of two sizes). The buffer holds every head's keys (the DiT at
         * 1024², 30 heads x 4128 tokens: 130 MB): the calling thread's scratch, kept between
         * calls, as a fresh allocation of that size would be page-faulted in by every layer. */
        a.nkb = ((n_keys < Sk ? n_keys : Sk) + ATT_BK - 1) / ATT_BK;
        a.kv = scratch(4, (size_t)Hkv * a.nkb * (att_kstride(D) + att_vstride(D)));
        zi_parallel_for((int64_t)Hkv * a.nkb, 1, att_pack_shared, &a);
    } else {
        /* Each task packs its head's keys, which stay in its L2 for all its query blocks
         * (faster than a shared pack: one thread, 1056 tokens, 0.21 against 0.23-0.25 s).
         * Causal (the text encoder) always takes this path: a task packs only the keys its
         * queries see, and the last block's layout depends on where that ends. Each head's
         * query blocks go in as few chunks as give every thread about three tasks. */
        int nchunks = (3 * T + Hq - 1) / Hq < nqb ? (3 * T + Hq - 1) / Hq : nqb;
        a.qchunk = (nqb + nchunks - 1) / nchunks;
        a.nchunks = (nqb + a.qchunk - 1) / a.qchunk;
    }
    run_tasks(T, (int64_t)Hq * a.nchunks, att_task, &a);
    kernel_time.attention += zi_now() - t0;
}

/* ---------------------------------------------------------------- convolution
 * y[Cout, pixels] = W[Cout, Cin·kh·kw] · col[Cin·kh·kw, pixels], where col (im2col) holds, for
 * each row r = (ci·kh + ky)·kw + kx, the input pixel each output pixel sees through that tap.
 * W is the GEMM's A operand, which is fp32: a bf16/f16 conv weight is converted once per call
 * (conv weights are small next to the activations).
 * col is never stored whole (the VAE's 1024² layers would need gigabytes). The exact path
 * builds it straight in the GEMM's packed B layout, one KC x NC panel at a time, from the input
 * rows in place (implicit GEMM): W is packed once per call, each task owns NC output pixels
 * and, per K slice, packs their panel (in L2) and multiplies it by every row of W. (Written
 * out first in bands of 16 MB, col went through memory twice and W was repacked every band:
 * 10-25% slower on the 2-core machine, bench/README.md.) The bf16 fast path keeps im2col bands
 * fed to zi_gemm (which packs its own bf16 operands). */
enum { CONV_COL_FLOATS = 1 << 22 };    /* fast path: im2col band budget, 16 MB */

typedef struct {
    const float *x;
    int H, W, Wo, kh, kw, stride, pad_t, pad_l;
} conv_geom;

/* Output columns ox in [*lo, *hi) of tap column kx read inside the image:
 * 0 <= ox·stride - pad_l + kx < W. */
static void tap_cols(const conv_geom *c, int kx, int *lo, int *hi) {
    int off = kx - c->pad_l, l = off >= 0 ? 0 : (-off + c->stride - 1) / c->stride;
    int h = off >= c->W ? 0 : (c->W - 1 - off) / c->stride + 1;
    h = h < c->Wo ? h : c->Wo;
    *lo = l < h ? l : h;
    *hi = h;
}

/* Row r = (ci·kh + ky)·kw + kx of col: where it reads. x: channel ci's plane, + kx - pad_l,
 * so that output pixel (oy, ox) reads x[iy·W + ox·stride], iy = oy·stride - pad_t + ky. */
typedef struct { const float *x; int ky, lo, hi; } conv_tap;

static conv_tap tap_of(const conv_geom *q, int r) {
    int kx = r % q->kw, ci = r / q->kw / q->kh;
    conv_tap t = { q->x + (int64_t)ci * q->H * q->W + kx - q->pad_l, r / q->kw % q->kh, 0, 0 };
    tap_cols(q, kx, &t.lo, &t.hi);
    return t;
}

static float col_at(const conv_geom *q, const conv_tap *t, int oy, int ox) {
    int iy = oy * q->stride - q->pad_t + t->ky;
    return iy >= 0 && iy < q->H && ox >= t->lo && ox < t->hi ? t->x[(int64_t)iy * q->W + (int64_t)ox * q->stride] : 0.0f;
}

/* Exact path. */
typedef struct {
    conv_geom geo;
    gemm_args g;            /* M = Cout, N = pixels, K = Cin·kh·kw; C = y */
    packed_A pa;            /* W, every row, every KC slice */
} conv_job;

/* col rows [p0, p0 + kc) x output pixels [j0, j0 + n) (n <= NC), in pack_B's layout:
 * strips of NR pixels, bp[strip][p][NR], zero padded. Written CONV_PB rows at a time, strip by
 * strip: row by row, the stores would go NR·kc floats apart, all to one cache set; strip by
 * strip over all kc rows, the loads would come from kc rows of x at once. Where a strip lies
 * in one output row and tap p reads inside the image (stride 1), its row is one copy of NR
 * floats (x fetched CONV_PF floats ahead: 16 rows at once are more streams than the
 * hardware prefetcher follows); elsewhere (borders, row ends) pixel by pixel. */
enum { CONV_PB = 16, CONV_PF = 4 * NR };

static void conv_pack_B(float *bp, const conv_job *c, int p0, int kc, int j0, int n) {
    const conv_geom *q = &c->geo;
    conv_tap taps[KC];
    for (int p = 0; p < kc; p++) taps[p] = tap_of(q, p0 + p);
    for (int pb = 0; pb < kc; pb += CONV_PB) {
        int pe = kc - pb < CONV_PB ? kc : pb + CONV_PB;
        for (int i0 = 0; i0 < n; i0 += NR) {
            float *d = bp + (size_t)i0 * kc;
            int oy = (j0 + i0) / q->Wo, ox = (j0 + i0) % q->Wo;
            if (i0 + NR <= n && ox + NR <= q->Wo) {                /* one output row */
                for (int p = pb; p < pe; p++) {
                    const conv_tap *t = &taps[p];
                    int iy = oy * q->stride - q->pad_t + t->ky;
                    if (q->stride == 1 && iy >= 0 && iy < q->H && ox >= t->lo && ox + NR <= t->hi) {
                        const float *src = t->x + (int64_t)iy * q->W + ox;
                        __builtin_prefetch(src + CONV_PF);
                        memcpy(d + p * NR, src, NR * sizeof(float));
                    } else
                        for (int j = 0; j < NR; j++) d[p * NR + j] = col_at(q, t, oy, ox + j);
                }
                continue;
            }
            for (int j = 0; j < NR; j++) {                         /* across a row end, or padding */
                int pix = j0 + i0 + j;
                for (int p = pb; p < pe; p++)
                    d[p * NR + j] = i0 + j < n ? col_at(q, &taps[p], pix / q->Wo, pix % q->Wo) : 0.0f;
            }
        }
    }
}

/* tasks = blocks of NC output pixels; every C element is summed over the same fixed KC slices
 * in order (slice 0 stored, later ones added), as in zi_gemm, whatever the thread count */
static void conv_task(void *ctx, int64_t begin, int64_t end) {
    const conv_job *c = ctx;
    float *bp = scratch(0, (size_t)KC * NC);
    for (int64_t t = begin; t < end; t++) {
        int j0 = (int)t * NC, n = c->g.N - j0 < NC ? c->g.N - j0 : NC;
        for (int pc = 0; pc < c->g.K; pc += KC) {
            gemm_args s = c->g;                 /* this K slice alone */
            s.K = c->g.K - pc < KC ? c->g.K - pc : KC;
            s.beta = pc == 0 ? 0.0f : 1.0f;
            packed_A a = { c->pa.p + (size_t)pc * c->pa.Mp, 0, c->pa.Mp };
            conv_pack_B(bp, c, pc, s.K, j0, n);
            gemm_tile_pb(&s, 0, s.M, j0, n, &a, bp);
        }
    }
}

static void conv_implicit(float *y, const conv_geom *geo, const float *A, int Cout, int K, int HWo) {
    int Mp = (Cout + MR - 1) / MR * MR;
    float *ap = zi_malloc((size_t)Mp * K * sizeof(float));
    conv_job c = { *geo, { 0, 0, Cout, HWo, K, 1.0f, 0.0f, A, K, NULL, ZI_F32, 0, y, HWo, 0 }, { ap, 0, Mp } };
    int T = (double)Cout * HWo * K < 1e6 ? 1 : zi_nthreads();
    gemm_job jb = { &c.g, c.pa, NULL, Cout, 0, 0, 0 };
    run_tasks(T, Mp / MR, pack_A_strips, &jb);
    run_tasks(T, (HWo + NC - 1) / NC, conv_task, &c);
    free(ap);
}

/* Fast path: col rows r = begin .. end for output rows oy0 .. oy0 + npix/Wo, into a band. */
typedef struct { float *col; const conv_geom *geo; int oy0, npix; } im2col_job;

static void im2col_rows(void *ctx, int64_t begin, int64_t end) {
    const im2col_job *c = ctx;
    const conv_geom *q = c->geo;
    for (int64_t r = begin; r < end; r++) {
        conv_tap t = tap_of(q, (int)r);
        for (int oy = c->oy0; oy < c->oy0 + c->npix / q->Wo; oy++) {
            float *dst = c->col + r * c->npix + (int64_t)(oy - c->oy0) * q->Wo;
            int iy = oy * q->stride - q->pad_t + t.ky;
            if (q->stride == 1 && iy >= 0 && iy < q->H) {       /* zeros, the inside run, zeros */
                memset(dst, 0, (size_t)t.lo * sizeof(float));
                memcpy(dst + t.lo, t.x + (int64_t)iy * q->W + t.lo, (size_t)(t.hi - t.lo) * sizeof(float));
                memset(dst + t.hi, 0, (size_t)(q->Wo - t.hi) * sizeof(float));
            } else
                for (int ox = 0; ox < q->Wo; ox++) dst[ox] = col_at(q, &t, oy, ox);
        }
    }
}

static void conv_bands(float *y, const conv_geom *geo, const float *A, int Cout, int K, int Ho) {
    int Wo = geo->Wo, band = (int)(CONV_COL_FLOATS / ((int64_t)K * Wo));
    band = band < 1 ? 1 : band > Ho ? Ho : band;
    float *col = zi_malloc((size_t)K * band * Wo * sizeof(float));
    for (int oy0 = 0; oy0 < Ho; oy0 += band) {
        int rows = Ho - oy0 < band ? Ho - oy0 : band, npix = rows * Wo;
        im2col_job c = { col, geo, oy0, npix };
        zi_parallel_for(K, 1, im2col_rows, &c);
        zi_gemm(0, 0, Cout, npix, K, 1.0f, A, K, col, ZI_F32, npix, 0.0f, y + (int64_t)oy0 * Wo, (int64_t)Ho * Wo);
    }
    free(col);
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
    conv_geom geo = { x, H, W, Wo, kh, kw, stride, pad_t, pad_l };
    if (kh == 1 && kw == 1 && stride == 1 && !pad_t && !pad_l && !pad_b && !pad_r)
        zi_gemm(0, 0, Cout, (int)HWo, K, 1.0f, A, K, x, ZI_F32, HWo, 0.0f, y, HWo);   /* 1x1: x is col */
    else if (zi_fast()) conv_bands(y, &geo, A, Cout, K, Ho);
    else conv_implicit(y, &geo, A, Cout, K, (int)HWo);
    free(wf);
    if (bias) {
        chan_bias_job b = { y, bias, HWo };
        zi_parallel_for(Cout, 1, chan_bias, &b);
    }
}

/* ---------------------------------------------------------------- SiLU
 * silu(x) = x / (1.0f + expf(-x)). expf is most of its cost, and a call per element keeps the
 * loop scalar; with AVX2 and FMA, e^x is computed here instead, 8 values at a time, by the
 * method of glibc's expf (the build on such a CPU: its __expf_fma), with the same operations
 * in the same order, hence the same bits. In double: k = round(x·32/ln 2), r = x·32/ln 2 - k,
 *   e^x = 2^(k/32) · 2^(r/32),  2^(k/32) = 2^floor(k/32) · EXP_TAB[k mod 32],
 *   2^(r/32) ≈ 1 + C2·r + C1·r² + C0·r³  (the constants carry the 1/32 scaling),
 * then rounded to float once. |x| >= 88 and NaN go to expf (overflow, underflow, errno).
 * The scalar and vector versions give the same bits, so a result does not depend on
 * which elements a chunk boundary left to the scalar loop. */
#if defined(__AVX2__) && defined(__FMA__)
static const double EXP_TAB[32] = {     /* 2^(i/32), correctly rounded */
    0x1.0000000000000p+0, 0x1.059b0d3158574p+0, 0x1.0b5586cf9890fp+0, 0x1.11301d0125b51p+0,
    0x1.172b83c7d517bp+0, 0x1.1d4873168b9aap+0, 0x1.2387a6e756238p+0, 0x1.29e9df51fdee1p+0,
    0x1.306fe0a31b715p+0, 0x1.371a7373aa9cbp+0, 0x1.3dea64c123422p+0, 0x1.44e086061892dp+0,
    0x1.4bfdad5362a27p+0, 0x1.5342b569d4f82p+0, 0x1.5ab07dd485429p+0, 0x1.6247eb03a5585p+0,
    0x1.6a09e667f3bcdp+0, 0x1.71f75e8ec5f74p+0, 0x1.7a11473eb0187p+0, 0x1.82589994cce13p+0,
    0x1.8ace5422aa0dbp+0, 0x1.93737b0cdc5e5p+0, 0x1.9c49182a3f090p+0, 0x1.a5503b23e255dp+0,
    0x1.ae89f995ad3adp+0, 0x1.b7f76f2fb5e47p+0, 0x1.c199bdd85529cp+0, 0x1.cb720dcef9069p+0,
    0x1.d5818dcfba487p+0, 0x1.dfc97337b9b5fp+0, 0x1.ea4afa2a490dap+0, 0x1.f50765b6e4540p+0,
};
#define EXP_INV_LN2_32 (0x1.71547652b82fep+0 * 32)  /* 32/ln 2 */
#define EXP_SHIFT 0x1.8p+52                         /* 1.5·2^52: adding it rounds to an integer */
#define EXP_C0 (0x1.c6af84b912394p-5 / 32 / 32 / 32)
#define EXP_C1 (0x1.ebfce50fac4f3p-3 / 32 / 32)
#define EXP_C2 (0x1.62e42ff0c52d6p-1 / 32)

static inline int exp_special(float x) { return (f32_bits(x) & 0x7fffffffu) >= 0x42b00000u; }  /* |x| >= 88, NaN */

static float exp_f32(float x) {
    if (exp_special(x)) return expf(x);
    double xd = x, kd = fma(EXP_INV_LN2_32, xd, EXP_SHIFT);
    union { double d; uint64_t u; } k = { kd }, s = { EXP_TAB[k.u & 31] };
    kd -= EXP_SHIFT;
    double r = fma(EXP_INV_LN2_32, xd, -kd);
    s.u += (k.u - (k.u & 31)) << 47;                /* times 2^floor(k/32): added to the exponent */
    double z = fma(r, EXP_C0, EXP_C1), r2 = r * r, p = fma(r, EXP_C2, 1.0);
    return (float)(fma(z, r2, p) * s.d);
}

/* exp_f32 of 4 values, before the rounding to float */
static inline __m256d exp_f64x4(__m128 x) {
    const __m256d inv = _mm256_set1_pd(EXP_INV_LN2_32), shift = _mm256_set1_pd(EXP_SHIFT);
    __m256d xd = _mm256_cvtps_pd(x), kd = _mm256_fmadd_pd(inv, xd, shift);
    __m256i k = _mm256_castpd_si256(kd), i = _mm256_and_si256(k, _mm256_set1_epi64x(31));
    __m256i s = _mm256_i64gather_epi64((const long long *)EXP_TAB, i, 8);
    kd = _mm256_sub_pd(kd, shift);
    __m256d r = _mm256_fmsub_pd(inv, xd, kd);
    s = _mm256_add_epi64(s, _mm256_slli_epi64(_mm256_sub_epi64(k, i), 47));
    __m256d z = _mm256_fmadd_pd(r, _mm256_set1_pd(EXP_C0), _mm256_set1_pd(EXP_C1)), r2 = _mm256_mul_pd(r, r);
    __m256d p = _mm256_fmadd_pd(r, _mm256_set1_pd(EXP_C2), _mm256_set1_pd(1.0));
    return _mm256_mul_pd(_mm256_fmadd_pd(z, r2, p), _mm256_castsi256_pd(s));
}

static inline float silu_f32(float x) { return x / (1.0f + exp_f32(-x)); }

static void silu_span(float *y, const float *x, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(88.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), m = _mm256_xor_ps(v, sign);          /* -x */
        /* a lane with |x| >= 88 or NaN (not below 88): these 8 the scalar way */
        if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v), big, _CMP_NLT_UQ))) {
            for (int j = 0; j < 8; j++) y[i + j] = silu_f32(x[i + j]);
            continue;
        }
        __m256 e = _mm256_set_m128(_mm256_cvtpd_ps(exp_f64x4(_mm256_extractf128_ps(m, 1))),
                                   _mm256_cvtpd_ps(exp_f64x4(_mm256_castps256_ps128(m))));
        _mm256_storeu_ps(y + i, _mm256_div_ps(v, _mm256_add_ps(one, e)));
    }
    for (; i < n; i++) y[i] = silu_f32(x[i]);
}
#else
static void silu_span(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = x[i] / (1.0f + expf(-x[i]));
}
#endif

/* ---------------------------------------------------------------- row kernels
 * Statistics are accumulated in double: the result is then the correctly rounded fp32 value
 * (within an ulp), which is what PyTorch's pairwise fp32 sums approximate. Each row is
 * computed by one thread. */
/* Σ x and Σ (x - mu)² in double, in four interleaved partial sums (they vectorise; a single
 * running sum would be a chain of dependent adds), combined in a fixed order. */
static double sum(const float *x, int64_t n) {
    double p[4] = {0};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int k = 0; k < 4; k++) p[k] += x[j + k];
    for (; j < n; j++) p[0] += x[j];
    return (p[0] + p[1]) + (p[2] + p[3]);
}

static double sum_sq(const float *x, int64_t n, double mu) {
    double p[4] = {0};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int k = 0; k < 4; k++) p[k] += (x[j + k] - mu) * (x[j + k] - mu);
    for (; j < n; j++) p[0] += (x[j] - mu) * (x[j] - mu);
    return (p[0] + p[1]) + (p[2] + p[3]);
}

typedef struct {
    float *y; const float *x, *w, *b;
    int64_t dim;        /* elements per row */
    float eps;
} row_job;

static void rmsnorm_rows(void *ctx, int64_t begin, int64_t end) {
    const row_job *r = ctx;
    for (int64_t i = begin; i < end; i++) {
        const float *x = r->x + i * r->dim;
        float *y = r->y + i * r->dim;
        float inv = 1.0f / sqrtf((float)(sum_sq(x, r->dim, 0.0) / r->dim) + r->eps);
        for (int64_t j = 0; j < r->dim; j++) y[j] = r->w ? r->w[j] * (x[j] * inv) : x[j] * inv;
    }
}

void zi_rmsnorm(float *y, const float *x, const float *w, int64_t rows, int dim, float eps) {
    row_job r = { y, x, w, NULL, dim, eps };
    zi_parallel_for(rows, row_grain(dim), rmsnorm_rows, &r);
}

/* mean and 1/sqrt(biased variance + eps) of n values (two passes, in double) */
static void moments(const float *x, int64_t n, float eps, float *mean, float *rstd) {
    double mu = sum(x, n) / n;
    *mean = (float)mu;
    *rstd = 1.0f / sqrtf((float)(sum_sq(x, n, mu) / n) + eps);
}

/* t·w + b rounded once where the CPU fuses multiply-adds. Compilers keep a vectorised and a
 * scalar version of a loop and pick one at run time by whether y and x overlap (in place or
 * not); left to -ffp-contract, clang fuses in one and not the other, and the two disagree
 * in the last bit. */
static inline float affine(float t, float w, float b) {
#ifdef FP_FAST_FMAF
    return fmaf(t, w, b);
#else
    return t * w + b;
#endif
}

/* y = (x - mean)·rstd·w + b over a row: w, b per element (layernorm) or, with wstep 0, one w
 * and b for all n elements (a channel of a groupnorm) */
static inline void norm_span(float *y, const float *x, int64_t n, float mean, float rstd,
                             const float *w, const float *b, int64_t wstep) {
    for (int64_t j = 0; j < n; j++) {
        float t = (x[j] - mean) * rstd;
        if (w && b) t = affine(t, w[j * wstep], b[j * wstep]);
        else if (w) t *= w[j * wstep];
        else if (b) t += b[j * wstep];
        y[j] = t;
    }
}

static void norm_rows(void *ctx, int64_t begin, int64_t end) {
    const row_job *r = ctx;
    for (int64_t i = begin; i < end; i++) {
        const float *x = r->x + i * r->dim;
        float mean, rstd;
        moments(x, r->dim, r->eps, &mean, &rstd);
        norm_span(r->y + i * r->dim, x, r->dim, mean, rstd, r->w, r->b, 1);
    }
}

void zi_layernorm(float *y, const float *x, const float *w, const float *b,
                  int64_t rows, int dim, float eps) {
    row_job r = { y, x, w, b, dim, eps };
    zi_parallel_for(rows, row_grain(dim), norm_rows, &r);
}

/* GroupNorm (and SiLU): one task per group. The group's moments come first (two passes over
 * it), then each channel is written with its own w and b (no per-element channel index:
 * the loop vectorises), GN_BLOCK values at a time, so that SiLU reads them back from L1
 * rather than making one more pass over memory. */
enum { GN_BLOCK = 1024 };
typedef struct { float *y; const float *x, *w, *b; int64_t HW; int cpg, silu; float eps; } gn_job;

static void gn_groups(void *ctx, int64_t begin, int64_t end) {
    const gn_job *g = ctx;
    int64_t n = g->cpg * g->HW;
    for (int64_t i = begin; i < end; i++) {
        float mean, rstd;
        moments(g->x + i * n, n, g->eps, &mean, &rstd);
        for (int64_t c = i * g->cpg; c < (i + 1) * g->cpg; c++)
            for (int64_t j = c * g->HW; j < (c + 1) * g->HW; j += GN_BLOCK) {
                int64_t m = (c + 1) * g->HW - j < GN_BLOCK ? (c + 1) * g->HW - j : GN_BLOCK;
                norm_span(g->y + j, g->x + j, m, mean, rstd, g->w ? g->w + c : NULL, g->b ? g->b + c : NULL, 0);
                if (g->silu) silu_span(g->y + j, g->y + j, m);
            }
    }
}

static void groupnorm(float *y, const float *x, const float *w, const float *b,
                      int C, int64_t HW, int groups, float eps, int silu) {
    if (groups <= 0 || C % groups) zi_die("zi_groupnorm: %d channels in %d groups", C, groups);
    gn_job g = { y, x, w, b, HW, C / groups, silu, eps };
    zi_parallel_for(groups, 1, gn_groups, &g);
}

void zi_groupnorm(float *y, const float *x, const float *w, const float *b,
                  int C, int64_t HW, int groups, float eps) {
    groupnorm(y, x, w, b, C, HW, groups, eps, 0);
}

void zi_groupnorm_silu(float *y, const float *x, const float *w, const float *b,
                       int C, int64_t HW, int groups, float eps) {
    groupnorm(y, x, w, b, C, HW, groups, eps, 1);
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
    row_job r = { y, x, NULL, NULL, n, 0 };
    zi_parallel_for(rows, row_grain(n), softmax_rows, &r);
}

/* ---------------------------------------------------------------- elementwise kernels */
typedef enum { EW_SILU, EW_SILU_MUL, EW_TANH, EW_ADD, EW_MUL, EW_SCALE } ew_op;
typedef struct { ew_op op; float *y; const float *a, *b; float s; } ew_job;
enum { EW_BLOCK = 256 };

static void ew_range(void *ctx, int64_t begin, int64_t end) {
    const ew_job *e = ctx;
    float *y = e->y;
    const float *a = e->a, *b = e->b;
    switch (e->op) {
    case EW_SILU: silu_span(y + begin, a + begin, end - begin); break;
    case EW_SILU_MUL:           /* silu(a) into a block on the stack first: y may be b */
        for (int64_t i = begin; i < end; i += EW_BLOCK) {
            float s[EW_BLOCK];
            int64_t m = end - i < EW_BLOCK ? end - i : EW_BLOCK;
            silu_span(s, a + i, m);
            for (int64_t j = 0; j < m; j++) y[i + j] = s[j] * b[i + j];
        }
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
    zi_parallel_for(S, row_grain((int64_t)H * D), rope_rows, &r);
}

void zi_rope_half(float *x, int64_t ld, int S, int H, int D, const float *cos_, const float *sin_) {
    rope_job r = { x, ld, H, D, 1, cos_, sin_ };
    zi_parallel_for(S, row_grain((int64_t)H * D), rope_rows, &r);
}

/* ---------------------------------------------------------------- backward kernels (training)
 * The row kernels recompute each row's statistics exactly as the forward does and sum in
 * double; elementwise kernels are independent per element; attention is two passes over
 * fixed tiles. Every result depends only on its index: the same bits for any thread count. */
typedef struct {
    float *dx; const float *dy, *x, *w;
    int64_t dim;
    float eps;
} row_bw_job;

/* y = w ⊙ x·r with r = 1/sqrt(mean(x²) + eps):
 *   dx = r·(w ⊙ dy) − x · r³ · Σ_j(w_j dy_j x_j) / dim */
static void rmsnorm_bw_rows(void *ctx, int64_t begin, int64_t end) {
    const row_bw_job *r = ctx;
    for (int64_t i = begin; i < end; i++) {
        const float *x = r->x + i * r->dim, *dy = r->dy + i * r->dim;
        float *dx = r->dx + i * r->dim;
        double dot = 0;
        float inv = 1.0f / sqrtf((float)(sum_sq(x, r->dim, 0.0) / r->dim) + r->eps);  /* as rmsnorm_rows */
        for (int64_t j = 0; j < r->dim; j++) dot += (double)(r->w ? r->w[j] * dy[j] : dy[j]) * x[j];
        float c = (float)(dot / r->dim) * inv * inv * inv;
        for (int64_t j = 0; j < r->dim; j++) dx[j] += inv * (r->w ? r->w[j] * dy[j] : dy[j]) - c * x[j];
    }
}

void zi_rmsnorm_backward(float *dx, const float *dy, const float *x, const float *w,
                         int64_t rows, int dim, float eps) {
    row_bw_job r = { dx, dy, x, w, dim, eps };
    zi_parallel_for(rows, row_grain(dim), rmsnorm_bw_rows, &r);
}

/* y = x̂ ⊙ w + b with x̂ = (x − mean)·rstd, g = w ⊙ dy:
 *   dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)) */
static void layernorm_bw_rows(void *ctx, int64_t begin, int64_t end) {
    const row_bw_job *r = ctx;
    for (int64_t i = begin; i < end; i++) {
        const float *x = r->x + i * r->dim, *dy = r->dy + i * r->dim;
        float *dx = r->dx + i * r->dim, mean, rstd;
        moments(x, r->dim, r->eps, &mean, &rstd);
        double sg = 0, sgx = 0;
        for (int64_t j = 0; j < r->dim; j++) {
            float g = r->w ? r->w[j] * dy[j] : dy[j];
            sg += g;
            sgx += (double)g * ((x[j] - mean) * rstd);
        }
        float mg = (float)(sg / r->dim), mgx = (float)(sgx / r->dim);
        for (int64_t j = 0; j < r->dim; j++) {
            float g = r->w ? r->w[j] * dy[j] : dy[j];
            dx[j] += rstd * (g - mg - (x[j] - mean) * rstd * mgx);
        }
    }
}

void zi_layernorm_backward(float *dx, const float *dy, const float *x, const float *w,
                           int64_t rows, int dim, float eps) {
    row_bw_job r = { dx, dy, x, w, dim, eps };
    zi_parallel_for(rows, row_grain(dim), layernorm_bw_rows, &r);
}

/* silu(x) = x·s with s = sigmoid(x); silu'(x) = s·(1 + x·(1 − s)) */
typedef struct { float *da, *db; const float *dy, *a, *b; } silu_bw_job;

static void silu_bw_range(void *ctx, int64_t begin, int64_t end) {
    const silu_bw_job *e = ctx;
    for (int64_t i = begin; i < end; i++) {
        float a = e->a[i], s = 1.0f / (1.0f + expf(-a)), dy = e->dy[i];
        if (e->b) {
            e->db[i] = dy * a * s;
            dy *= e->b[i];
        }
        e->da[i] = dy * s * (1.0f + a * (1.0f - s));
    }
}

void zi_silu_backward(float *dx, const float *dy, const float *x, int64_t n) {
    silu_bw_job e = { dx, NULL, dy, x, NULL };
    zi_parallel_for(n, EW_GRAIN, silu_bw_range, &e);
}

void zi_silu_mul_backward(float *dgate, float *dup, const float *dy, const float *gate, const float *up,
                          int64_t n) {
    silu_bw_job e = { dgate, dup, dy, gate, up };
    zi_parallel_for(n, EW_GRAIN, silu_bw_range, &e);
}

/* The forward rotates each pair by +θ; its transpose rotates by −θ. */
static void rope_bw_rows(void *ctx, int64_t begin, int64_t end) {
    const rope_job *r = ctx;
    int P = r->D / 2;
    for (int64_t t = begin; t < end; t++) {
        const float *c = r->c + t * P, *s = r->s + t * P;
        for (int h = 0; h < r->H; h++) {
            float *x = r->x + t * r->ld + (int64_t)h * r->D;
            for (int m = 0; m < P; m++) {
                float a = x[2 * m], b = x[2 * m + 1];
                x[2 * m] = a * c[m] + b * s[m];
                x[2 * m + 1] = b * c[m] - a * s[m];
            }
        }
    }
}

void zi_rope_interleaved_backward(float *dx, int64_t ld, int S, int H, int D, const float *cos_,
                                  const float *sin_) {
    rope_job r = { dx, ld, H, D, 0, cos_, sin_ };
    zi_parallel_for(S, row_grain((int64_t)H * D), rope_bw_rows, &r);
}

/* Attention backward. Tiles: ATT_BQ queries x ATT_BK keys, as the forward. */
typedef struct {
    float *dq, *dk, *dv;
    const float *q, *k, *v, *dout, *lse, *Di;
    int64_t ld;
    int Sq, Sk, H, D, nqb, nkb;
    float scale;
} att_bw_args;

/* For head h, queries q0..q0+bq and keys j0..j0+bk: P = exp(scale·q·kᵀ − lse) and
 * dS = P ∘ (dO·Vᵀ − D) into the [ATT_BQ, ATT_BK] tiles P and dS. */
static void att_bw_tile(const att_bw_args *a, int h, int q0, int bq, int j0, int bk, float *P, float *dS) {
    int64_t hq = (int64_t)q0 * a->ld + (int64_t)h * a->D, hk = (int64_t)j0 * a->ld + (int64_t)h * a->D;
    gemm_args qk = { 0, 1, bq, bk, a->D, a->scale, 0.0f, a->q + hq, a->ld, a->k + hk, ZI_F32, a->ld, P, ATT_BK, 0 };
    gemm_tile(&qk, 0, bq, 0, bk, NULL);
    gemm_args dp = { 0, 1, bq, bk, a->D, 1.0f, 0.0f, a->dout + hq, a->ld, a->v + hk, ZI_F32, a->ld, dS, ATT_BK, 0 };
    gemm_tile(&dp, 0, bq, 0, bk, NULL);
    for (int i = 0; i < bq; i++) {
        float lse = a->lse[(int64_t)h * a->Sq + q0 + i], di = a->Di[(int64_t)h * a->Sq + q0 + i];
        for (int j = 0; j < bk; j++) {
            float p = expf(P[i * ATT_BK + j] - lse);
            P[i * ATT_BK + j] = p;
            dS[i * ATT_BK + j] = p * (dS[i * ATT_BK + j] - di);
        }
    }
}

/* Pass 1, one task per (head, key block): dV = Σ_q Pᵀ·dO, dK = scale·Σ_q dSᵀ·Q. */
static void att_bw_keys(void *ctx, int64_t begin, int64_t end) {
    const att_bw_args *a = ctx;
    int D = a->D;
    float *P = scratch(2, 2 * (size_t)ATT_BQ * ATT_BK + 2 * (size_t)ATT_BK * D);
    float *dS = P + ATT_BQ * ATT_BK, *dK = dS + ATT_BQ * ATT_BK, *dV = dK + (size_t)ATT_BK * D;
    for (int64_t t = begin; t < end; t++) {
        int h = (int)(t / a->nkb), j0 = (int)(t % a->nkb) * ATT_BK;
        int bk = a->Sk - j0 < ATT_BK ? a->Sk - j0 : ATT_BK;
        memset(dK, 0, 2 * (size_t)ATT_BK * D * sizeof(float));
        for (int q0 = 0; q0 < a->Sq; q0 += ATT_BQ) {
            int bq = a->Sq - q0 < ATT_BQ ? a->Sq - q0 : ATT_BQ;
            int64_t hq = (int64_t)q0 * a->ld + (int64_t)h * D;
            att_bw_tile(a, h, q0, bq, j0, bk, P, dS);
            gemm_args pv = { 1, 0, bk, D, bq, 1.0f, 1.0f, P, ATT_BK, a->dout + hq, ZI_F32, a->ld, dV, D, 0 };
            gemm_tile(&pv, 0, bk, 0, D, NULL);
            gemm_args sq = { 1, 0, bk, D, bq, a->scale, 1.0f, dS, ATT_BK, a->q + hq, ZI_F32, a->ld, dK, D, 0 };
            gemm_tile(&sq, 0, bk, 0, D, NULL);
        }
        for (int j = 0; j < bk; j++) {
            int64_t at = (int64_t)(j0 + j) * a->ld + (int64_t)h * D;
            memcpy(a->dk + at, dK + (size_t)j * D, D * sizeof(float));
            memcpy(a->dv + at, dV + (size_t)j * D, D * sizeof(float));
        }
    }
}

/* Pass 2, one task per (head, query block): dQ = scale·Σ_k dS·K. */
static void att_bw_queries(void *ctx, int64_t begin, int64_t end) {
    const att_bw_args *a = ctx;
    int D = a->D;
    float *P = scratch(2, 2 * (size_t)ATT_BQ * ATT_BK + (size_t)ATT_BQ * D);
    float *dS = P + ATT_BQ * ATT_BK, *dQ = dS + ATT_BQ * ATT_BK;
    for (int64_t t = begin; t < end; t++) {
        int h = (int)(t / a->nqb), q0 = (int)(t % a->nqb) * ATT_BQ;
        int bq = a->Sq - q0 < ATT_BQ ? a->Sq - q0 : ATT_BQ;
        memset(dQ, 0, (size_t)ATT_BQ * D * sizeof(float));
        for (int j0 = 0; j0 < a->Sk; j0 += ATT_BK) {
            int bk = a->Sk - j0 < ATT_BK ? a->Sk - j0 : ATT_BK;
            att_bw_tile(a, h, q0, bq, j0, bk, P, dS);
            gemm_args sk = { 0, 0, bq, D, bk, a->scale, 1.0f, dS, ATT_BK,
                             a->k + (int64_t)j0 * a->ld + (int64_t)h * D, ZI_F32, a->ld, dQ, D, 0 };
            gemm_tile(&sk, 0, bq, 0, D, NULL);
        }
        for (int i = 0; i < bq; i++)
            memcpy(a->dq + (int64_t)(q0 + i) * a->ld + (int64_t)h * D, dQ + (size_t)i * D, D * sizeof(float));
    }
}

/* D_i = Σ_d dO[i, h, d]·O[i, h, d], one task per query row. */
typedef struct { float *Di; const float *o, *dout; int64_t ld; int Sq, H, D; } att_di_job;

static void att_di_rows(void *ctx, int64_t begin, int64_t end) {
    const att_di_job *j = ctx;
    for (int64_t i = begin; i < end; i++)
        for (int h = 0; h < j->H; h++) {
            const float *o = j->o + i * j->ld + (int64_t)h * j->D, *g = j->dout + i * j->ld + (int64_t)h * j->D;
            double s = 0;
            for (int d = 0; d < j->D; d++) s += (double)o[d] * g[d];
            j->Di[(int64_t)h * j->Sq + i] = (float)s;
        }
}

void zi_attention_backward(float *dq, float *dk, float *dv, const float *q, const float *k,
                           const float *v, const float *o, const float *dout, const float *lse,
                           int64_t ld, int Sq, int Sk, int H, int D, float scale) {
    if (Sq <= 0 || Sk <= 0 || H <= 0) return;
    double t0 = zi_now();
    float *Di = zi_malloc((size_t)H * Sq * sizeof(float));
    att_di_job dj = { Di, o, dout, ld, Sq, H, D };
    zi_parallel_for(Sq, 16, att_di_rows, &dj);
    att_bw_args a = { dq, dk, dv, q, k, v, dout, lse, Di, ld, Sq, Sk, H, D,
                      (Sq + ATT_BQ - 1) / ATT_BQ, (Sk + ATT_BK - 1) / ATT_BK, scale };
    zi_parallel_for((int64_t)H * a.nkb, 1, att_bw_keys, &a);
    zi_parallel_for((int64_t)H * a.nqb, 1, att_bw_queries, &a);
    free(Di);
    kernel_time.attention += zi_now() - t0;
}
