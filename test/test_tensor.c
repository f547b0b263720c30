/* Tests of tensor.c: dtypes, conversions, kernels, GEMM, attention, thread invariance. */
#include "test.h"
#include "../tensor.h"

#include <stdio.h>
#include <string.h>

TEST(dtype_names) {
    for (int i = 0; i < ZI_NDTYPES; i++) {
        zi_dtype t;
        CHECK(zi_dtype_parse(zi_dtype_name((zi_dtype)i), &t) == 0 && t == (zi_dtype)i, "dtype %d", i);
    }
    zi_dtype t;
    CHECK(zi_dtype_parse("F31", &t) == -1, "unknown dtype accepted");
}

#include <math.h>
#include <stdlib.h>

/* ---------------------------------------------------------------- helpers */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float frand(void) {             /* uniform in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) * 0x1p-24 * 2 - 1);
}
static float *rand_vec(size_t n, float scale) {
    float *v = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = frand() * scale;
    return v;
}
static float *copy_vec(const float *x, size_t n) { return memcpy(malloc((n ? n : 1) * sizeof(float)), x, n * sizeof(float)); }
static float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* ---------------------------------------------------------------- conversions */
TEST(conv_bf16) {
    CHECK(zi_f32_to_bf16(1.0f) == 0x3f80, "1.0");
    CHECK(zi_f32_to_bf16(bits_f(0x3f808000)) == 0x3f80, "tie to even (down)");
    CHECK(zi_f32_to_bf16(bits_f(0x3f818000)) == 0x3f82, "tie to even (up)");
    CHECK(zi_f32_to_bf16(bits_f(0x3f808001)) == 0x3f81, "above half");
    CHECK(zi_f32_to_bf16(bits_f(0x7f7fffff)) == 0x7f80, "max float rounds to inf");
    CHECK(zi_f32_to_bf16(INFINITY) == 0x7f80 && zi_f32_to_bf16(-INFINITY) == 0xff80, "inf");
    uint16_t n = zi_f32_to_bf16(bits_f(0x7f800001));
    CHECK((n & 0x7f80) == 0x7f80 && (n & 0x7f), "NaN stays NaN (%04x)", n);
    for (int i = 0; i < 1000; i++) {
        float f = frand() * 100;
        CHECK(fabsf(zi_bf16_to_f32(zi_f32_to_bf16(f)) - f) <= fabsf(f) * 0x1p-8f, "bf16 round trip %g", f);
    }
}

TEST(conv_f16) {
    /* every half converts exactly and back */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = zi_f16_to_f32((uint16_t)h);
        if (isnan(f)) { CHECK((h & 0x7c00) == 0x7c00 && (h & 0x3ff), "nan %04x", h); continue; }
        CHECK(zi_f32_to_f16(f) == h, "round trip %04x -> %g -> %04x", h, f, zi_f32_to_f16(f));
    }
    CHECK(zi_f16_to_f32(0x0001) == 0x1p-24f, "smallest subnormal");
    CHECK(zi_f16_to_f32(0x03ff) == 1023 * 0x1p-24f, "largest subnormal");
    CHECK(zi_f16_to_f32(0x7c00) == INFINITY && zi_f16_to_f32(0xfc00) == -INFINITY, "inf");
    CHECK(zi_f16_to_f32(0x7bff) == 65504.0f, "max");
    CHECK(zi_f32_to_f16(65519.0f) == 0x7bff && zi_f32_to_f16(65520.0f) == 0x7c00, "overflow threshold");
    CHECK(zi_f32_to_f16(0x1p-25f) == 0 && zi_f32_to_f16(0x1.000002p-25f) == 1, "half of the smallest subnormal");
    CHECK(zi_f32_to_f16(3 * 0x1p-25f) == 2, "subnormal tie to even");
    CHECK(zi_f32_to_f16(bits_f(0x3f801000)) == 0x3c00, "tie to even (down)");
    CHECK(zi_f32_to_f16(bits_f(0x3f803000)) == 0x3c02, "tie to even (up)");
    CHECK(zi_f32_to_f16(-0.0f) == 0x8000, "-0");
    uint16_t n = zi_f32_to_f16(NAN);
    CHECK((n & 0x7c00) == 0x7c00 && (n & 0x3ff), "nan");
    /* float -> half agrees with the nearest of the two neighbouring halves */
    for (int i = 0; i < 20000; i++) {
        float f = ldexpf(frand(), (int)(frand() * 20) - 8);
        uint16_t h = zi_f32_to_f16(f);
        float g = zi_f16_to_f32(h), up = zi_f16_to_f32((uint16_t)(h + 1)), dn = zi_f16_to_f32((uint16_t)(h - 1));
        CHECK((isnan(up) || fabsf(g - f) <= fabsf(up - f)) && (isnan(dn) || fabsf(g - f) <= fabsf(dn - f)),
              "nearest %g", f);
    }
}

TEST(conv_to_f32) {
    float d[8];
    double f64[2] = { 1.5, -1e40 };
    zi_to_f32(d, f64, ZI_F64, 2);
    CHECK(d[0] == 1.5f && d[1] == -INFINITY, "f64");
    uint8_t e4[6] = { 0x38, 0x01, 0x7e, 0xff, 0xb8, 0x08 };   /* 1, 2^-9, 448, NaN, -1, 2^-6 */
    zi_to_f32(d, e4, ZI_F8_E4M3, 6);
    CHECK(d[0] == 1 && d[1] == 0x1p-9f && d[2] == 448 && isnan(d[3]) && d[4] == -1 && d[5] == 0x1p-6f,
          "e4m3 %g %g %g %g %g %g", d[0], d[1], d[2], d[3], d[4], d[5]);
    uint8_t e5[4] = { 0x3c, 0x7c, 0x01, 0x7b };               /* 1, inf, 2^-16, 57344 */
    zi_to_f32(d, e5, ZI_F8_E5M2, 4);
    CHECK(d[0] == 1 && d[1] == INFINITY && d[2] == 0x1p-16f && d[3] == 57344, "e5m2");
    int64_t i64[2] = { -3, 1 << 20 };
    zi_to_f32(d, i64, ZI_I64, 2);
    CHECK(d[0] == -3 && d[1] == 1 << 20, "i64");
    int32_t i32 = -7; int16_t i16 = 300; int8_t i8 = -128; uint8_t u8 = 255, b = 1;
    zi_to_f32(d, &i32, ZI_I32, 1); zi_to_f32(d + 1, &i16, ZI_I16, 1); zi_to_f32(d + 2, &i8, ZI_I8, 1);
    zi_to_f32(d + 3, &u8, ZI_U8, 1); zi_to_f32(d + 4, &b, ZI_BOOL, 1);
    CHECK(d[0] == -7 && d[1] == 300 && d[2] == -128 && d[3] == 255 && d[4] == 1, "ints");
    uint16_t h[9];
    for (int i = 0; i < 9; i++) h[i] = (uint16_t)(0x3c00 + i * 0x123);
    float e[9];
    zi_to_f32(e, h, ZI_F16, 9);
    for (int i = 0; i < 9; i++) CHECK(e[i] == zi_f16_to_f32(h[i]), "f16 vector path %d", i);
}

/* ---------------------------------------------------------------- GEMM */
/* B as dtype bt from float values (rounded to that dtype); returns the storage */
static void *make_B(const float *v, size_t n, zi_dtype bt) {
    if (bt == ZI_F32) return copy_vec(v, n);
    uint16_t *h = malloc((n ? n : 1) * 2);
    for (size_t i = 0; i < n; i++) h[i] = bt == ZI_BF16 ? zi_f32_to_bf16(v[i]) : zi_f32_to_f16(v[i]);
    return h;
}

/* one GEMM vs the reference; ld's are padded by `pad` */
static int gemm_case(int tA, int tB, int M, int N, int K, float alpha, float beta, zi_dtype bt, int pad) {
    int64_t lda = (tA ? M : K) + pad, ldb = (tB ? K : N) + pad, ldc = N + pad;
    size_t na = (size_t)(tA ? K : M) * lda, nb = (size_t)(tB ? N : K) * ldb, nc = (size_t)M * ldc;
    float *A = rand_vec(na, 1), *Bv = rand_vec(nb, 1), *C = rand_vec(nc, 1);
    void *B = make_B(Bv, nb, bt);
    float *R = copy_vec(C, nc);
    if (beta == 0) for (size_t i = 0; i < nc; i++) C[i] = NAN;    /* beta = 0 must not read C */
    zi_gemm(tA, tB, M, N, K, alpha, A, lda, B, bt, ldb, beta, C, ldc);
    zi_gemm_ref(tA, tB, M, N, K, alpha, A, lda, B, bt, ldb, beta, R, ldc);
    char what[96];
    snprintf(what, sizeof what, "gemm %s %d%d %dx%dx%d", zi_dtype_name(bt), tA, tB, M, N, K);
    /* compare only the M x N block (padding columns untouched by both) */
    int ok = 1;
    double maxref = 0, maxerr = 0;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double r = R[(size_t)i * ldc + j], g = C[(size_t)i * ldc + j];
            if (fabs(r) > maxref) maxref = fabs(r);
            if (!(fabs(g - r) <= maxerr)) maxerr = fabs(g - r);
        }
    /* fp32 rounding of a K-term sum: a few ulps of sqrt(K)·max */
    if (!(maxerr <= 1e-5 * (maxref > 1 ? maxref : 1) * (K > 64 ? sqrt(K / 64.0) : 1))) {
        fprintf(stderr, "    %s: max err %g (max ref %g)\n", what, maxerr, maxref);
        ok = 0;
    }
    free(A); free(Bv); free(C); free(B); free(R);
    return ok;
}

TEST(gemm_vs_ref) {
    static const int shapes[][3] = {
        {1, 1, 1}, {1, 7, 13}, {7, 13, 131}, {13, 7, 1}, {17, 33, 65}, {64, 64, 64}, {37, 50, 300},
        {5, 600, 29}, {100, 3, 257}, {97, 131, 513}, {1, 300, 600}, {300, 1, 70}, {61, 67, 9},
        {300, 13, 600},   /* one column strip, large enough to be threaded: B packed once */
    };
    zi_dtype dts[3] = { ZI_F32, ZI_BF16, ZI_F16 };
    int n = 0;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int t = 0; t < 4; t++) {
            const int *sh = shapes[s];
            zi_dtype bt = dts[(s + t) % 3];
            float alpha = t == 1 ? 0.5f : 1.0f, beta = t == 2 ? 0.75f : t == 3 ? 1.0f : 0.0f;
            CHECK(gemm_case(t & 1, t >> 1, sh[0], sh[1], sh[2], alpha, beta, bt, (int)(s % 3) * 3), "shape %d", (int)s);
            n++;
        }
    for (int t = 0; t < 4; t++)
        for (int d = 0; d < 3; d++) CHECK(gemm_case(t & 1, t >> 1, 29, 45, 270, 1.0f, 0.0f, dts[d], 1), "dtypes");
    for (int i = 0; i < 30; i++) {
        int M = 1 + rand() % 80, N = 1 + rand() % 80, K = 1 + rand() % 600;
        CHECK(gemm_case(rand() & 1, rand() & 1, M, N, K, 1.5f, (rand() & 1) ? 0.0f : -1.0f, dts[i % 3], rand() % 5),
              "random %dx%dx%d", M, N, K);
    }
    /* K = 0: C = beta·C */
    float c[2] = { 2, 4 };
    zi_gemm(0, 0, 1, 2, 0, 1, c, 1, c, ZI_F32, 2, 0.5f, c, 2);
    CHECK(c[0] == 1 && c[1] == 2, "K = 0");
}

/* Few rows times a transposed B (y = x·Wᵀ of a short sequence: zi_gemm's path for 8 or 16 <= M
 * <= 64): M around the strip sizes and the thresholds, K around vector and slice lengths, N odd */
TEST(gemm_small_m) {
    static const int Ms[] = { 1, 2, 5, 7, 8, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 70 };
    static const int Ks[] = { 1, 7, 8, 9, 100, 255, 256, 257, 600 };
    static const int Ns[] = { 1, 3, 13, 37, 50 };
    zi_dtype dts[3] = { ZI_F32, ZI_BF16, ZI_F16 };
    int c = 0;
    for (size_t m = 0; m < sizeof Ms / sizeof *Ms; m++)
        for (size_t k = 0; k < sizeof Ks / sizeof *Ks; k++, c++) {
            float alpha = c % 3 == 1 ? 0.5f : 1.0f, beta = c % 4 == 2 ? 0.75f : c % 4 == 3 ? -1.0f : 0.0f;
            CHECK(gemm_case(c % 5 == 4, 1, Ms[m], Ns[c % 5], Ks[k], alpha, beta, dts[c % 3], c % 3), "M %d K %d", Ms[m], Ks[k]);
        }
    /* every dtype at the text encoder's shape, scaled down */
    for (int d = 0; d < 3; d++) CHECK(gemm_case(0, 1, 32, 61, 1030, 1.0f, 0.0f, dts[d], 0), "dtype %d", d);
    /* the same bits as the packed path (M = 100): a row of C must not depend on how many rows
     * are computed together (batches, tiles) */
    int N = 45, K = 700;
    float *A = rand_vec((size_t)100 * K, 1), *Bv = rand_vec((size_t)N * K, 1), *C0 = rand_vec((size_t)100 * N, 1);
    float *big = malloc(sizeof(float) * 100 * N), *few = malloc(sizeof(float) * 33 * N);
    for (int d = 0; d < 3; d++)
        for (int t = 0; t < 2; t++) {
            void *B = make_B(Bv, (size_t)N * K, dts[d]);
            float beta = t ? 0.75f : 0.0f;
            memcpy(big, C0, sizeof(float) * 100 * N);
            memcpy(few, C0, sizeof(float) * 33 * N);
            zi_gemm(0, 1, 100, N, K, 1.0f, A, K, B, dts[d], K, beta, big, N);
            zi_gemm(0, 1, 33, N, K, 1.0f, A, K, B, dts[d], K, beta, few, N);
            free(B);
            CHECK(!memcmp(big, few, sizeof(float) * 33 * N), "rows 0..33 of M = 100 and of M = 33 differ (%s, %d)",
                  zi_dtype_name(dts[d]), t);
        }
    free(A); free(Bv); free(C0); free(big); free(few);
}

TEST(gemm_linear) {
    int M = 33, in = 70, out = 45;
    float *x = rand_vec((size_t)M * in, 1), *wv = rand_vec((size_t)out * in, 1), *bias = rand_vec(out, 1);
    void *wb = make_B(wv, (size_t)out * in, ZI_BF16);
    zi_mat W = { wb, ZI_BF16, out, in };
    float *y = malloc(sizeof(float) * M * out), *r = malloc(sizeof(float) * M * out);
    zi_linear(y, x, M, &W, bias);
    for (int i = 0; i < M; i++)
        for (int o = 0; o < out; o++) {
            double s = bias[o];
            for (int k = 0; k < in; k++) s += (double)x[i * in + k] * zi_bf16_to_f32(((uint16_t *)wb)[o * in + k]);
            r[i * out + o] = (float)s;
        }
    CHECK_CLOSE("linear bf16", y, r, (size_t)M * out, 1e-5);
    free(x); free(wv); free(bias); free(wb); free(y); free(r);
}

/* ---------------------------------------------------------------- attention */
static void attention_naive(float *out, const float *q, const float *k, const float *v, int Sq, int Sk,
                            int Hq, int Hkv, int D, float scale, int causal, int n_keys, float *lse) {
    double *s = malloc(sizeof(double) * (Sk ? Sk : 1));
    for (int h = 0; h < Hq; h++) {
        int g = h / (Hq / Hkv);
        for (int i = 0; i < Sq; i++) {
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j < Sk; j++) {
                double d = 0;
                for (int e = 0; e < D; e++) d += (double)q[((size_t)i * Hq + h) * D + e] * k[((size_t)j * Hkv + g) * D + e];
                s[j] = (j >= n_keys || (causal && j > i)) ? -INFINITY : d * scale;
                if (s[j] > mx) mx = s[j];
            }
            for (int j = 0; j < Sk; j++) sum += s[j] = exp(s[j] - mx);
            for (int e = 0; e < D; e++) {
                double o = 0;
                for (int j = 0; j < Sk; j++) o += s[j] * v[((size_t)j * Hkv + g) * D + e];
                out[((size_t)i * Hq + h) * D + e] = (float)(o / sum);
            }
            if (lse) lse[(size_t)h * Sq + i] = (float)(mx + log(sum));
        }
    }
    free(s);
}

static int attention_case(int Sq, int Sk, int Hq, int Hkv, int D, int causal, int n_keys) {
    float *q = rand_vec((size_t)Sq * Hq * D, 2), *k = rand_vec((size_t)Sk * Hkv * D, 2), *v = rand_vec((size_t)Sk * Hkv * D, 1);
    size_t no = (size_t)Sq * Hq * D;
    float *o = malloc(no * 4), *r = malloc(no * 4), *lse = malloc((size_t)Hq * Sq * 4), *rl = malloc((size_t)Hq * Sq * 4);
    float scale = 1.0f / sqrtf((float)D);
    zi_attention(o, (int64_t)Hq * D, q, (int64_t)Hq * D, k, (int64_t)Hkv * D, v, (int64_t)Hkv * D, Sq, Sk, Hq, Hkv, D,
                 scale, causal, n_keys, lse);
    attention_naive(r, q, k, v, Sq, Sk, Hq, Hkv, D, scale, causal, n_keys, rl);
    char what[80];
    snprintf(what, sizeof what, "attn %dx%d h%d/%d d%d c%d n%d", Sq, Sk, Hq, Hkv, D, causal, n_keys);
    int ok = zt_close(what, o, r, no, 1e-5) && zt_close("lse", lse, rl, (size_t)Hq * Sq, 1e-5);
    free(q); free(k); free(v); free(o); free(r); free(lse); free(rl);
    return ok;
}

TEST(attention_vs_naive) {
    CHECK(attention_case(1, 1, 1, 1, 8, 0, 1), "1x1");
    CHECK(attention_case(70, 70, 4, 2, 16, 0, 70), "plain");
    CHECK(attention_case(200, 200, 2, 2, 32, 1, 200), "causal");
    CHECK(attention_case(131, 300, 6, 2, 24, 0, 257), "GQA, n_keys");
    CHECK(attention_case(150, 150, 3, 1, 128, 1, 100), "causal, n_keys");
    CHECK(attention_case(5, 129, 2, 1, 7, 0, 129), "odd D");
    CHECK(attention_case(600, 580, 2, 1, 16, 1, 570), "several query and key blocks");
}

/* ---------------------------------------------------------------- convolution */
static void conv_naive(float *y, const float *x, int Cin, int H, int W, const float *w, int Cout, const float *bias,
                       int kh, int kw, int stride, int pt, int pl, int pb, int pr) {
    int Ho = (H + pt + pb - kh) / stride + 1, Wo = (W + pl + pr - kw) / stride + 1;
    for (int co = 0; co < Cout; co++)
        for (int oy = 0; oy < Ho; oy++)
            for (int ox = 0; ox < Wo; ox++) {
                double s = bias ? bias[co] : 0;
                for (int ci = 0; ci < Cin; ci++)
                    for (int ky = 0; ky < kh; ky++)
                        for (int kx = 0; kx < kw; kx++) {
                            int iy = oy * stride - pt + ky, ix = ox * stride - pl + kx;
                            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                            s += (double)w[((co * Cin + ci) * kh + ky) * kw + kx] * x[((size_t)ci * H + iy) * W + ix];
                        }
                y[((size_t)co * Ho + oy) * Wo + ox] = (float)s;
            }
}

static int conv_case(int Cin, int Cout, int H, int W, int k, int stride, int pt, int pl, int pb, int pr, zi_dtype wt,
                     int use_bias) {
    int K = Cin * k * k, Ho = (H + pt + pb - k) / stride + 1, Wo = (W + pl + pr - k) / stride + 1;
    float *x = rand_vec((size_t)Cin * H * W, 1), *wv = rand_vec((size_t)Cout * K, 1), *b = rand_vec(Cout, 1);
    void *ws = make_B(wv, (size_t)Cout * K, wt);
    zi_to_f32(wv, ws, wt, (size_t)Cout * K);      /* the reference uses the rounded weight */
    zi_mat w = { ws, wt, Cout, K };
    size_t ny = (size_t)Cout * Ho * Wo;
    float *y = malloc(ny * 4), *r = malloc(ny * 4);
    zi_conv2d(y, x, Cin, H, W, &w, use_bias ? b : NULL, k, k, stride, pt, pl, pb, pr);
    conv_naive(r, x, Cin, H, W, wv, Cout, use_bias ? b : NULL, k, k, stride, pt, pl, pb, pr);
    char what[80];
    snprintf(what, sizeof what, "conv %d->%d %dx%d k%d s%d", Cin, Cout, H, W, k, stride);
    int ok = zt_close(what, y, r, ny, 1e-5);
    free(x); free(wv); free(b); free(ws); free(y); free(r);
    return ok;
}

TEST(conv2d_vs_naive) {
    CHECK(conv_case(3, 5, 9, 11, 3, 1, 1, 1, 1, 1, ZI_F32, 1), "3x3 pad 1");
    CHECK(conv_case(4, 6, 10, 7, 3, 2, 0, 0, 1, 1, ZI_BF16, 1), "3x3 stride 2, pad right/bottom");
    CHECK(conv_case(7, 3, 6, 5, 1, 1, 0, 0, 0, 0, ZI_F32, 1), "1x1");
    CHECK(conv_case(5, 4, 8, 8, 1, 2, 0, 0, 0, 0, ZI_F16, 0), "1x1 stride 2");
    CHECK(conv_case(2, 3, 5, 6, 3, 1, 2, 0, 1, 2, ZI_F32, 0), "asymmetric pads");
    CHECK(conv_case(64, 8, 40, 300, 3, 1, 1, 1, 1, 1, ZI_F32, 1), "several bands");
}

/* ---------------------------------------------------------------- row and elementwise kernels */
TEST(norms) {
    int rows = 5, dim = 300;
    float *x = rand_vec((size_t)rows * dim, 3), *w = rand_vec(dim, 1), *b = rand_vec(dim, 1);
    float *y = malloc(sizeof(float) * rows * dim), *r = malloc(sizeof(float) * rows * dim);
    for (int t = 0; t < 2; t++) {
        const float *wt = t ? w : NULL, *bt = t ? b : NULL;
        for (int i = 0; i < rows; i++) {
            double ss = 0;
            for (int j = 0; j < dim; j++) ss += (double)x[i * dim + j] * x[i * dim + j];
            for (int j = 0; j < dim; j++) r[i * dim + j] = (float)(x[i * dim + j] / sqrt(ss / dim + 1e-6) * (wt ? wt[j] : 1));
        }
        zi_rmsnorm(y, x, wt, rows, dim, 1e-6f);
        CHECK_CLOSE("rmsnorm", y, r, (size_t)rows * dim, 1e-6);
        float *xi = copy_vec(x, (size_t)rows * dim);
        zi_rmsnorm(xi, xi, wt, rows, dim, 1e-6f);
        CHECK(!memcmp(xi, y, sizeof(float) * rows * dim), "rmsnorm in place");
        for (int i = 0; i < rows; i++) {
            double s = 0, v = 0;
            for (int j = 0; j < dim; j++) s += x[i * dim + j];
            double mu = s / dim;
            for (int j = 0; j < dim; j++) v += (x[i * dim + j] - mu) * (x[i * dim + j] - mu);
            for (int j = 0; j < dim; j++)
                r[i * dim + j] = (float)((x[i * dim + j] - mu) / sqrt(v / dim + 1e-5) * (wt ? wt[j] : 1) + (bt ? bt[j] : 0));
        }
        zi_layernorm(y, x, wt, bt, rows, dim, 1e-5f);
        CHECK_CLOSE("layernorm", y, r, (size_t)rows * dim, 1e-6);
        memcpy(xi, x, sizeof(float) * rows * dim);
        zi_layernorm(xi, xi, wt, bt, rows, dim, 1e-5f);
        CHECK(!memcmp(xi, y, sizeof(float) * rows * dim), "layernorm in place");
        free(xi);
    }
    /* groupnorm: C = 12 channels in 4 groups of 3, HW = 50 */
    int C = 12, G = 4, HW = 50;
    for (int i = 0; i < G; i++) {
        int n = C / G * HW;
        const float *xg = x + i * n;
        double s = 0, v = 0;
        for (int j = 0; j < n; j++) s += xg[j];
        double mu = s / n;
        for (int j = 0; j < n; j++) v += (xg[j] - mu) * (xg[j] - mu);
        for (int j = 0; j < n; j++) {
            int c = i * (C / G) + j / HW;
            r[i * n + j] = (float)((xg[j] - mu) / sqrt(v / n + 1e-6) * w[c] + b[c]);
        }
    }
    zi_groupnorm(y, x, w, b, C, HW, G, 1e-6f);
    CHECK_CLOSE("groupnorm", y, r, (size_t)C * HW, 1e-6);
    /* fused with SiLU: the same bits as the two kernels, in place too */
    zi_silu(y, y, C * HW);
    memcpy(r, x, sizeof(float) * C * HW);
    zi_groupnorm_silu(r, r, w, b, C, HW, G, 1e-6f);
    CHECK(!memcmp(r, y, sizeof(float) * C * HW), "groupnorm_silu in place");
    zi_groupnorm_silu(r, x, w, b, C, HW, G, 1e-6f);
    CHECK(!memcmp(r, y, sizeof(float) * C * HW), "groupnorm_silu");
    free(x); free(w); free(b); free(y); free(r);
}

TEST(elementwise) {
    int n = 40000;
    float *a = rand_vec(n, 8), *b = rand_vec(n, 2), *y = malloc(sizeof(float) * n), *r = malloc(sizeof(float) * n);
    zi_silu(y, a, n);
    for (int i = 0; i < n; i++) r[i] = (float)(a[i] / (1 + exp(-(double)a[i])));
    CHECK_CLOSE("silu", y, r, n, 1e-6);
    zi_silu_mul(y, a, b, n);
    for (int i = 0; i < n; i++) r[i] = (float)(a[i] / (1 + exp(-(double)a[i])) * b[i]);
    CHECK_CLOSE("silu_mul", y, r, n, 1e-6);
    zi_tanh(y, a, n);
    for (int i = 0; i < n; i++) r[i] = (float)tanh(a[i]);
    CHECK_CLOSE("tanh", y, r, n, 1e-6);
    zi_add(y, a, b, n);
    for (int i = 0; i < n; i++) CHECK(y[i] == a[i] + b[i], "add");
    zi_mul(y, a, b, n);
    for (int i = 0; i < n; i++) CHECK(y[i] == a[i] * b[i], "mul");
    zi_scale(y, a, 0.3f, n);
    for (int i = 0; i < n; i++) CHECK(y[i] == a[i] * 0.3f, "scale");
    float *c = copy_vec(a, n);
    zi_silu(c, c, n);
    zi_silu(y, a, n);
    CHECK(!memcmp(c, y, sizeof(float) * n), "silu in place");
#ifdef __GLIBC__
    /* where tensor.c computes e^x itself (8 at a time, by glibc's method), SiLU keeps the bits
     * of x / (1 + expf(-x)) with glibc's expf, limits and special values included */
    const float sp[] = { 88.0f, -88.0f, 87.99f, -87.99f, 88.8f, -103.5f, -104.5f, 200.0f, INFINITY,
                         -INFINITY, NAN, 0.0f, -0.0f, 1e-30f, 0x1p-149f, -1e-8f, 0.5f, -17.25f };
    int ns = (int)(sizeof sp / sizeof *sp);
    memcpy(c + 3, sp, sizeof sp);
    zi_silu(y, c, n);
    for (int i = 0; i < n; i++) {
        float e = c[i] / (1.0f + expf(-c[i]));
        CHECK(!memcmp(&e, &y[i], sizeof e) || (isnan(e) && isnan(y[i])), "silu(%a): %a, expf gives %a", c[i], y[i], e);
    }
    zi_silu_mul(y, c, b, ns + 13);
    for (int i = 0; i < ns + 13; i++) {
        float e = c[i] / (1.0f + expf(-c[i])) * b[i];
        CHECK(!memcmp(&e, &y[i], sizeof e) || (isnan(e) && isnan(y[i])), "silu_mul(%a)", c[i]);
    }
#endif
    /* softmax over rows of 1000 */
    zi_softmax(y, a, n / 1000, 1000);
    for (int i = 0; i < n / 1000; i++) {
        double mx = -INFINITY, s = 0;
        for (int j = 0; j < 1000; j++) mx = a[i * 1000 + j] > mx ? a[i * 1000 + j] : mx;
        for (int j = 0; j < 1000; j++) s += exp(a[i * 1000 + j] - mx);
        for (int j = 0; j < 1000; j++) r[i * 1000 + j] = (float)(exp(a[i * 1000 + j] - mx) / s);
    }
    CHECK_CLOSE("softmax", y, r, n, 1e-6);
    memcpy(c, a, sizeof(float) * n);
    zi_softmax(c, c, n / 1000, 1000);
    CHECK(!memcmp(c, y, sizeof(float) * n), "softmax in place");
    free(a); free(b); free(c); free(y); free(r);
}

TEST(rope) {
    int S = 7, H = 3, D = 8, P = D / 2;
    int64_t ld = H * D + 5;
    float *x = rand_vec((size_t)S * ld, 1), *c = malloc(sizeof(float) * S * P), *s = malloc(sizeof(float) * S * P);
    for (int t = 0; t < S * P; t++) c[t] = cosf(t * 0.37f), s[t] = sinf(t * 0.37f);
    float *y = copy_vec(x, (size_t)S * ld), *z = copy_vec(x, (size_t)S * ld);
    zi_rope_interleaved(y, ld, S, H, D, c, s);
    zi_rope_half(z, ld, S, H, D, c, s);
    for (int t = 0; t < S; t++)
        for (int h = 0; h < H; h++)
            for (int m = 0; m < P; m++) {
                const float *xv = x + t * ld + h * D;
                float cs = c[t * P + m], sn = s[t * P + m];
                const float *yv = y + t * ld + h * D, *zv = z + t * ld + h * D;
                CHECK(fabsf(yv[2 * m] - (xv[2 * m] * cs - xv[2 * m + 1] * sn)) < 1e-6f &&
                      fabsf(yv[2 * m + 1] - (xv[2 * m] * sn + xv[2 * m + 1] * cs)) < 1e-6f, "interleaved");
                CHECK(fabsf(zv[m] - (xv[m] * cs - xv[m + P] * sn)) < 1e-6f &&
                      fabsf(zv[m + P] - (xv[m + P] * cs + xv[m] * sn)) < 1e-6f, "half");
            }
    for (int t = 0; t < S; t++)                 /* the padding between rows is untouched */
        for (int j = H * D; j < ld; j++) CHECK(y[t * ld + j] == x[t * ld + j] && z[t * ld + j] == x[t * ld + j], "pad");
    free(x); free(c); free(s); free(y); free(z);
}

/* ---------------------------------------------------------------- thread-count invariance */
typedef struct { float *gemm_bf16, *gemm_f16, *small_bf16, *small_f32, *strip, *att, *lse, *att1, *att4, *conv, *norm, *gn; } invariant_out;

static void invariant_run(invariant_out *o, const float *A, const void *Bb, const void *Bh, const float *Bf,
                          const float *q, const float *x, const zi_mat *cw) {
    int M = 150, N = 333, K = 700;
    o->gemm_bf16 = malloc(sizeof(float) * M * N);
    o->gemm_f16 = malloc(sizeof(float) * M * N);
    zi_gemm(0, 1, M, N, K, 1, A, K, Bb, ZI_BF16, K, 0, o->gemm_bf16, N);
    zi_gemm(1, 0, M, N, K, 0.5f, A, M, Bh, ZI_F16, N, 0, o->gemm_f16, N);
    o->small_bf16 = malloc(sizeof(float) * 33 * N);            /* few rows: the small-M path */
    o->small_f32 = malloc(sizeof(float) * 20 * N);
    zi_gemm(0, 1, 33, N, K, 1, A, K, Bb, ZI_BF16, K, 0, o->small_bf16, N);
    zi_gemm(1, 1, 20, N, K, 1, A, M, Bf, ZI_F32, K, 0, o->small_f32, N);
    o->strip = malloc(sizeof(float) * M * 13);                  /* one column strip: B packed once */
    zi_gemm(0, 1, M, 13, K, 1, A, K, Bf, ZI_F32, K, 0, o->strip, 13);
    int S = 300, H = 4, D = 64;
    o->att = malloc(sizeof(float) * S * H * D);
    o->lse = malloc(sizeof(float) * S * H);
    zi_attention(o->att, H * D, q, 3 * H * D, q + H * D, 3 * H * D, q + 2 * H * D, 3 * H * D, S, S, H, H, D, 0.125f,
                 1, S - 7, o->lse);
    /* not causal: each task packs its head, or (fewer kv heads than threads, or fewer than 3
     * query heads per thread) every head is packed once and shared; both give the same bits */
    o->att1 = malloc(sizeof(float) * S * H * D);
    zi_attention(o->att1, H * D, q, 3 * H * D, q + H * D, 3 * H * D, q + 2 * H * D, 3 * H * D, S, S, H, 1, D, 0.125f,
                 0, S - 7, NULL);
    o->att4 = malloc(sizeof(float) * S * H * D);
    zi_attention(o->att4, H * D, q, 3 * H * D, q + H * D, 3 * H * D, q + 2 * H * D, 3 * H * D, S, S, H, H, D, 0.125f,
                 0, S, NULL);
    o->conv = malloc(sizeof(float) * 8 * 33 * 40);
    zi_conv2d(o->conv, x, 16, 66, 80, cw, NULL, 3, 3, 2, 0, 0, 1, 1);
    o->norm = malloc(sizeof(float) * M * K);
    zi_rmsnorm(o->norm, A, NULL, M, K, 1e-6f);
    o->gn = malloc(sizeof(float) * 16 * 66 * 80);
    zi_groupnorm(o->gn, x, NULL, NULL, 16, 66 * 80, 4, 1e-6f);
}

static void invariant_free(invariant_out *o) {
    free(o->gemm_bf16); free(o->gemm_f16); free(o->small_bf16); free(o->small_f32); free(o->strip); free(o->att); free(o->lse); free(o->att1); free(o->att4); free(o->conv); free(o->norm); free(o->gn);
}

TEST(thread_invariance) {
    int M = 150, N = 333, K = 700;
    float *A = rand_vec((size_t)M * K, 1), *Bv = rand_vec((size_t)N * K, 1), *q = rand_vec(300 * 3 * 4 * 64, 2);
    float *x = rand_vec(16 * 66 * 80, 1), *wv = rand_vec(8 * 16 * 9, 1);
    void *Bb = make_B(Bv, (size_t)N * K, ZI_BF16), *Bh = make_B(Bv, (size_t)N * K, ZI_F16);
    zi_mat cw = { wv, ZI_F32, 8, 16 * 9 };
    int counts[4] = { 1, 2, 3, 0 };
    invariant_out ref, o;
    for (int t = 0; t < 4; t++) {
        zi_threads_init(counts[t]);
        invariant_run(t ? &o : &ref, A, Bb, Bh, Bv, q, x, &cw);
        if (!t) continue;
        int nt = zi_nthreads();
        CHECK(!memcmp(o.gemm_bf16, ref.gemm_bf16, sizeof(float) * M * N), "gemm bf16, %d threads", nt);
        CHECK(!memcmp(o.gemm_f16, ref.gemm_f16, sizeof(float) * M * N), "gemm f16, %d threads", nt);
        CHECK(!memcmp(o.small_bf16, ref.small_bf16, sizeof(float) * 33 * N), "small-M gemm bf16, %d threads", nt);
        CHECK(!memcmp(o.small_f32, ref.small_f32, sizeof(float) * 20 * N), "small-M gemm f32, %d threads", nt);
        CHECK(!memcmp(o.strip, ref.strip, sizeof(float) * M * 13), "one-strip gemm, %d threads", nt);
        CHECK(!memcmp(o.att, ref.att, sizeof(float) * 300 * 4 * 64), "attention, %d threads", nt);
        CHECK(!memcmp(o.att1, ref.att1, sizeof(float) * 300 * 4 * 64), "attention with one kv head, %d threads", nt);
        CHECK(!memcmp(o.att4, ref.att4, sizeof(float) * 300 * 4 * 64), "attention, not causal, %d threads", nt);
        CHECK(!memcmp(o.lse, ref.lse, sizeof(float) * 300 * 4), "lse, %d threads", nt);
        CHECK(!memcmp(o.conv, ref.conv, sizeof(float) * 8 * 33 * 40), "conv, %d threads", nt);
        CHECK(!memcmp(o.norm, ref.norm, sizeof(float) * M * K), "rmsnorm, %d threads", nt);
        CHECK(!memcmp(o.gn, ref.gn, sizeof(float) * 16 * 66 * 80), "groupnorm, %d threads", nt);
        invariant_free(&o);
    }
    invariant_free(&ref);
    free(A); free(Bv); free(q); free(x); free(wv); free(Bb); free(Bh);
}
