/* Tests of the training backward: each backward kernel and zi_lin_backward against central
 * finite differences, the whole DiT's LoRA gradients against finite differences and against
 * PyTorch autograd (test/golden/train-*.safetensors), gradient checkpointing and thread
 * counts giving the same bits. */
#include "test.h"
#include "../zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TINY "tiny-zimage/transformer"

static uint64_t rng_state = 0x243f6a8885a308d3ull;
static float frand(void) {             /* uniform in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) * 0x1p-24 * 2 - 1);
}
static float *rand_vec(size_t n, float scale) {
    float *v = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = frand() * scale;
    return v;
}

/* ---------------------------------------------------------------- finite differences
 * A kernel under test maps its inputs to an output y; the scalar L = Σ c ⊙ y (c random, held
 * in the context) has dL/dinput = the backward of dy = c. fd() perturbs input element i by
 * ±h and returns the central difference of L (summed in double). */
typedef double (*loss_fn)(void *ctx);

static double fd(loss_fn L, void *ctx, float *x, size_t i, float h) {
    float x0 = x[i];
    x[i] = x0 + h;
    double lp = L(ctx);
    x[i] = x0 - h;
    double lm = L(ctx);
    x[i] = x0;
    return (lp - lm) / (2.0 * h);
}

static double dot(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* Compares grad[idx[k]] with finite differences for the k < n indices (all when idx is NULL). */
static int check_fd(const char *what, loss_fn L, void *ctx, float *x, const float *grad, const size_t *idx,
                    size_t n, float h, double tol) {
    float *num = malloc(n * sizeof(float)), *ana = malloc(n * sizeof(float));
    for (size_t k = 0; k < n; k++) {
        size_t i = idx ? idx[k] : k;
        num[k] = (float)fd(L, ctx, x, i, h);
        ana[k] = grad[i];
    }
    int ok = zt_close(what, ana, num, n, tol);
    free(num);
    free(ana);
    return ok;
}

/* ---------------------------------------------------------------- row kernels */
typedef struct { float *x, *w, *c, *y; int rows, dim, layer; } norm_ctx;

static double norm_loss(void *p) {
    norm_ctx *t = p;
    if (t->layer) zi_layernorm(t->y, t->x, t->w, NULL, t->rows, t->dim, 1e-5f);
    else zi_rmsnorm(t->y, t->x, t->w, t->rows, t->dim, 1e-5f);
    return dot(t->c, t->y, (size_t)t->rows * t->dim);
}

TEST(backward_norms_fd) {
    int rows = 5, dim = 37;
    size_t n = (size_t)rows * dim;
    for (int layer = 0; layer < 2; layer++)
        for (int affine = 0; affine < 2; affine++) {
            norm_ctx t = { rand_vec(n, 2), affine ? rand_vec(dim, 1.5f) : NULL, rand_vec(n, 1), malloc(n * sizeof(float)),
                           rows, dim, layer };
            float *dx = calloc(n, sizeof(float));
            if (layer) zi_layernorm_backward(dx, t.c, t.x, t.w, rows, dim, 1e-5f);
            else zi_rmsnorm_backward(dx, t.c, t.x, t.w, rows, dim, 1e-5f);
            char what[48];
            snprintf(what, sizeof what, "%s%s dx", layer ? "layernorm" : "rmsnorm", affine ? "(w)" : "");
            int ok = check_fd(what, norm_loss, &t, t.x, dx, NULL, n, 1e-2f, 2e-3);
            /* the backward accumulates */
            float keep = dx[3];
            if (layer) zi_layernorm_backward(dx, t.c, t.x, t.w, rows, dim, 1e-5f);
            else zi_rmsnorm_backward(dx, t.c, t.x, t.w, rows, dim, 1e-5f);
            ok = ok && dx[3] == keep + keep;
            free(t.x); free(t.w); free(t.c); free(t.y); free(dx);
            CHECK(ok, "%s", what);
        }
}

/* ---------------------------------------------------------------- elementwise */
typedef struct { float *a, *b, *c, *y; size_t n; } ew_ctx;

static double silu_loss(void *p) {
    ew_ctx *t = p;
    if (t->b) zi_silu_mul(t->y, t->a, t->b, (int64_t)t->n);
    else zi_silu(t->y, t->a, (int64_t)t->n);
    return dot(t->c, t->y, t->n);
}

TEST(backward_silu_fd) {
    size_t n = 300;
    ew_ctx t = { rand_vec(n, 6), NULL, rand_vec(n, 1), malloc(n * sizeof(float)), n };
    float *da = malloc(n * sizeof(float)), *db = malloc(n * sizeof(float));
    zi_silu_backward(da, t.c, t.a, (int64_t)n);
    CHECK(check_fd("silu dx", silu_loss, &t, t.a, da, NULL, n, 1e-2f, 2e-3), "silu");
    t.b = rand_vec(n, 2);
    zi_silu_mul_backward(da, db, t.c, t.a, t.b, (int64_t)n);
    CHECK(check_fd("silu_mul dgate", silu_loss, &t, t.a, da, NULL, n, 1e-2f, 2e-3), "silu_mul gate");
    CHECK(check_fd("silu_mul dup", silu_loss, &t, t.b, db, NULL, n, 1e-2f, 2e-3), "silu_mul up");
    /* dgate may alias dy */
    float *dy = memcpy(malloc(n * sizeof(float)), t.c, n * sizeof(float));
    zi_silu_mul_backward(dy, db, dy, t.a, t.b, (int64_t)n);
    CHECK(!memcmp(dy, da, n * sizeof(float)), "silu_mul_backward in place");
    free(t.a); free(t.b); free(t.c); free(t.y); free(da); free(db); free(dy);
}

/* ---------------------------------------------------------------- RoPE */
typedef struct { float *x, *c, *y, *cs, *sn; int S, H, D; } rope_ctx;

static double rope_loss(void *p) {
    rope_ctx *t = p;
    size_t n = (size_t)t->S * t->H * t->D;
    memcpy(t->y, t->x, n * sizeof(float));
    zi_rope_interleaved(t->y, (int64_t)t->H * t->D, t->S, t->H, t->D, t->cs, t->sn);
    return dot(t->c, t->y, n);
}

TEST(backward_rope_fd) {
    int S = 6, H = 3, D = 10;
    size_t n = (size_t)S * H * D, nt = (size_t)S * D / 2;
    rope_ctx t = { rand_vec(n, 1), rand_vec(n, 1), malloc(n * sizeof(float)), malloc(nt * sizeof(float)),
                   malloc(nt * sizeof(float)), S, H, D };
    for (size_t i = 0; i < nt; i++) {
        float a = frand() * 3;
        t.cs[i] = cosf(a);
        t.sn[i] = sinf(a);
    }
    float *dx = memcpy(malloc(n * sizeof(float)), t.c, n * sizeof(float));
    zi_rope_interleaved_backward(dx, (int64_t)H * D, S, H, D, t.cs, t.sn);
    int ok = check_fd("rope dx", rope_loss, &t, t.x, dx, NULL, n, 1e-2f, 1e-3);
    free(t.x); free(t.c); free(t.y); free(t.cs); free(t.sn); free(dx);
    CHECK(ok, "rope");
}

/* ---------------------------------------------------------------- attention */
typedef struct { float *q, *k, *v, *c, *o, *lse; int Sq, Sk, H, D; } att_ctx;

static double att_loss(void *p) {
    att_ctx *t = p;
    int64_t ld = (int64_t)t->H * t->D;
    zi_attention(t->o, ld, t->q, ld, t->k, ld, t->v, ld, t->Sq, t->Sk, t->H, t->H, t->D, 1.0f / sqrtf((float)t->D),
                 0, t->Sk, t->lse);
    return dot(t->c, t->o, (size_t)t->Sq * ld);
}

/* Sizes past one tile in both directions (tiles are 64 queries x 128 keys). */
TEST(backward_attention_fd) {
    int Sq = 150, Sk = 140, H = 2, D = 8;
    size_t nq = (size_t)Sq * H * D, nk = (size_t)Sk * H * D;
    att_ctx t = { rand_vec(nq, 2), rand_vec(nk, 2), rand_vec(nk, 1), rand_vec(nq, 1), malloc(nq * sizeof(float)),
                  malloc((size_t)H * Sq * sizeof(float)), Sq, Sk, H, D };
    float *dq = malloc(nq * sizeof(float)), *dk = malloc(nk * sizeof(float)), *dv = malloc(nk * sizeof(float));
    att_loss(&t);
    zi_attention_backward(dq, dk, dv, t.q, t.k, t.v, t.o, t.c, t.lse, (int64_t)H * D, Sq, Sk, H, D,
                          1.0f / sqrtf((float)D));
    size_t idx[64];
    int ok = 1;
    float *in[3] = { t.q, t.k, t.v }, *g[3] = { dq, dk, dv };
    const char *names[3] = { "attention dq", "attention dk", "attention dv" };
    for (int a = 0; a < 3; a++) {
        size_t n = a ? nk : nq;
        for (int k = 0; k < 64; k++) idx[k] = (size_t)(k * 7919) % n;
        ok &= check_fd(names[a], att_loss, &t, in[a], g[a], idx, 64, 1e-2f, 2e-3);
    }
    free(t.q); free(t.k); free(t.v); free(t.c); free(t.o); free(t.lse); free(dq); free(dk); free(dv);
    CHECK(ok, "attention backward");
}

/* ---------------------------------------------------------------- Linear + LoRA */
typedef struct { zi_lin *l; float *x, *c, *y; int M; } lin_ctx;

static double lin_loss(void *p) {
    lin_ctx *t = p;
    zi_lin_forward(t->l, t->x, t->M, t->y);
    return dot(t->c, t->y, (size_t)t->M * t->l->W.rows);
}

TEST(backward_lin_fd) {
    int M = 7, in = 13, out = 11, r1 = 3, r2 = 2;
    float *W = rand_vec((size_t)out * in, 1), *bias = rand_vec(out, 1);
    uint16_t *Wb = malloc((size_t)out * in * 2);
    for (int i = 0; i < out * in; i++) Wb[i] = zi_f32_to_bf16(W[i]);
    float *A1 = rand_vec((size_t)r1 * in, 1), *B1 = rand_vec((size_t)out * r1, 1);
    float *A2 = rand_vec((size_t)r2 * in, 1), *B2 = rand_vec((size_t)out * r2, 1);
    float *dA = calloc((size_t)r1 * in, sizeof(float)), *dB = calloc((size_t)out * r1, sizeof(float));
    zi_lora_adapter frozen = { A2, B2, r2, 0.7f, NULL, NULL, NULL };
    zi_lora_adapter train = { A1, B1, r1, 1.5f, dA, dB, &frozen };
    zi_lin l = { "test", { Wb, ZI_BF16, out, in }, bias, &train };
    lin_ctx t = { &l, rand_vec((size_t)M * in, 1), rand_vec((size_t)M * out, 1), malloc((size_t)M * out * sizeof(float)),
                  M };
    float *dx = malloc((size_t)M * in * sizeof(float));
    zi_lin_backward(&l, t.x, t.c, M, dx);
    int ok = check_fd("lin dx", lin_loss, &t, t.x, dx, NULL, (size_t)M * in, 1e-2f, 1e-3);
    ok &= check_fd("lin dA", lin_loss, &t, A1, dA, NULL, (size_t)r1 * in, 1e-2f, 1e-3);
    ok &= check_fd("lin dB", lin_loss, &t, B1, dB, NULL, (size_t)out * r1, 1e-2f, 1e-3);
    /* without dx: the same parameter gradients, accumulated */
    float *dA1 = memcpy(malloc((size_t)r1 * in * sizeof(float)), dA, (size_t)r1 * in * sizeof(float));
    zi_lin_backward(&l, t.x, t.c, M, NULL);
    for (int i = 0; i < r1 * in; i++) ok &= fabsf(dA[i] - 2 * dA1[i]) <= 1e-6f * fabsf(dA1[i]) + 1e-7f;
    free(W); free(bias); free(Wb); free(A1); free(B1); free(A2); free(B2); free(dA); free(dB); free(dA1);
    free(t.x); free(t.c); free(t.y); free(dx);
    CHECK(ok, "zi_lin_backward");
}

/* The kernels at sizes where they split work among threads: 1, 2 or 3 threads, the same bits. */
TEST(backward_kernels_threads) {
    int S = 300, H = 4, D = 64, M = 300, in = 256, out = 512, r = 8;
    size_t n = (size_t)S * H * D;
    float *q = rand_vec(n, 2), *k = rand_vec(n, 2), *v = rand_vec(n, 1), *dout = rand_vec(n, 1);
    float *o = malloc(n * sizeof(float)), *lse = malloc((size_t)H * S * sizeof(float));
    float *W = rand_vec((size_t)out * in, 1), *A = rand_vec((size_t)r * in, 1), *B = rand_vec((size_t)out * r, 1);
    float *x = rand_vec((size_t)M * in, 1), *dy = rand_vec((size_t)M * out, 1);
    zi_attention(o, H * D, q, H * D, k, H * D, v, H * D, S, S, H, H, D, 0.125f, 0, S, lse);
    float *ref = NULL, *got = NULL;
    size_t m = 4 * n + (size_t)M * in + (size_t)r * (in + out) + (size_t)S * H * D;
    int ok = 1, counts[3] = { 1, 2, 3 };
    for (int t = 0; t < 3; t++) {
        zi_threads_init(counts[t]);
        float *g = calloc(m, sizeof(float)), *p = g;
        zi_attention_backward(p, p + n, p + 2 * n, q, k, v, o, dout, lse, H * D, S, S, H, D, 0.125f);
        p += 3 * n;
        zi_rmsnorm_backward(p, dout, q, NULL, (int64_t)S * H, D, 1e-5f);
        zi_layernorm_backward(p, dout, k, NULL, S, H * D, 1e-6f);
        p += n;
        zi_lora_adapter ad = { A, B, r, 0.5f, p + (size_t)M * in, p + (size_t)M * in + (size_t)r * in, NULL };
        zi_lin l = { "t", { W, ZI_F32, out, in }, NULL, &ad };
        zi_lin_backward(&l, x, dy, M, p);
        p += (size_t)M * in + (size_t)r * (in + out);
        memcpy(p, dout, n * sizeof(float));
        zi_rope_interleaved_backward(p, H * D, S, H, D, q, k);
        if (!ref) ref = g;
        else {
            got = g;
            ok &= !memcmp(got, ref, m * sizeof(float));
            free(got);
        }
    }
    zi_threads_init(0);
    free(q); free(k); free(v); free(dout); free(o); free(lse); free(W); free(A); free(B); free(x); free(dy);
    free(ref);
    CHECK(ok, "backward kernels depend on the thread count");
}

/* ---------------------------------------------------------------- the DiT */
/* The tiny model with the golden LoRA attached at run time, gradient buffers on every adapter. */
typedef struct {
    zi_dit *m;
    zi_lora *lora;
    float **dA, **dB;           /* per module of the LoRA file, NULL for unmatched ones */
    /* one training case */
    zi_st *st;
    float *x0, *noise, *cap, sigma;
    int h, w, L;
    size_t n;
} train_setup;

static int setup_open(train_setup *s, const char *golden) {
    memset(s, 0, sizeof *s);
    if (!(s->m = zi_dit_load(zt_golden(TINY)))) return -1;
    if (!(s->lora = zi_lora_load(zt_golden("lora-a-diffsynth.safetensors")))) return -1;
    int nl;
    zi_lin *const *lins = zi_dit_lins(s->m, &nl);
    if (zi_lora_apply(s->lora, lins, nl, 1.0f, 0, 0) < 0) return -1;
    s->dA = calloc(s->lora->n, sizeof(float *));
    s->dB = calloc(s->lora->n, sizeof(float *));
    for (int i = 0; i < s->lora->n; i++) {
        const zi_lora_module *mo = &s->lora->m[i];
        zi_lin *l = zi_dit_linear(s->m, mo->name);
        if (!l) continue;
        for (zi_lora_adapter *a = l->lora; a; a = a->next)
            if (a->A == mo->A) {
                a->dA = s->dA[i] = calloc((size_t)mo->rank * mo->in, sizeof(float));
                a->dB = s->dB[i] = calloc((size_t)mo->out * mo->rank, sizeof(float));
            }
    }
    if (!(s->st = zi_st_open(zt_golden(golden)))) return -1;
    const zi_tensor *x0 = zi_st_get(s->st, "train.x0"), *nz = zi_st_get(s->st, "train.noise");
    const zi_tensor *cap = zi_st_get(s->st, "train.cap"), *sg = zi_st_get(s->st, "train.sigma");
    if (!x0 || !nz || !cap || !sg || x0->ndim != 4 || cap->ndim != 2) return -1;
    s->x0 = zi_tensor_f32(x0);
    s->noise = zi_tensor_f32(nz);
    s->cap = zi_tensor_f32(cap);
    float *sv = zi_tensor_f32(sg);
    s->sigma = sv[0];
    free(sv);
    s->h = (int)x0->shape[2];
    s->w = (int)x0->shape[3];
    s->L = (int)cap->shape[0];
    s->n = (size_t)x0->numel;
    return 0;
}

static void setup_close(train_setup *s) {
    for (int i = 0; s->lora && i < s->lora->n; i++) { free(s->dA[i]); free(s->dB[i]); }
    free(s->dA); free(s->dB);
    zi_lora_free(s->lora);
    zi_dit_free(s->m);
    zi_st_close(s->st);
    free(s->x0); free(s->noise); free(s->cap);
}

static void zero_grads(train_setup *s) {
    for (int i = 0; i < s->lora->n; i++) {
        const zi_lora_module *mo = &s->lora->m[i];
        if (s->dA[i]) memset(s->dA[i], 0, (size_t)mo->rank * mo->in * sizeof(float));
        if (s->dB[i]) memset(s->dB[i], 0, (size_t)mo->out * mo->rank * sizeof(float));
    }
}

/* loss = mean((−dit(x_t, 1 − σ, cap) − (noise − x0))²), x_t = (1 − σ)·x0 + σ·noise, as the
 * golden files compute it; with backward set, dL/d(out) = 2·(out + noise − x0)/n goes to
 * zi_dit_backward. Returns the loss (NAN on error). */
static double train_loss(train_setup *s, int backward) {
    float *xt = malloc(s->n * sizeof(float)), *out = malloc(s->n * sizeof(float));
    float t = 1.0f - s->sigma;
    for (size_t i = 0; i < s->n; i++) xt[i] = (1.0f - s->sigma) * s->x0[i] + s->sigma * s->noise[i];
    const float *xp = xt, *cp = s->cap;
    double loss = NAN;
    if (!zi_dit_forward(s->m, 1, &xp, &s->h, &s->w, &t, &cp, &s->L, &out)) {
        loss = 0;
        for (size_t i = 0; i < s->n; i++) {
            double e = -(double)out[i] - ((double)s->noise[i] - s->x0[i]);
            loss += e * e;
        }
        loss /= (double)s->n;
        if (backward) {
            for (size_t i = 0; i < s->n; i++) out[i] = 2.0f * (out[i] + (s->noise[i] - s->x0[i])) / (float)s->n;
            if (zi_dit_backward(s->m, out)) loss = NAN;
        }
    }
    free(xt);
    free(out);
    return loss;
}

/* The backward's gradient against a central difference of the loss, at the element of p (n
 * values, gradient g) whose gradient is largest; both are appended to ana and num, and
 * printed with the module's name. */
static void fd_probe(train_setup *s, const char *name, int ab, float *p, const float *g, size_t n,
                     float *ana, float *num, int *k) {
    size_t at = 0;
    for (size_t e = 0; e < n; e++)
        if (fabsf(g[e]) > fabsf(g[at])) at = e;
    const float h = 1e-2f;
    float p0 = p[at];
    p[at] = p0 + h;
    double lp = train_loss(s, 0);
    p[at] = p0 - h;
    double lm = train_loss(s, 0);
    p[at] = p0;
    num[*k] = (float)((lp - lm) / (2 * h));
    ana[(*k)++] = g[at];
    fprintf(stderr, "    %s.lora_%c[%zu]: backward %.6g, finite difference %.6g\n", name, ab ? 'B' : 'A', at, g[at],
            num[*k - 1]);
}

/* The loss and every gradient of the golden file against ours. The golden LoRA puts an
 * adapter on each target Linear (to_q, to_k, to_v, to_out.0, w1, w2, w3) of every block
 * (n_layers main layers, n_refiner_layers noise and context refiners each, from the DiT's
 * config), and the golden file holds both gradients of each: all of them must be compared. */
static int compare_golden(train_setup *s, double loss) {
    const zi_tensor *lt = zi_st_get(s->st, "train.loss");
    float *lr = lt ? zi_tensor_f32(lt) : NULL, lg = (float)loss;
    int ok = lr && zt_close("train.loss", &lg, lr, 1, 1e-4);
    free(lr);
    const zi_dit_cfg *cfg = zi_dit_config(s->m);
    int blocks = zt_dit_blocks(cfg), ngolden = 0, ncompared = 0;
    for (int i = 0; i < zi_st_count(s->st); i++) ngolden += !strncmp(zi_st_at(s->st, i)->name, "grad.", 5);
    if (s->lora->n != 7 * blocks || ngolden != 2 * s->lora->n) {
        fprintf(stderr, "    %d LoRA modules (want 7 x %d blocks), %d golden gradients\n", s->lora->n, blocks, ngolden);
        ok = 0;
    }
    for (int i = 0; i < s->lora->n; i++) {
        const zi_lora_module *mo = &s->lora->m[i];
        for (int ab = 0; ab < 2; ab++) {
            char name[160];
            snprintf(name, sizeof name, "grad.%s.lora_%c", mo->name, ab ? 'B' : 'A');
            const zi_tensor *r = zi_st_get(s->st, name);
            size_t n = ab ? (size_t)mo->out * mo->rank : (size_t)mo->rank * mo->in;
            if (!r || (size_t)r->numel != n || !s->dA[i]) {
                fprintf(stderr, "    %s: missing or of another size\n", name);
                ok = 0;
                continue;
            }
            float *ref = zi_tensor_f32(r);
            ok &= zt_close(name + 5, ab ? s->dB[i] : s->dA[i], ref, n, 1e-3);
            free(ref);
            ncompared++;
        }
    }
    return ok && ncompared == ngolden;
}

TEST(backward_dit_golden) {
    for (int c = 0; c < 2; c++) {
        char file[32];
        snprintf(file, sizeof file, "train-%d.safetensors", c);
        train_setup s;
        int rc = setup_open(&s, file);
        CHECK(!rc, "%s: %s", file, zi_err());
        zi_dit_set_training(s.m, 1, c);       /* case 1 with gradient checkpointing */
        double loss = train_loss(&s, 1);
        int ok = !isnan(loss) && compare_golden(&s, loss);
        setup_close(&s);
        CHECK(ok, "%s: loss or gradients differ from PyTorch", file);
    }
}

/* How the finite-difference tests judge: each probe sits at the entry of largest gradient of
 * its tensor (so no probe is a near-zero gradient drowned in noise), and the error of all
 * probes together is taken relative to their largest magnitude (zt_close). The finite
 * difference's own error is absolute, not relative to the probed entry: the loss comes out of
 * a float32 forward, so it carries a rounding error of about 1e-7 of the loss, which the
 * central difference divides by 2h: ~1e-5 at h = 1e-2. The O(h²) truncation is no larger (on
 * both golden sets the differences at h = 2e-2 and 1e-2 agree to 1e-5 or better, while at
 * h = 1.25e-3 the rounding scatters them by up to 1e-4), so h = 1e-2 is about the most
 * accurate step. Against the scale of the gradients (~1e-2 to 1e-1) that error stays ~1e-4, well inside
 * 2e-3; judged per probe it would not for a module whose largest gradient happens to be small
 * (a few 1e-3), without the backward being any less right. */

/* The names of the probed modules, "%d" standing for a block index: the first (0) or the
 * last (L) of its stack, whose depth comes from the model's config, so that every stage is
 * probed whatever the number of layers. */
typedef struct { const char *fmt; char last; } probe_mod;

static void probe_name(char *name, size_t cap, const zi_dit *m, probe_mod p) {
    const zi_dit_cfg *c = zi_dit_config(m);
    int depth = !strncmp(p.fmt, "layers.", 7) ? c->n_layers : c->n_refiner_layers;
    snprintf(name, cap, p.fmt, p.last == 'L' ? depth - 1 : 0);
}

/* d loss / d A[i], d B[i] against central differences of the loss, at the entries of largest
 * gradient of a few modules across the stages. */
TEST(backward_dit_fd) {
    train_setup s;
    CHECK(!setup_open(&s, "train-0.safetensors"), "%s", zi_err());
    zi_dit_set_training(s.m, 1, 0);
    CHECK(!isnan(train_loss(&s, 1)), "%s", zi_err());
    zi_dit_set_training(s.m, 0, 0);
    static const probe_mod mods[] = { { "layers.%d.attention.to_q", 'L' }, { "layers.%d.feed_forward.w2", '0' },
                                      { "noise_refiner.%d.attention.to_k", '0' },
                                      { "context_refiner.%d.feed_forward.w1", 'L' },
                                      { "layers.%d.attention.to_out.0", 'L' } };
    enum { NM = sizeof mods / sizeof mods[0] };
    float ana[2 * NM], num[2 * NM];
    int k = 0;
    for (int j = 0; j < NM; j++) {
        char name[96];
        probe_name(name, sizeof name, s.m, mods[j]);
        for (int i = 0; i < s.lora->n; i++) {
            zi_lora_module *mo = &s.lora->m[i];
            if (strcmp(mo->name, name)) continue;
            for (int ab = 0; ab < 2; ab++)
                fd_probe(&s, name, ab, ab ? mo->B : mo->A, ab ? s.dB[i] : s.dA[i],
                         ab ? (size_t)mo->out * mo->rank : (size_t)mo->rank * mo->in, ana, num, &k);
        }
    }
    int ok = k == 2 * NM && zt_close("dit lora grads vs fd", ana, num, k, 2e-3);
    setup_close(&s);
    CHECK(ok, "DiT LoRA gradients disagree with finite differences");
}

/* Adapters on every Linear of the model (embedders, adaLN modulations, final layer, timestep
 * MLP included): their gradients against central differences at a few modules' entries of
 * largest gradient. This exercises the paths the golden LoRA does not reach: dL/dtemb, the
 * final layer's scale, the embedders. */
TEST(backward_dit_fd_all_linears) {
    train_setup s;
    CHECK(!setup_open(&s, "train-1.safetensors"), "%s", zi_err());
    rng_state = 0x13198a2e03707344ull;      /* the same adapters alone or after other tests */
    int nl = zi_dit_nlin(s.m), R = 2;
    zi_lora_adapter *ad = calloc(nl, sizeof *ad);
    for (int i = 0; i < nl; i++) {
        zi_lin *l = zi_dit_lin_at(s.m, i);
        int in = (int)l->W.cols, out = (int)l->W.rows;
        ad[i] = (zi_lora_adapter){ rand_vec((size_t)R * in, 1.7f / sqrtf((float)in)), rand_vec((size_t)out * R, 0.1f), R,
                                   0.8f, calloc((size_t)R * in, sizeof(float)), calloc((size_t)out * R, sizeof(float)),
                                   l->lora };
        l->lora = &ad[i];
    }
    zi_dit_set_training(s.m, 1, 1);
    CHECK(!isnan(train_loss(&s, 1)), "%s", zi_err());
    zi_dit_set_training(s.m, 0, 0);
    /* the embedders and the final layer are named by the patch sizes ("2-1": patch 2, frame patch 1) */
    const zi_dit_cfg *cfg = zi_dit_config(s.m);
    char mods[8][96];
    enum { NM = sizeof mods / sizeof mods[0] };
    snprintf(mods[0], sizeof mods[0], "t_embedder.mlp.0");
    snprintf(mods[1], sizeof mods[1], "t_embedder.mlp.2");
    snprintf(mods[2], sizeof mods[2], "all_x_embedder.%d-%d", cfg->patch, cfg->f_patch);
    snprintf(mods[3], sizeof mods[3], "cap_embedder.1");
    probe_name(mods[4], sizeof mods[4], s.m, (probe_mod){ "noise_refiner.%d.adaLN_modulation.0", 'L' });
    probe_name(mods[5], sizeof mods[5], s.m, (probe_mod){ "layers.%d.adaLN_modulation.0", '0' });
    snprintf(mods[6], sizeof mods[6], "all_final_layer.%d-%d.adaLN_modulation.1", cfg->patch, cfg->f_patch);
    snprintf(mods[7], sizeof mods[7], "all_final_layer.%d-%d.linear", cfg->patch, cfg->f_patch);
    float ana[2 * NM], num[2 * NM];
    int k = 0;
    for (int i = 0; i < nl; i++) {
        zi_lin *l = zi_dit_lin_at(s.m, i);
        int j = 0;
        while (j < NM && strcmp(mods[j], l->name)) j++;
        if (j == NM) continue;
        for (int ab = 0; ab < 2; ab++)
            fd_probe(&s, l->name, ab, (float *)(ab ? ad[i].B : ad[i].A), ab ? ad[i].dB : ad[i].dA,
                     (size_t)R * (ab ? l->W.rows : l->W.cols), ana, num, &k);
    }
    int ok = k == 2 * NM && zt_close("all-linear grads vs fd", ana, num, k, 2e-3);
    for (int i = 0; i < nl; i++) {
        zi_lin *l = zi_dit_lin_at(s.m, i);
        l->lora = ad[i].next;
        free((float *)ad[i].A); free((float *)ad[i].B); free(ad[i].dA); free(ad[i].dB);
    }
    free(ad);
    setup_close(&s);
    CHECK(ok, "gradients of adapters outside the blocks disagree with finite differences");
}

/* Copies of every gradient buffer, concatenated. */
static float *grads_copy(const train_setup *s, size_t *n) {
    size_t tot = 0;
    for (int i = 0; i < s->lora->n; i++)
        tot += (size_t)s->lora->m[i].rank * (s->lora->m[i].in + s->lora->m[i].out);
    float *g = malloc(tot * sizeof(float)), *p = g;
    for (int i = 0; i < s->lora->n; i++) {
        const zi_lora_module *mo = &s->lora->m[i];
        memcpy(p, s->dA[i], (size_t)mo->rank * mo->in * sizeof(float));
        p += (size_t)mo->rank * mo->in;
        memcpy(p, s->dB[i], (size_t)mo->out * mo->rank * sizeof(float));
        p += (size_t)mo->out * mo->rank;
    }
    *n = tot;
    return g;
}

/* Gradient checkpointing on or off, 1 or 3 threads: the same bits. */
TEST(backward_dit_invariance) {
    train_setup s;
    CHECK(!setup_open(&s, "train-1.safetensors"), "%s", zi_err());
    float *ref = NULL;
    size_t n = 0;
    int ok = 1;
    static const int cfg[3][2] = { { 0, 1 }, { 1, 1 }, { 1, 3 } };   /* checkpointing, threads */
    for (int r = 0; r < 3; r++) {
        zi_threads_init(cfg[r][1]);
        zi_dit_set_training(s.m, 1, cfg[r][0]);
        zero_grads(&s);
        ok &= !isnan(train_loss(&s, 1));
        float *g = grads_copy(&s, &n);
        if (!ref) ref = g;
        else {
            if (memcmp(g, ref, n * sizeof(float))) {
                fprintf(stderr, "    checkpointing %d, %d threads: gradients differ\n", cfg[r][0], cfg[r][1]);
                ok = 0;
            }
            free(g);
        }
    }
    zi_threads_init(0);
    free(ref);
    setup_close(&s);
    CHECK(ok, "gradients depend on checkpointing or the thread count");
}

TEST(backward_dit_errors) {
    zi_dit *m = zi_dit_load(zt_golden(TINY));
    CHECK(m, "%s", zi_err());
    /* a 2x2 latent of the model's channels, a caption of one token of its feature width */
    const zi_dit_cfg *cfg = zi_dit_config(m);
    size_t nx = (size_t)cfg->in_channels * 4;
    float *x = calloc(nx, sizeof(float)), *cap = calloc(cfg->cap_feat_dim, sizeof(float));
    float *o0 = calloc(nx, sizeof(float)), *o1 = calloc(nx, sizeof(float)), t[2] = { 0.5f, 0.5f };
    const float *xs[2] = { x, x }, *cs[2] = { cap, cap };
    float *os[2] = { o0, o1 };
    int h[2] = { 2, 2 }, w[2] = { 2, 2 }, L[2] = { 1, 1 };
    CHECK(zi_dit_backward(m, o0) == -1 && strstr(zi_err(), "training forward"), "backward without forward");
    zi_dit_set_training(m, 1, 0);
    CHECK(zi_dit_forward(m, 2, xs, h, w, t, cs, L, os) == -1 && strstr(zi_err(), "one item"), "B = 2 in training");
    CHECK(zi_dit_forward(m, 1, xs, h, w, t, cs, L, os) == 0, "%s", zi_err());
    CHECK(zi_dit_backward(m, o0) == 0, "%s", zi_err());
    CHECK(zi_dit_backward(m, o0) == -1, "a second backward of the same forward");
    free(x); free(cap); free(o0); free(o1);
    zi_dit_free(m);
}
