/* Tests of the opt-in fast path (zi_set_fast: bf16 operands, fp32 sums): close to the exact
 * GEMM, the same bits for any thread count, the exact path untouched once it is off, and the
 * error it brings to each stage of the tiny model (printed; bounded). */
#include "test.h"
#include "../zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TINY "test/golden/tiny-zimage"

static float *vals(size_t n, unsigned seed) {
    float *x = zi_malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        x[i] = (float)((seed >> 8) & 0xffff) / 32768.0f - 1.0f;
    }
    return x;
}

/* C = alpha·op(A)·op(B) + beta·C0 for one shape, B in dtype bt; malloc'd [M, N] */
typedef struct { int tA, tB, M, N, K; zi_dtype bt; float alpha, beta; } shape;

static float *run(const shape *s, const float *A, const void *B, const float *C0) {
    float *C = zi_malloc((size_t)s->M * s->N * sizeof(float));
    memcpy(C, C0, (size_t)s->M * s->N * sizeof(float));
    zi_gemm(s->tA, s->tB, s->M, s->N, s->K, s->alpha, A, s->tA ? s->M : s->K, B, s->bt,
            s->tB ? s->K : s->N, s->beta, C, s->N);
    return C;
}

/* B of s as dtype bt, from float values */
static void *weights(const shape *s, const float *f) {
    size_t n = (size_t)s->K * s->N;
    if (s->bt == ZI_F32) {
        float *b = zi_malloc(n * sizeof(float));
        memcpy(b, f, n * sizeof(float));
        return b;
    }
    uint16_t *b = zi_malloc(n * 2);
    for (size_t i = 0; i < n; i++) b[i] = s->bt == ZI_BF16 ? zi_f32_to_bf16(f[i]) : zi_f32_to_f16(f[i]);
    return b;
}

static const shape shapes[] = {
    { 0, 1, 300, 200, 3840 + 17, ZI_BF16, 1.0f, 0.0f },   /* Linear, ragged in every dimension */
    { 0, 1, 64, 96, 384, ZI_BF16, 1.0f, 0.0f },
    { 0, 0, 37, 70, 101, ZI_F32, 0.5f, 1.0f },          /* B [K, N] (convolutions), beta = 1 */
    { 1, 1, 45, 33, 400, ZI_F16, 2.0f, 0.25f },         /* op(A) transposed (backward) */
    { 1, 0, 5, 40, 7, ZI_F32, 1.0f, 0.0f },
    { 0, 1, 33, 4500, 4000, ZI_BF16, 1.0f, 0.0f },      /* op(B) packed in two column ranges */
    { 1, 0, 4300, 40, 3900, ZI_F32, 1.0f, 0.0f },       /* op(A) packed in two row blocks */
    /* AMX reads a bf16 Wᵀ in place where K and N are multiples of 32 (tensor.c, amx_wx) */
    { 0, 1, 300, 224, 3840, ZI_BF16, 1.0f, 0.0f },
    { 1, 1, 45, 64, 416, ZI_BF16, 2.0f, 0.25f },
    { 0, 1, 1, 32, 32, ZI_BF16, 1.0f, 1.0f },
};

/* Fast against exact within a bf16 tolerance: each operand carries a relative rounding of up to
 * 2^-9; sums of random-signed products keep the relative error of the result near that. */
TEST(fast_gemm_close) {
    printf("    fast kernel: %s\n", zi_fast_kernel());
    for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++) {
        const shape *s = &shapes[c];
        float *A = vals((size_t)s->M * s->K, 1 + (unsigned)c), *Bf = vals((size_t)s->K * s->N, 7 + (unsigned)c);
        float *C0 = vals((size_t)s->M * s->N, 11);
        void *B = weights(s, Bf);
        zi_set_fast(0);
        float *exact = run(s, A, B, C0);
        zi_set_fast(1);
        float *fast = run(s, A, B, C0);
        zi_set_fast(0);
        char what[64];
        snprintf(what, sizeof what, "fast gemm %dx%dx%d", s->M, s->N, s->K);
        int ok = zt_close(what, fast, exact, (size_t)s->M * s->N, 1e-2);
        free(A), free(Bf), free(C0), free(B), free(exact), free(fast);
        CHECK(ok, "%s differs from the exact GEMM", what);
    }
}

/* The fast path gives the same bits with 1, 2 and 3 threads; switched off, the exact path gives
 * the bits it gave before the fast path ever ran. */
static void threads_and_off(const shape *s) {
    float *A = vals((size_t)s->M * s->K, 3), *Bf = vals((size_t)s->K * s->N, 5), *C0 = vals((size_t)s->M * s->N, 9);
    void *B = weights(s, Bf);
    zi_set_fast(0);
    float *before = run(s, A, B, C0), *fast[3];
    zi_set_fast(1);
    for (int t = 0; t < 3; t++) {
        zi_threads_init(t + 1);
        fast[t] = run(s, A, B, C0);
    }
    zi_set_fast(0);
    zi_threads_init(0);
    float *after = run(s, A, B, C0);
    size_t bytes = (size_t)s->M * s->N * sizeof(float);
    int same = !memcmp(fast[0], fast[1], bytes) && !memcmp(fast[0], fast[2], bytes);
    int restored = !memcmp(before, after, bytes), differs = memcmp(before, fast[0], bytes) != 0;
    free(A), free(Bf), free(C0), free(B), free(before), free(after);
    for (int t = 0; t < 3; t++) free(fast[t]);
    CHECK(same, "the fast GEMM depends on the thread count");
    CHECK(restored, "the exact GEMM changed after the fast path ran");
    CHECK(differs, "the fast path gave the exact bits: it did not run");
}

TEST(fast_threads_and_off) {
    static const shape few = { 0, 1, 20, 96, 416, ZI_BF16, 1.0f, 0.0f };   /* AMX: one row block */
    threads_and_off(&shapes[0]);
    threads_and_off(&shapes[7]);
    threads_and_off(&few);
}

/* A row's result does not depend on the rows computed with it: each row alone (M = 1; with AMX
 * the single-block kernel) gives the bits it has in a batch of 70 (AMX: K sliced, 2 x 2 tiles). */
TEST(fast_rows_batch_free) {
    const shape all = { 0, 1, 70, 96, 416, ZI_BF16, 1.0f, 0.0f }, one = { 0, 1, 1, 96, 416, ZI_BF16, 1.0f, 0.0f };
    float *A = vals((size_t)all.M * all.K, 2), *Bf = vals((size_t)all.K * all.N, 4), *C0 = vals((size_t)all.M * all.N, 6);
    void *B = weights(&all, Bf);
    zi_set_fast(1);
    float *batch = run(&all, A, B, C0);
    int same = 1;
    for (int i = 0; i < all.M; i++) {
        float *row = run(&one, A + (size_t)i * all.K, B, C0 + (size_t)i * all.N);
        same &= !memcmp(row, batch + (size_t)i * all.N, (size_t)all.N * sizeof(float));
        free(row);
    }
    zi_set_fast(0);
    free(A), free(Bf), free(C0), free(B), free(batch);
    CHECK(same, "a row of the fast GEMM depends on the batch it is computed in");
}

/* max|fast - exact| / max|exact|, printed */
static double rel(const char *what, const float *fast, const float *exact, size_t n) {
    double d = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)fast[i] - exact[i]), a = fabs((double)exact[i]);
        d = e > d ? e : d;
        m = a > m ? a : m;
    }
    printf("    %-28s fast vs exact: max error %.2e of max |exact| %.3g (%.2e relative)\n", what, d, m, d / m);
    return d / m;
}

/* One text-encoder forward, one DiT forward, one VAE decode of the tiny model, fast vs exact.
 * The bound (3e-2) is a few bf16 roundings through a handful of layers. */
TEST(fast_stages) {
    zi_te *te = zi_te_load(TINY "/text_encoder");
    zi_dit *dit = zi_dit_load(TINY "/transformer");
    zi_vae *vae = zi_vae_load(TINY "/vae");
    CHECK(te && dit && vae, "load: %s", zi_err());
    int32_t ids[24];
    for (int i = 0; i < 24; i++) ids[i] = (i * 7919 + 13) % 1000 + 10;
    int L = 24, D = zi_te_dim(te);
    float *emb[2];
    for (int f = 0; f < 2; f++) {
        zi_set_fast(f);
        emb[f] = zi_te_encode(te, ids, L);
    }
    zi_set_fast(0);
    CHECK(emb[0] && emb[1], "encode: %s", zi_err());
    double e_te = rel("text encoder (24 tokens)", emb[1], emb[0], (size_t)L * D);

    const zi_dit_cfg *cfg = zi_dit_config(dit);
    int h = 16, w = 16, C = cfg->in_channels;
    size_t nx = (size_t)C * h * w;
    float *x = vals(nx, 21), t = 0.7f, *out[2];
    const float *xp = x, *cap = emb[0];
    for (int f = 0; f < 2; f++) {
        zi_set_fast(f);
        out[f] = zi_malloc(nx * sizeof(float));
        CHECK(zi_dit_forward(dit, 1, &xp, &h, &w, &t, &cap, &L, &out[f]) == 0, "dit: %s", zi_err());
    }
    zi_set_fast(0);
    double e_dit = rel("DiT forward (16x16 latent)", out[1], out[0], nx);

    int lh = 8, lw = 8, LC = zi_vae_latent_channels(vae), fct = zi_vae_factor(vae);
    float *z = vals((size_t)LC * lh * lw, 33), *img[2];
    for (int f = 0; f < 2; f++) {
        zi_set_fast(f);
        img[f] = zi_vae_decode(vae, z, lh, lw);
    }
    zi_set_fast(0);
    CHECK(img[0] && img[1], "decode: %s", zi_err());
    double e_vae = rel("VAE decode (8x8 latent)", img[1], img[0], (size_t)3 * lh * fct * lw * fct);
    free(emb[0]), free(emb[1]), free(x), free(out[0]), free(out[1]), free(z), free(img[0]), free(img[1]);
    zi_te_free(te), zi_dit_free(dit), zi_vae_free(vae);
    CHECK(e_te < 3e-2 && e_dit < 3e-2 && e_vae < 3e-2, "a stage is further than 3e-2 from the exact path");
}
