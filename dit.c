/* dit.c: the Z-Image diffusion transformer, diffusers' ZImageTransformer2DModel (S3-DiT).
 *
 *   temb = t_embedder(t · t_scale)                                   [B, A]
 *   X    = pad32(x_embedder(patchify(x)); x_pad_token)               image tokens
 *   X    = noise_refiner[i](X, temb)            (modulated blocks)
 *   Cc   = pad32(cap_embedder(cap); cap_pad_token)                   caption tokens
 *   Cc   = context_refiner[i](Cc)               (blocks without modulation)
 *   U    = [X ; Cc]                                                  image first
 *   U    = layers[i](U, temb)                   (modulated blocks)
 *   out  = unpatchify(final_layer(U[:Ni], temb))
 *
 * Training (LoRA): zi_dit_set_training makes the forward keep what zi_dit_backward needs;
 * every x_forward has its x_backward right after it.
 *
 * A batch of B items of different sizes runs as one *packed* sequence per stage: the items'
 * rows one after another, item b owning the segment [off[b], off[b] + len[b]). Row-wise work
 * (Linear layers, norms) runs once over all rows; attention runs inside each segment. Every
 * result therefore depends only on its own item, and equals the single-item run bit for bit.
 * (diffusers right-pads the items and masks the padded keys: the same numbers.)
 *
 * Pad tokens: each item's image and caption rows are padded to a multiple of 32 with learned
 * vectors. They are not masked: they attend and are attended to, so they change the result.
 */
#include "zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SEQ_MULTI_OF 32     /* image and caption rows are padded to multiples of this */
#define QK_NORM_EPS 1e-5f   /* diffusers builds the QK RMSNorms with eps 1e-5, whatever norm_eps */
#define FINAL_LN_EPS 1e-6f  /* the final LayerNorm (no affine) */
#define T_MAX_PERIOD 10000.0

/* ---------------------------------------------------------------- model */
typedef struct {
    char name[48];                          /* "layers.3", "noise_refiner.0", ... */
    zi_lin to_q, to_k, to_v, to_out;        /* attention.to_q ... attention.to_out.0: [D, D] */
    float *norm_q, *norm_k;                 /* [head_dim], NULL without qk_norm */
    zi_lin w1, w2, w3;                      /* feed_forward: w1, w3 [F, D], w2 [D, F] */
    int ffn;                                /* F */
    float *attn_norm1, *attn_norm2, *ffn_norm1, *ffn_norm2;     /* [D] */
    int modulated;                          /* noise refiners and main layers */
    zi_lin ada;                             /* adaLN_modulation.0: [4D, A], modulated blocks only */
} dit_block;

struct zi_dit {
    zi_dit_cfg c;
    zi_st *st;
    int t_freq;                     /* width of the timestep sinusoid (256) */
    int ffn_max;                    /* largest F over the blocks */
    int ffn_tile;                   /* inference feed-forward tile in rows (zi_dit_set_ffn_tile) */
    zi_lin x_emb;                   /* all_x_embedder.{p}-{pf}: [D, pf·p·p·C] */
    zi_lin t_mlp0, t_mlp2;          /* t_embedder.mlp.0 [Tmid, t_freq], mlp.2 [A, Tmid] */
    float *cap_norm;                /* cap_embedder.0 (RMSNorm): [cap_feat_dim] */
    zi_lin cap_lin;                 /* cap_embedder.1: [D, cap_feat_dim] */
    float *x_pad, *cap_pad;         /* x_pad_token, cap_pad_token: [D] */
    dit_block *noise_ref, *ctx_ref, *layers;
    zi_lin final_ada;               /* all_final_layer.{p}-{pf}.adaLN_modulation.1: [D, A] */
    zi_lin final_lin;               /* all_final_layer.{p}-{pf}.linear: [pf·p·p·C, D] */
    float *rope_cos[3], *rope_sin[3];   /* axis a: [axes_lens[a], axes_dims[a] / 2] */
    zi_lin **lins;                  /* every Linear, in load order */
    int nlin;
    struct dit_train *tr;           /* training state (zi_dit_set_training); NULL for inference.
                                       Not const through a const zi_dit: the forward fills it */
};

/* ---------------------------------------------------------------- loading */
/* Size of dimension d of the ndim-dimensional tensor NAME; -1 (error set) when it is missing
 * or has another rank. The caller then checks the full shape with zi_st_need. */
static int64_t dim_of(const zi_st *st, const char *name, int ndim, int d) {
    const zi_tensor *t = zi_st_get(st, name);
    if (!t || t->ndim != ndim) {
        zi_seterr("%s: %s %s", zi_st_path(st), name, t ? "has the wrong number of dimensions" : "is missing");
        return -1;
    }
    return t->shape[d];
}

/* A float32 copy of the float tensor NAME of shape [n] (or [1, n] when row is set). */
static float *load_vec(const zi_dit *m, const char *name, int64_t n, int row) {
    int64_t shape[2] = { row ? 1 : n, n };
    return zi_st_need_f32(m->st, name, row ? 2 : 1, row ? shape : shape + 1);
}

/* The Linear module NAME: weight [out, in] (a view into the mmap), optional bias [out]. */
static int load_lin(zi_dit *m, zi_lin *l, const char *name, int64_t out, int64_t in, int bias) {
    char key[160 + 8];                         /* a block's module name (< 160) + ".weight" */
    snprintf(key, sizeof key, "%s.weight", name);
    zi_mat W;
    if (zi_st_need_mat(m->st, key, 2, (const int64_t[]){ out, in }, &W)) return -1;
    *l = (zi_lin){ .name = zi_strdup(name), .W = W };
    m->lins = zi_realloc(m->lins, (m->nlin + 1) * sizeof *m->lins);
    m->lins[m->nlin++] = l;
    if (bias) {
        snprintf(key, sizeof key, "%s.bias", name);
        if (!(l->bias = load_vec(m, key, out, 0))) return -1;
    }
    return 0;
}

static int load_block(zi_dit *m, dit_block *b, const char *prefix, int i, int modulated) {
    int64_t D = m->c.dim, hd = m->c.head_dim;
    char k[160];
    snprintf(b->name, sizeof b->name, "%s.%d", prefix, i);
#define NAME(s) (snprintf(k, sizeof k, "%s.%s", b->name, s), k)
    if (load_lin(m, &b->to_q, NAME("attention.to_q"), D, D, 0) ||
        load_lin(m, &b->to_k, NAME("attention.to_k"), D, D, 0) ||
        load_lin(m, &b->to_v, NAME("attention.to_v"), D, D, 0) ||
        load_lin(m, &b->to_out, NAME("attention.to_out.0"), D, D, 0))
        return -1;
    if (m->c.qk_norm && (!(b->norm_q = load_vec(m, NAME("attention.norm_q.weight"), hd, 0)) ||
                         !(b->norm_k = load_vec(m, NAME("attention.norm_k.weight"), hd, 0))))
        return -1;
    int64_t F = dim_of(m->st, NAME("feed_forward.w1.weight"), 2, 0);
    if (F < 0) return -1;
    if (F == 0 || F > 1 << 24) {
        zi_seterr("%s: %s has %lld rows", zi_st_path(m->st), k, (long long)F);
        return -1;
    }
    b->ffn = (int)F;
    if (b->ffn > m->ffn_max) m->ffn_max = b->ffn;
    if (load_lin(m, &b->w1, NAME("feed_forward.w1"), F, D, 0) ||
        load_lin(m, &b->w2, NAME("feed_forward.w2"), D, F, 0) ||
        load_lin(m, &b->w3, NAME("feed_forward.w3"), F, D, 0))
        return -1;
    if (!(b->attn_norm1 = load_vec(m, NAME("attention_norm1.weight"), D, 0)) ||
        !(b->attn_norm2 = load_vec(m, NAME("attention_norm2.weight"), D, 0)) ||
        !(b->ffn_norm1 = load_vec(m, NAME("ffn_norm1.weight"), D, 0)) ||
        !(b->ffn_norm2 = load_vec(m, NAME("ffn_norm2.weight"), D, 0)))
        return -1;
    b->modulated = modulated;
    if (modulated && load_lin(m, &b->ada, NAME("adaLN_modulation.0"), 4 * D, m->c.adaln_dim, 1)) return -1;
#undef NAME
    return 0;
}

/* Reads and checks config.json. The constraints are the ones diffusers asserts, plus those
 * of this implementation (latents have one frame, so the frame patch must be 1).
 * n_kv_heads is not read: diffusers ignores it too (its attention has n_heads key heads). */
static int read_config(zi_dit *m, const char *dir) {
    zj *cfg = zi_config_load(dir, "");
    if (!cfg) return -1;
    char *path = zi_path("%s/config.json", dir);
    zi_dit_cfg *c = &m->c;
    int patch[8], fpatch[8], np, nf, na, nl, rc = -1;
    if (zi_cfg_need_int(cfg, "in_channels", &c->in_channels) || zi_cfg_need_int(cfg, "dim", &c->dim) ||
        zi_cfg_need_int(cfg, "n_layers", &c->n_layers) || zi_cfg_need_int(cfg, "n_refiner_layers", &c->n_refiner_layers) ||
        zi_cfg_need_int(cfg, "n_heads", &c->n_heads) || zi_cfg_need_int(cfg, "cap_feat_dim", &c->cap_feat_dim) ||
        (np = zi_cfg_ints(cfg, "all_patch_size", patch, 8)) < 0 || (nf = zi_cfg_ints(cfg, "all_f_patch_size", fpatch, 8)) < 0 ||
        (na = zi_cfg_ints(cfg, "axes_dims", c->axes_dims, 3)) < 0 || (nl = zi_cfg_ints(cfg, "axes_lens", c->axes_lens, 3)) < 0)
        goto done;
    if (np < 1 || nf != np || na != 3 || nl != 3) {
        zi_seterr("%s: all_patch_size and all_f_patch_size must be lists of one length, axes_dims and axes_lens of 3", path);
        goto done;
    }
    /* the forward uses the first patch size, diffusers' default ("2-1") */
    c->patch = patch[0];
    c->f_patch = fpatch[0];
    c->norm_eps = (float)zi_cfg_num(cfg, "norm_eps", 1e-5);
    c->t_scale = (float)zi_cfg_num(cfg, "t_scale", 1000.0);
    c->rope_theta = zi_cfg_num(cfg, "rope_theta", 256.0);
    c->qk_norm = zj_bool(cfg, "qk_norm", 1);
    if (c->patch < 1 || c->patch > 64 || c->f_patch != 1 || c->in_channels < 1 || c->in_channels > 1 << 16 ||
        c->dim < 1 || c->n_heads < 1 ||
        c->dim % c->n_heads || c->n_layers < 0 || c->n_layers > 4096 || c->n_refiner_layers < 0 ||
        c->n_refiner_layers > 4096 || c->cap_feat_dim < 1 ||
        !(c->norm_eps > 0) || !(c->rope_theta > 0)) {
        zi_seterr("%s: bad sizes (patch %d, f_patch %d (must be 1), in_channels %d, dim %d, n_heads %d)", path,
                  c->patch, c->f_patch, c->in_channels, c->dim, c->n_heads);
        goto done;
    }
    c->head_dim = c->dim / c->n_heads;
    int sum = 0;
    for (int a = 0; a < 3; a++) {
        if (c->axes_dims[a] < 0 || c->axes_dims[a] % 2 || c->axes_lens[a] < 1 || c->axes_lens[a] > 1 << 20) {
            zi_seterr("%s: axes_dims must be even and axes_lens in 1..2^20", path);
            goto done;
        }
        sum += c->axes_dims[a];
    }
    if (sum != c->head_dim) {
        zi_seterr("%s: axes_dims sum to %d but dim / n_heads is %d", path, sum, c->head_dim);
        goto done;
    }
    rc = 0;
done:
    free(path);
    zj_free(cfg);
    return rc;
}

/* Sizes that only the tensors tell: adaLN width A, timestep MLP widths. Then every weight. */
static int load_weights(zi_dit *m) {
    zi_dit_cfg *c = &m->c;
    int64_t D = c->dim, pdim = (int64_t)c->f_patch * c->patch * c->patch * c->in_channels;
    int64_t tmid = dim_of(m->st, "t_embedder.mlp.0.weight", 2, 0);
    int64_t tfreq = dim_of(m->st, "t_embedder.mlp.0.weight", 2, 1);
    int64_t A = dim_of(m->st, "t_embedder.mlp.2.weight", 2, 0);
    if (tmid < 0 || tfreq < 0 || A < 0) return -1;
    if (tmid < 1 || tfreq < 2 || tfreq % 2 || A < 1 || tmid > 1 << 24 || tfreq > 1 << 24 || A > 1 << 24) {
        zi_seterr("%s: t_embedder has bad shapes", zi_st_path(m->st));
        return -1;
    }
    m->t_freq = (int)tfreq;
    c->adaln_dim = (int)A;
    char key[64];
    snprintf(key, sizeof key, "all_x_embedder.%d-%d", c->patch, c->f_patch);
    if (load_lin(m, &m->x_emb, key, D, pdim, 1)) return -1;
    if (load_lin(m, &m->t_mlp0, "t_embedder.mlp.0", tmid, tfreq, 1) ||
        load_lin(m, &m->t_mlp2, "t_embedder.mlp.2", A, tmid, 1))
        return -1;
    if (!(m->cap_norm = load_vec(m, "cap_embedder.0.weight", c->cap_feat_dim, 0)) ||
        load_lin(m, &m->cap_lin, "cap_embedder.1", D, c->cap_feat_dim, 1))
        return -1;
    if (!(m->x_pad = load_vec(m, "x_pad_token", D, 1)) || !(m->cap_pad = load_vec(m, "cap_pad_token", D, 1)))
        return -1;
    m->noise_ref = zi_calloc(c->n_refiner_layers, sizeof(dit_block));
    m->ctx_ref = zi_calloc(c->n_refiner_layers, sizeof(dit_block));
    m->layers = zi_calloc(c->n_layers, sizeof(dit_block));
    for (int i = 0; i < c->n_refiner_layers; i++)
        if (load_block(m, &m->noise_ref[i], "noise_refiner", i, 1)) return -1;
    for (int i = 0; i < c->n_refiner_layers; i++)
        if (load_block(m, &m->ctx_ref[i], "context_refiner", i, 0)) return -1;
    for (int i = 0; i < c->n_layers; i++)
        if (load_block(m, &m->layers[i], "layers", i, 1)) return -1;
    char k2[96];
    snprintf(key, sizeof key, "all_final_layer.%d-%d", c->patch, c->f_patch);
    snprintf(k2, sizeof k2, "%s.adaLN_modulation.1", key);
    if (load_lin(m, &m->final_ada, k2, D, A, 1)) return -1;
    snprintf(k2, sizeof k2, "%s.linear", key);
    return load_lin(m, &m->final_lin, k2, pdim, D, 1);
}

/* RoPE tables as diffusers builds them: per axis a of width d, frequencies
 * ω_k = 1 / θ^(2k/d) and angles pos·ω_k in float64, rounded to float32, then cos and sin in
 * float32 (torch.polar on the rounded angles). */
static void rope_tables(zi_dit *m) {
    for (int a = 0; a < 3; a++) {
        int half = m->c.axes_dims[a] / 2, n = m->c.axes_lens[a];
        m->rope_cos[a] = zi_malloc((size_t)n * half * sizeof(float));
        m->rope_sin[a] = zi_malloc((size_t)n * half * sizeof(float));
        for (int k = 0; k < half; k++) {
            double w = 1.0 / pow(m->c.rope_theta, (double)(2 * k) / m->c.axes_dims[a]);
            for (int p = 0; p < n; p++) {
                float phi = (float)(p * w);
                m->rope_cos[a][(size_t)p * half + k] = cosf(phi);
                m->rope_sin[a][(size_t)p * half + k] = sinf(phi);
            }
        }
    }
}

zi_dit *zi_dit_load(const char *dir) {
    zi_dit *m = zi_calloc(1, sizeof *m);
    m->ffn_tile = ZI_DIT_FFN_TILE;
    if (read_config(m, dir) || !(m->st = zi_st_open(dir)) || load_weights(m)) {
        zi_dit_free(m);
        return NULL;
    }
    rope_tables(m);
    return m;
}

static void free_block(dit_block *b) {
    free(b->norm_q); free(b->norm_k);
    free(b->attn_norm1); free(b->attn_norm2); free(b->ffn_norm1); free(b->ffn_norm2);
}

void zi_dit_free(zi_dit *m) {
    if (!m) return;
    for (int i = 0; i < m->nlin; i++) {
        free((char *)m->lins[i]->name);
        free((float *)m->lins[i]->bias);
    }
    free(m->lins);
    for (int i = 0; m->noise_ref && i < m->c.n_refiner_layers; i++) free_block(&m->noise_ref[i]);
    for (int i = 0; m->ctx_ref && i < m->c.n_refiner_layers; i++) free_block(&m->ctx_ref[i]);
    for (int i = 0; m->layers && i < m->c.n_layers; i++) free_block(&m->layers[i]);
    free(m->noise_ref); free(m->ctx_ref); free(m->layers);
    free(m->cap_norm); free(m->x_pad); free(m->cap_pad);
    for (int a = 0; a < 3; a++) { free(m->rope_cos[a]); free(m->rope_sin[a]); }
    zi_dit_set_training(m, 0, 0);
    zi_st_close(m->st);
    free(m);
}

const zi_dit_cfg *zi_dit_config(const zi_dit *m) { return &m->c; }
void zi_dit_set_ffn_tile(zi_dit *m, int rows) { m->ffn_tile = rows; }
int zi_dit_nlin(const zi_dit *m) { return m->nlin; }
zi_lin *zi_dit_lin_at(zi_dit *m, int i) { return i >= 0 && i < m->nlin ? m->lins[i] : NULL; }
zi_lin *const *zi_dit_lins(zi_dit *m, int *n) { *n = m->nlin; return m->lins; }

zi_lin *zi_dit_linear(zi_dit *m, const char *name) {
    for (int i = 0; i < m->nlin; i++)
        if (!strcmp(m->lins[i]->name, name)) return m->lins[i];
    return NULL;
}

/* ---------------------------------------------------------------- packed sequences */
/* Segment s of a packed sequence: rows [off[s], off[s] + len[s]). */
typedef struct {
    int n;
    int *off, *len;
} segs;

static segs segs_new(int n) {
    return (segs){ n, zi_calloc(n, sizeof(int)), zi_calloc(n, sizeof(int)) };
}
static void segs_free(segs *s) { free(s->off); free(s->len); }
static int segs_rows(const segs *s) { return s->n ? s->off[s->n - 1] + s->len[s->n - 1] : 0; }

/* Activations of one block over a packed sequence of S tokens. The forward writes each
 * intermediate to its own buffer and reuses one set for every block; training copies what
 * the backward reads out of it after each block (block_saved). The residual stream x is
 * updated in place by block_forward; training saves it before the block.
 *
 * Inference keeps nothing for a backward, so intermediates whose lifetimes do not overlap
 * share a buffer, and the feed-forward runs over at most ffn_rows tokens at a time (its
 * [rows, F] intermediates are the largest activations):
 *   xn -> o -> fn      xn is dead once to_q, to_k, to_v have read it; o once to_out has
 *   q0 = q -> ao = an  QK-norm and RoPE in place; q is dead after the attention
 *   k0 = k -> f = fo   k is dead after the attention
 *   h1 = g             silu(h1) ⊙ h3 in place; h1, h3 [ffn_rows, F]
 * 4·S·D + 2·ffn_rows·F floats instead of 12·S·D + 3·S·F: at 1024² (S = 4128, ffn_rows 2048)
 * 0.4 GB per item instead of 1.3 GB, the same numbers bit for bit. */
typedef struct {
    float *mod;         /* [B, 4D] per item: 1 + scale_msa | tanh(gate_msa) | 1 + scale_mlp | tanh(gate_mlp) */
    float *xn;          /* [S, D] attention_norm1(x) ⊙ (1 + scale_msa): input of to_q, to_k, to_v */
    float *q0, *k0;     /* [S, D] to_q(xn), to_k(xn) before the QK RMSNorm */
    float *q, *k, *v;   /* [S, H, hd] q, k after QK-norm and RoPE; v = to_v(xn) */
    float *lse;         /* [H, S] per segment [H, len] at H·off: log-sum-exp of the attention */
    float *o;           /* [S, D] attention output, heads concatenated: input of to_out.0 */
    float *ao;          /* [S, D] to_out.0(o) */
    float *an;          /* [S, D] attention_norm2(ao) */
    float *fn;          /* [S, D] ffn_norm1(x) ⊙ (1 + scale_mlp) */
    float *h1, *h3;     /* [ffn_rows, F] w1(fn), w3(fn) */
    float *g;           /* [ffn_rows, F] silu(h1) ⊙ h3: input of w2 */
    float *f;           /* [S, D] w2(g) */
    float *fo;          /* [S, D] ffn_norm2(f) */
    int64_t ffn_rows;   /* S, or the inference feed-forward's tile */
    int shared;         /* inference: the buffers are shared as above */
} block_acts;

/* ffn_tile: the inference feed-forward's tile (rows), 0 = all rows; training (keeping
 * activations or recomputing them for the backward) has every intermediate of all S rows. */
static void acts_alloc(block_acts *a, int B, int64_t S, int D, int F, int H, int training, int ffn_tile) {
    size_t sd = (size_t)S * D * sizeof(float);
    a->shared = !training;
    a->ffn_rows = training || ffn_tile <= 0 || ffn_tile > S ? S : ffn_tile;
    size_t sf = (size_t)a->ffn_rows * F * sizeof(float);
    a->mod = zi_malloc((size_t)B * 4 * D * sizeof(float));
    a->xn = zi_malloc(sd); a->q = zi_malloc(sd); a->k = zi_malloc(sd); a->v = zi_malloc(sd);
    a->lse = zi_malloc((size_t)S * H * sizeof(float));
    a->h1 = zi_malloc(sf); a->h3 = zi_malloc(sf);
    if (a->shared) {
        a->o = a->fn = a->xn;
        a->q0 = a->ao = a->an = a->q;
        a->k0 = a->f = a->fo = a->k;
        a->g = a->h1;
        return;
    }
    a->q0 = zi_malloc(sd); a->k0 = zi_malloc(sd);
    a->o = zi_malloc(sd); a->ao = zi_malloc(sd); a->an = zi_malloc(sd); a->fn = zi_malloc(sd);
    a->g = zi_malloc(sf);
    a->f = zi_malloc(sd); a->fo = zi_malloc(sd);
}

static void acts_free(block_acts *a) {
    float *p[] = { a->mod, a->xn, a->q, a->k, a->v, a->lse, a->h1, a->h3 };
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
    if (a->shared) return;
    float *own[] = { a->q0, a->k0, a->o, a->ao, a->an, a->fn, a->g, a->f, a->fo };
    for (size_t i = 0; i < sizeof own / sizeof own[0]; i++) free(own[i]);
}

/* Row-wise products with one vector per segment, split over the threads by rows:
 * y[r, :] ⊙= v_s (src NULL) or y[r, :] += v_s ⊙ src[r, :], v_s = vec + s·stride for the rows r
 * of segment s. Every element is one operation of its own: the same bits for any split. */
typedef struct {
    float *y;
    const float *src;
    const segs *sg;
    int D;
    const float *vec;
    int64_t stride;
} rows_job;

static void rows_range(void *ctx, int64_t r0, int64_t r1) {
    const rows_job *j = ctx;
    int D = j->D;
    for (int s = 0; s < j->sg->n; s++) {
        int64_t lo = j->sg->off[s] > r0 ? j->sg->off[s] : r0;
        int64_t hi = j->sg->off[s] + j->sg->len[s] < r1 ? j->sg->off[s] + j->sg->len[s] : r1;
        const float *v = j->vec + s * j->stride;
        for (int64_t r = lo; r < hi; r++) {
            float *y = j->y + r * D;
            if (j->src)
                for (int d = 0; d < D; d++) y[d] += v[d] * j->src[r * D + d];
            else
                for (int d = 0; d < D; d++) y[d] *= v[d];
        }
    }
}

static void rows_apply(float *y, const float *src, const segs *sg, int D, const float *vec, int64_t stride) {
    rows_job j = { y, src, sg, D, vec, stride };
    zi_parallel_for(segs_rows(sg), 16, rows_range, &j);
}

/* y[r, :] ⊙= v_s for every row r of segment s, with v_s = vec + s·stride. */
static void mul_rows(float *y, const segs *sg, int D, const float *vec, int64_t stride) {
    rows_apply(y, NULL, sg, D, vec, stride);
}

/* Backward of y = u ⊙ v row by row (mul_rows, v_s = vec + s·stride; no vec: y = u):
 * du = dy ⊙ v_s (du may alias dy), dvec_s += Σ_rows dy ⊙ u, summed over rows in order. The
 * work is split by columns, in blocks of 16 (whole cache lines of du): each column's sum is
 * then one thread's, in row order, so the bits do not depend on the split. */
typedef struct {
    float *du, *dvec;
    const float *dy, *u, *vec;
    const segs *sg;
    int D;
    int64_t stride;
} mul_bw_job;

static void mul_bw_cols(void *ctx, int64_t b0, int64_t b1) {
    const mul_bw_job *j = ctx;
    int d0 = (int)b0 * 16, d1 = b1 * 16 < j->D ? (int)b1 * 16 : j->D;
    for (int s = 0; s < j->sg->n; s++) {
        float *dv = j->dvec + s * j->stride;
        const float *v = j->vec + s * j->stride;
        for (int r = j->sg->off[s]; r < j->sg->off[s] + j->sg->len[s]; r++)
            for (int d = d0; d < d1; d++) {
                int64_t i = (int64_t)r * j->D + d;
                dv[d] += j->dy[i] * j->u[i];
                j->du[i] = j->dy[i] * v[d];
            }
    }
}

static void mul_rows_backward(float *du, float *dvec, const float *dy, const float *u, const segs *sg, int D,
                              const float *vec, int64_t stride) {
    if (!vec) {
        if (du != dy) memcpy(du, dy, (size_t)segs_rows(sg) * D * sizeof(float));
        return;
    }
    mul_bw_job j = { du, dvec, dy, u, vec, sg, D, stride };
    zi_parallel_for((D + 15) / 16, 1, mul_bw_cols, &j);
}

/* x += g_s ⊙ y row by row (g_s = gate + s·stride), or x += y without a gate. */
static void add_rows(float *x, const float *y, const segs *sg, int D, const float *gate, int64_t stride) {
    if (!gate) {
        zi_add(x, x, y, (int64_t)segs_rows(sg) * D);
        return;
    }
    rows_apply(x, y, sg, D, gate, stride);
}

/* ---------------------------------------------------------------- training state
 * With zi_dit_set_training on, the forward (B = 1) keeps what zi_dit_backward reads. Per block
 * that is the compact set below; everything else the backward needs (the norms' outputs, q and
 * k after QK-norm and RoPE, silu(h1)⊙h3, the residual stream between the two halves) is
 * recomputed from it with row-wise operations, cheap next to the GEMMs. With gradient
 * checkpointing only each block's input x is kept and the block's forward is run again on the
 * way back. Per block of S tokens (D = dim, F = FFN width, H = heads), in floats:
 *   kept:                   S·(7D + 2F + H) + 4D     (x, q0, k0, v, o, ao, f; h1, h3; lse; mod)
 *   gradient checkpointing: S·D
 * Each block's set is freed as soon as its backward is done. The backward of a stage also
 * needs scratch for one block at a time: block_grads, 14·S·D + 3·S·F + 4D + A, and with
 * checkpointing the block's recomputed forward, block_acts, 12·S·D + 3·S·F + H·S + 4D. */
typedef struct {
    float *x;                   /* [S, D] the block's input (the residual stream before it) */
    float *mod;                 /* [4D] as block_acts (modulated blocks), else NULL */
    float *q0, *k0, *v;         /* [S, D] to_q(xn), to_k(xn), to_v(xn) */
    float *o, *ao, *f;          /* [S, D] attention output, to_out.0(o), w2(g) */
    float *h1, *h3;             /* [S, F] w1(fn), w3(fn) */
    float *lse;                 /* [H, S] log-sum-exp of the attention */
} block_saved;

/* One stage (noise refiners, context refiners or main layers) of a B = 1 training forward. */
typedef struct {
    int S;                      /* rows of the stage's sequence */
    segs sg;                    /* its one segment */
    float *cos_, *sin_;         /* [S, hd/2] RoPE rows */
    block_saved *blk;           /* one per block */
} stage_saved;

typedef struct dit_train {
    int ckpt;                   /* gradient checkpointing */
    int ready;                  /* a training forward's activations are held */
    float t;                    /* the forward's inputs: time, */
    int h, w, L;                /* latent size, caption length, */
    float *x, *cap;             /* latent [C, 1, h, w], caption [L, cap_feat_dim] (copies) */
    float *temb;                /* [A] timestep embedding */
    stage_saved st[3];          /* noise refiners, context refiners, main layers */
    float *U;                   /* [Su, D] output of the last layer: input of the final layer */
} dit_train;

static float *dup_floats(const float *x, size_t n) {
    return memcpy(zi_malloc(n * sizeof(float)), x, n * sizeof(float));
}

static void saved_free(block_saved *v) {
    float *p[] = { v->x, v->mod, v->q0, v->k0, v->v, v->o, v->ao, v->f, v->h1, v->h3, v->lse };
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
    memset(v, 0, sizeof *v);
}

/* After block_forward: copy what the backward reads out of the shared activations. */
static void keep_acts(const zi_dit *m, const dit_block *b, block_saved *v, const block_acts *a, int S) {
    size_t sd = (size_t)S * m->c.dim, sf = (size_t)S * b->ffn;
    if (b->modulated) v->mod = dup_floats(a->mod, 4 * (size_t)m->c.dim);
    v->q0 = dup_floats(a->q0, sd); v->k0 = dup_floats(a->k0, sd); v->v = dup_floats(a->v, sd);
    v->o = dup_floats(a->o, sd); v->ao = dup_floats(a->ao, sd); v->f = dup_floats(a->f, sd);
    v->h1 = dup_floats(a->h1, sf); v->h3 = dup_floats(a->h3, sf);
    v->lse = dup_floats(a->lse, (size_t)S * m->c.n_heads);
}

/* Drops a training forward's activations (the state stays on). */
static void train_release(const zi_dit *m, dit_train *tr) {
    int nb[3] = { m->c.n_refiner_layers, m->c.n_refiner_layers, m->c.n_layers };
    for (int s = 0; s < 3; s++) {
        stage_saved *st = &tr->st[s];
        for (int i = 0; st->blk && i < nb[s]; i++) saved_free(&st->blk[i]);
        free(st->blk); free(st->cos_); free(st->sin_);
        if (st->sg.off) segs_free(&st->sg);
        memset(st, 0, sizeof *st);
    }
    free(tr->x); free(tr->cap); free(tr->temb); free(tr->U);
    tr->x = tr->cap = tr->temb = tr->U = NULL;
    tr->ready = 0;
}

void zi_dit_set_training(zi_dit *m, int on, int gradient_checkpointing) {
    if (m->tr) train_release(m, m->tr);
    if (!on) {
        free(m->tr);
        m->tr = NULL;
        return;
    }
    if (!m->tr) m->tr = zi_calloc(1, sizeof *m->tr);
    m->tr->ckpt = gradient_checkpointing;
}

/* The backward, llm.c style: each x_backward sits right after its x_forward and takes
 * d(output) to d(input), ACCUMULATING into the input's gradient where the forward's input
 * fed several consumers (the residual stream, temb). Only LoRA adapters get parameter
 * gradients (through zi_lin_backward); the gradient still flows through every frozen weight.
 * B = 1: one segment per stage. */

/* Scratch of one block's backward over S rows: recomputed activations and gradients. */
typedef struct {
    float *an, *x1, *fn0, *fn, *xn0, *xn, *q, *k;   /* [S, D] recomputed */
    float *d0, *d1, *d2, *dq, *dk, *dv;             /* [S, D] gradients */
    float *g, *dg, *dh3;                            /* [S, F] */
    float *dmod;                                    /* [4D] */
    float *dtemb;                                   /* [A] */
} block_grads;

static void grads_alloc(block_grads *w, int S, int D, int F, int A) {
    size_t sd = (size_t)S * D * sizeof(float), sf = (size_t)S * F * sizeof(float);
    float **d[] = { &w->an, &w->x1, &w->fn0, &w->fn, &w->xn0, &w->xn, &w->q, &w->k,
                    &w->d0, &w->d1, &w->d2, &w->dq, &w->dk, &w->dv };
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++) *d[i] = zi_malloc(sd);
    w->g = zi_malloc(sf); w->dg = zi_malloc(sf); w->dh3 = zi_malloc(sf);
    w->dmod = zi_malloc(4 * (size_t)D * sizeof(float));
    w->dtemb = zi_malloc((size_t)A * sizeof(float));
}

static void grads_free(block_grads *w) {
    float *p[] = { w->an, w->x1, w->fn0, w->fn, w->xn0, w->xn, w->q, w->k, w->d0, w->d1, w->d2,
                   w->dq, w->dk, w->dv, w->g, w->dg, w->dh3, w->dmod, w->dtemb };
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
}

/* ---------------------------------------------------------------- blocks */
/* q, k [S, H, hd] = RoPE(RMSNorm of each head of q0, k0), or RoPE(q0), RoPE(k0) without
 * qk_norm (cos_, sin_: [S, hd/2]). */
static void qk_norm_rope(const zi_dit *m, const dit_block *b, int S, const float *cos_, const float *sin_,
                         const float *q0, const float *k0, float *q, float *k) {
    int D = m->c.dim, H = m->c.n_heads, hd = m->c.head_dim;
    if (b->norm_q) {
        zi_rmsnorm(q, q0, b->norm_q, (int64_t)S * H, hd, QK_NORM_EPS);
        zi_rmsnorm(k, k0, b->norm_k, (int64_t)S * H, hd, QK_NORM_EPS);
    } else if (q != q0) {
        memcpy(q, q0, (size_t)S * D * sizeof(float));
        memcpy(k, k0, (size_t)S * D * sizeof(float));
    }
    zi_rope_interleaved(q, D, S, H, hd, cos_, sin_);
    zi_rope_interleaved(k, D, S, H, hd, cos_, sin_);
}

/* Attention of a block: xn [S, D] -> a->ao [S, D].
 * q, k, v = to_q/k/v(xn) -> [S, H, hd]; RMSNorm of each head of q and k; interleaved 3-axis
 * RoPE (cos_, sin_: [S, hd/2]); softmax(q kᵀ / sqrt(hd)) v within each segment; to_out.0. */
static void attention_forward(const zi_dit *m, const dit_block *b, const segs *sg, const float *cos_,
                              const float *sin_, block_acts *a) {
    int S = segs_rows(sg), D = m->c.dim, H = m->c.n_heads, hd = m->c.head_dim;
    zi_lin_forward(&b->to_q, a->xn, S, a->q0);
    zi_lin_forward(&b->to_k, a->xn, S, a->k0);
    zi_lin_forward(&b->to_v, a->xn, S, a->v);
    qk_norm_rope(m, b, S, cos_, sin_, a->q0, a->k0, a->q, a->k);
    float scale = 1.0f / sqrtf((float)hd);
    for (int s = 0; s < sg->n; s++) {
        int64_t o = (int64_t)sg->off[s] * D;
        int n = sg->len[s];
        zi_attention(a->o + o, D, a->q + o, D, a->k + o, D, a->v + o, D, n, n, H, H, hd, scale, 0, n,
                     a->lse + (int64_t)sg->off[s] * H);
    }
    zi_lin_forward(&b->to_out, a->o, S, a->ao);
}

/* The attention half, x1 = x + g1 ⊙ attention_norm2(to_out(attn(q, k, v))), with q, k, v
 * from xn = attention_norm1(x) ⊙ ms: dx holds dL/dx1 on entry and dL/dx on return. */
static void attention_backward(const zi_dit *m, const dit_block *b, const block_saved *v, const segs *sg,
                               const float *cos_, const float *sin_, const float *mod, float *dx,
                               block_grads *w) {
    int S = segs_rows(sg), D = m->c.dim, H = m->c.n_heads, hd = m->c.head_dim;
    int64_t nd = (int64_t)S * D;
    float eps = m->c.norm_eps;
    /* an = attention_norm2(ao) (recomputed by block_backward); dan = dx1 ⊙ g1, dg1 += Σ dx1 ⊙ an */
    mul_rows_backward(w->d0, w->dmod + D, dx, w->an, sg, D, mod ? mod + D : NULL, 4 * D);
    memset(w->d1, 0, nd * sizeof(float));
    zi_rmsnorm_backward(w->d1, w->d0, v->ao, b->attn_norm2, S, D, eps);         /* d1 = dao */
    zi_lin_backward(&b->to_out, v->o, w->d1, S, w->d0);                          /* d0 = do */
    /* softmax(q kᵀ / sqrt(hd)) v per segment, with q, k as the attention saw them */
    qk_norm_rope(m, b, S, cos_, sin_, v->q0, v->k0, w->q, w->k);
    float scale = 1.0f / sqrtf((float)hd);
    for (int s = 0; s < sg->n; s++) {
        int64_t o = (int64_t)sg->off[s] * D;
        zi_attention_backward(w->dq + o, w->dk + o, w->dv + o, w->q + o, w->k + o, v->v + o, v->o + o,
                              w->d0 + o, v->lse + (int64_t)sg->off[s] * H, D, sg->len[s], sg->len[s], H, hd, scale);
    }
    zi_rope_interleaved_backward(w->dq, D, S, H, hd, cos_, sin_);
    zi_rope_interleaved_backward(w->dk, D, S, H, hd, cos_, sin_);
    float *dq0 = w->dq, *dk0 = w->dk;       /* gradients of to_q(xn), to_k(xn) */
    if (b->norm_q) {
        memset(w->d1, 0, nd * sizeof(float));
        memset(w->d2, 0, nd * sizeof(float));
        zi_rmsnorm_backward(w->d1, w->dq, v->q0, b->norm_q, (int64_t)S * H, hd, QK_NORM_EPS);
        zi_rmsnorm_backward(w->d2, w->dk, v->k0, b->norm_k, (int64_t)S * H, hd, QK_NORM_EPS);
        dq0 = w->d1;
        dk0 = w->d2;
    }
    /* q0, k0, v = to_q/k/v(xn), xn = attention_norm1(x) ⊙ ms */
    zi_rmsnorm(w->xn0, v->x, b->attn_norm1, S, D, eps);
    memcpy(w->xn, w->xn0, nd * sizeof(float));
    if (mod) mul_rows(w->xn, sg, D, mod, 4 * D);
    zi_lin_backward(&b->to_v, w->xn, w->dv, S, w->d0);
    zi_lin_backward(&b->to_q, w->xn, dq0, S, w->dv);
    zi_add(w->d0, w->d0, w->dv, nd);
    zi_lin_backward(&b->to_k, w->xn, dk0, S, w->dv);
    zi_add(w->d0, w->d0, w->dv, nd);                                             /* d0 = dxn */
    mul_rows_backward(w->d0, w->dmod, w->d0, w->xn0, sg, D, mod, 4 * D);
    zi_rmsnorm_backward(dx, w->d0, v->x, b->attn_norm1, S, D, eps);              /* dx += */
}

/* SwiGLU feed-forward: fn [S, D] -> a->f = w2(silu(w1 fn) ⊙ w3 fn) [S, D], a->ffn_rows rows
 * at a time (every row is computed on its own: the tiles change nothing). */
static void feed_forward(const dit_block *b, int S, block_acts *a) {
    int64_t D = b->w1.W.cols;
    for (int64_t r = 0; r < S; r += a->ffn_rows) {
        int n = (int)(S - r < a->ffn_rows ? S - r : a->ffn_rows);
        zi_lin_forward(&b->w1, a->fn + r * D, n, a->h1);
        zi_lin_forward(&b->w3, a->fn + r * D, n, a->h3);
        zi_silu_mul(a->g, a->h1, a->h3, (int64_t)n * b->ffn);
        zi_lin_forward(&b->w2, a->g, n, a->f + r * D);
    }
}

/* The FFN half, x2 = x1 + g2 ⊙ ffn_norm2(w2(silu(w1 fn) ⊙ w3 fn)), fn = ffn_norm1(x1) ⊙ ms2:
 * dx [S, D] holds dL/dx2 on entry and dL/dx1 on return. */
static void feed_forward_backward(const zi_dit *m, const dit_block *b, const block_saved *v, const segs *sg,
                         const float *mod, float *dx, block_grads *w) {
    int S = segs_rows(sg), D = m->c.dim;
    int64_t nd = (int64_t)S * D, nf = (int64_t)S * b->ffn;
    float eps = m->c.norm_eps;
    /* fo = ffn_norm2(f); dfo = dx2 ⊙ g2, dg2 += Σ dx2 ⊙ fo */
    zi_rmsnorm(w->d1, v->f, b->ffn_norm2, S, D, eps);
    mul_rows_backward(w->d0, w->dmod + 3 * D, dx, w->d1, sg, D, mod ? mod + 3 * D : NULL, 4 * D);
    memset(w->d1, 0, nd * sizeof(float));
    zi_rmsnorm_backward(w->d1, w->d0, v->f, b->ffn_norm2, S, D, eps);          /* d1 = df */
    /* f = w2(g), g = silu(h1) ⊙ h3 */
    zi_silu_mul(w->g, v->h1, v->h3, nf);
    zi_lin_backward(&b->w2, w->g, w->d1, S, w->dg);                              /* dg */
    zi_silu_mul_backward(w->dg, w->dh3, w->dg, v->h1, v->h3, nf);               /* dg = dh1 */
    /* h1 = w1(fn), h3 = w3(fn), fn = ffn_norm1(x1) ⊙ ms2 */
    zi_rmsnorm(w->fn0, w->x1, b->ffn_norm1, S, D, eps);
    memcpy(w->fn, w->fn0, nd * sizeof(float));
    if (mod) mul_rows(w->fn, sg, D, mod + 2 * D, 4 * D);
    zi_lin_backward(&b->w1, w->fn, w->dg, S, w->d0);
    zi_lin_backward(&b->w3, w->fn, w->dh3, S, w->d1);
    zi_add(w->d0, w->d0, w->d1, nd);                                             /* d0 = dfn */
    mul_rows_backward(w->d0, w->dmod + 2 * D, w->d0, w->fn0, sg, D, mod ? mod + 2 * D : NULL, 4 * D);
    zi_rmsnorm_backward(dx, w->d0, w->x1, b->ffn_norm1, S, D, eps);              /* dx += */
}

/* One ZImageTransformerBlock on the packed sequence x [S, D] (updated in place).
 * Modulated (temb [B, A]: one row per segment):
 *   x += tanh(gate_msa) ⊙ attention_norm2(Attention(attention_norm1(x) ⊙ (1 + scale_msa)))
 *   x += tanh(gate_mlp) ⊙ ffn_norm2(FFN(ffn_norm1(x) ⊙ (1 + scale_mlp)))
 * Not modulated (context refiners): the same without scales and gates.
 * "Sandwich" norms: every branch is normalised on its way in and on its way out. */
static void block_forward(const zi_dit *m, const dit_block *b, float *x, const segs *sg, const float *temb,
                          const float *cos_, const float *sin_, block_acts *a) {
    int S = segs_rows(sg), D = m->c.dim;
    float eps = m->c.norm_eps;
    const float *mod = NULL;
    if (b->modulated) {
        /* adaLN_modulation.0(temb) = [scale_msa | gate_msa | scale_mlp | gate_mlp]: no shifts */
        zi_lin_forward(&b->ada, temb, sg->n, a->mod);
        for (int s = 0; s < sg->n; s++) {
            float *ms = a->mod + (int64_t)s * 4 * D;
            for (int d = 0; d < D; d++) {
                ms[d] = 1.0f + ms[d];
                ms[D + d] = tanhf(ms[D + d]);
                ms[2 * D + d] = 1.0f + ms[2 * D + d];
                ms[3 * D + d] = tanhf(ms[3 * D + d]);
            }
        }
        mod = a->mod;
    }
    zi_rmsnorm(a->xn, x, b->attn_norm1, S, D, eps);
    if (mod) mul_rows(a->xn, sg, D, mod, 4 * D);
    attention_forward(m, b, sg, cos_, sin_, a);
    zi_rmsnorm(a->an, a->ao, b->attn_norm2, S, D, eps);
    add_rows(x, a->an, sg, D, mod ? mod + D : NULL, 4 * D);

    zi_rmsnorm(a->fn, x, b->ffn_norm1, S, D, eps);
    if (mod) mul_rows(a->fn, sg, D, mod + 2 * D, 4 * D);
    feed_forward(b, S, a);
    zi_rmsnorm(a->fo, a->f, b->ffn_norm2, S, D, eps);
    add_rows(x, a->fo, sg, D, mod ? mod + 3 * D : NULL, 4 * D);
}

/* Backward of block_forward: dx [S, D] holds dL/d(block output) on entry and dL/d(block
 * input) on return; for modulated blocks dtemb [A] += dL/dtemb through adaLN_modulation. */
static void block_backward(const zi_dit *m, const dit_block *b, const block_saved *v, const segs *sg,
                           const float *cos_, const float *sin_, const float *temb, float *dx, float *dtemb,
                           block_grads *w) {
    int S = segs_rows(sg), D = m->c.dim, A = m->c.adaln_dim;
    const float *mod = b->modulated ? v->mod : NULL;
    memset(w->dmod, 0, 4 * (size_t)D * sizeof(float));
    /* the residual stream between the halves: x1 = x + g1 ⊙ attention_norm2(ao) */
    zi_rmsnorm(w->an, v->ao, b->attn_norm2, S, D, m->c.norm_eps);
    memcpy(w->x1, v->x, (size_t)S * D * sizeof(float));
    add_rows(w->x1, w->an, sg, D, mod ? mod + D : NULL, 4 * D);
    feed_forward_backward(m, b, v, sg, mod, dx, w);
    attention_backward(m, b, v, sg, cos_, sin_, mod, dx, w);
    if (!mod) return;
    /* mod = [1 + s_msa | tanh(g_msa) | 1 + s_mlp | tanh(g_mlp)]: tanh' = 1 − tanh² */
    for (int d = 0; d < D; d++) {
        w->dmod[D + d] *= 1.0f - mod[D + d] * mod[D + d];
        w->dmod[3 * D + d] *= 1.0f - mod[3 * D + d] * mod[3 * D + d];
    }
    zi_lin_backward(&b->ada, temb, w->dmod, 1, w->dtemb);
    for (int i = 0; i < A; i++) dtemb[i] += w->dtemb[i];
}

/* --dump: the block's output for the first item ([its rows, D]), as diffusers' block hooks. */
static void dump_block(const zi_dit *m, const dit_block *b, const float *x, const segs *sg) {
    if (!zi_dump_active()) return;
    char name[64];
    snprintf(name, sizeof name, "dit.block.%s", b->name);
    zi_dump(name, 2, (const int64_t[]){ sg->len[0], m->c.dim }, x + (int64_t)sg->off[0] * m->c.dim);
}

/* ---------------------------------------------------------------- embedders */
/* The timestep sinusoid e [t_freq] = [cos(s·f), sin(s·f)], s = t·t_scale,
 * f_k = exp(−ln(10000)·k / half), all in float32 as torch computes it. */
static void t_sinusoid(const zi_dit *m, float t, float *e) {
    int half = m->t_freq / 2;
    const float neg_log_period = (float)-log(T_MAX_PERIOD);
    float s = t * m->c.t_scale;
    for (int k = 0; k < half; k++) {
        float f = expf(neg_log_period * (float)k / (float)half);
        e[k] = cosf(s * f);
        e[half + k] = sinf(s * f);
    }
}

/* Timestep embedder: temb[b] = mlp.2(SiLU(mlp.0(sinusoid(t[b])))).  -> temb [B, A] */
static void t_embed(const zi_dit *m, int B, const float *t, float *temb) {
    int mid = (int)m->t_mlp0.W.rows;
    float *e = zi_malloc((size_t)B * m->t_freq * sizeof(float));
    float *hmid = zi_malloc((size_t)B * mid * sizeof(float));
    for (int b = 0; b < B; b++) t_sinusoid(m, t[b], e + (int64_t)b * m->t_freq);
    zi_lin_forward(&m->t_mlp0, e, B, hmid);
    zi_silu(hmid, hmid, (int64_t)B * mid);
    zi_lin_forward(&m->t_mlp2, hmid, B, temb);
    free(e);
    free(hmid);
}

/* Backward of t_embed (B = 1): dtemb [A] -> the timestep MLP's adapters. */
static void t_embed_backward(const zi_dit *m, float t, const float *dtemb) {
    int mid = (int)m->t_mlp0.W.rows;
    float *e = zi_malloc((size_t)m->t_freq * sizeof(float));
    float *hmid = zi_malloc((size_t)mid * sizeof(float)), *smid = zi_malloc((size_t)mid * sizeof(float));
    float *dmid = zi_malloc((size_t)mid * sizeof(float));
    t_sinusoid(m, t, e);
    zi_lin_forward(&m->t_mlp0, e, 1, hmid);
    zi_silu(smid, hmid, mid);
    zi_lin_backward(&m->t_mlp2, smid, dtemb, 1, dmid);
    zi_silu_backward(dmid, dmid, hmid, mid);
    zi_lin_backward(&m->t_mlp0, e, dmid, 1, NULL);
    free(e); free(hmid); free(smid); free(dmid);
}

/* Patch vector of token (i, j): vec[(ph·p + pw)·C + c] = x[c, 0, i·p + ph, j·p + pw]
 * (channel fastest; the frame patch is 1).  x [C, 1, h, w] -> P [Ht·Wt, p·p·C] */
static void patchify(float *P, const float *x, int C, int h, int w, int p) {
    int Ht = h / p, Wt = w / p;
    for (int i = 0; i < Ht; i++)
        for (int j = 0; j < Wt; j++)
            for (int ph = 0; ph < p; ph++)
                for (int pw = 0; pw < p; pw++)
                    for (int c = 0; c < C; c++)
                        P[((int64_t)(i * Wt + j) * p * p + ph * p + pw) * C + c] =
                            x[((int64_t)c * h + i * p + ph) * w + j * p + pw];
}

/* The inverse: Y [Ht·Wt, p·p·C] -> out [C, 1, h, w]. */
static void unpatchify(float *out, const float *Y, int C, int h, int w, int p) {
    int Ht = h / p, Wt = w / p;
    for (int i = 0; i < Ht; i++)
        for (int j = 0; j < Wt; j++)
            for (int ph = 0; ph < p; ph++)
                for (int pw = 0; pw < p; pw++)
                    for (int c = 0; c < C; c++)
                        out[((int64_t)c * h + i * p + ph) * w + j * p + pw] =
                            Y[((int64_t)(i * Wt + j) * p * p + ph * p + pw) * C + c];
}

/* Per-token RoPE rows: cos_/sin_ [S, hd/2] = the three axes' table rows of the token's
 * position ids (pos [S, 3]), concatenated. */
static void rope_rows(const zi_dit *m, const int *pos, int S, float *cos_, float *sin_) {
    int hh = m->c.head_dim / 2;
    for (int r = 0; r < S; r++) {
        int at = 0;
        for (int a = 0; a < 3; a++) {
            int half = m->c.axes_dims[a] / 2;
            size_t src = (size_t)pos[r * 3 + a] * half;
            memcpy(cos_ + (size_t)r * hh + at, m->rope_cos[a] + src, half * sizeof(float));
            memcpy(sin_ + (size_t)r * hh + at, m->rope_sin[a] + src, half * sizeof(float));
            at += half;
        }
    }
}

static int round_up(int n, int k) { return (n + k - 1) / k * k; }

/* ---------------------------------------------------------------- forward and backward */
/* Checks the inputs, then fills the three stages' segments: image (Ni rounded up to 32),
 * caption (L rounded up to 32), unified (image then caption). */
static int plan(const zi_dit *m, int B, const float *const *x, const int *h, const int *w, const float *t,
                const float *const *cap, const int *L, float *const *out, segs *sx, segs *sc, segs *su) {
    const zi_dit_cfg *c = &m->c;
    if (B < 1 || !x || !h || !w || !t || !cap || !L || !out) {
        zi_seterr("dit: bad batch (B = %d)", B);
        return -1;
    }
    int64_t rows = 0;
    for (int b = 0; b < B; b++) {
        if (!x[b] || !cap[b] || !out[b]) {
            zi_seterr("dit: item %d: missing latent, caption or output", b);
            return -1;
        }
        if (h[b] < c->patch || w[b] < c->patch || h[b] % c->patch || w[b] % c->patch) {
            zi_seterr("dit: item %d: latent %dx%d is not a positive multiple of the patch size %d", b, h[b], w[b],
                      c->patch);
            return -1;
        }
        if (L[b] < 1 || L[b] > 1 << 24) {
            zi_seterr("dit: item %d: caption length %d (must be at least 1)", b, L[b]);
            return -1;
        }
        /* position ids index the RoPE tables: caption 1..Lc, image (Lc + 1, i, j) */
        int Ht = h[b] / c->patch, Wt = w[b] / c->patch, Lc = round_up(L[b], SEQ_MULTI_OF);
        if (Lc + 1 >= c->axes_lens[0] || Ht > c->axes_lens[1] || Wt > c->axes_lens[2]) {
            zi_seterr("dit: item %d: positions past axes_lens [%d, %d, %d] (padded caption %d + 1, token grid %dx%d)",
                      b, c->axes_lens[0], c->axes_lens[1], c->axes_lens[2], Lc, Ht, Wt);
            return -1;
        }
        rows += round_up(Ht * Wt, SEQ_MULTI_OF) + Lc;
        if (rows > 1 << 28) {
            zi_seterr("dit: batch too large (%lld tokens)", (long long)rows);
            return -1;
        }
    }
    *sx = segs_new(B); *sc = segs_new(B); *su = segs_new(B);
    for (int b = 0; b < B; b++) {
        sx->len[b] = round_up((h[b] / c->patch) * (w[b] / c->patch), SEQ_MULTI_OF);
        sc->len[b] = round_up(L[b], SEQ_MULTI_OF);
        su->len[b] = sx->len[b] + sc->len[b];
        if (b) {
            sx->off[b] = sx->off[b - 1] + sx->len[b - 1];
            sc->off[b] = sc->off[b - 1] + sc->len[b - 1];
            su->off[b] = su->off[b - 1] + su->len[b - 1];
        }
    }
    return 0;
}

/* Image tokens: X [Sx, D] = x_embedder(patches), pad rows = x_pad_token;
 * position ids (Lc + 1, i, j), pads (0, 0, 0). */
static void embed_image(const zi_dit *m, int B, const float *const *x, const int *h, const int *w, const segs *sx,
                        const segs *sc, float *X, int *pos) {
    int p = m->c.patch, C = m->c.in_channels, D = m->c.dim, pdim = (int)m->x_emb.W.cols, S = segs_rows(sx);
    float *P = zi_calloc((size_t)S * pdim, sizeof(float));
    memset(pos, 0, (size_t)S * 3 * sizeof(int));
    for (int b = 0; b < B; b++) {
        int Wt = w[b] / p, Ni = (h[b] / p) * Wt;
        patchify(P + (int64_t)sx->off[b] * pdim, x[b], C, h[b], w[b], p);
        for (int n = 0; n < Ni; n++) {
            int *id = pos + (int64_t)(sx->off[b] + n) * 3;
            id[0] = sc->len[b] + 1;
            id[1] = n / Wt;
            id[2] = n % Wt;
        }
    }
    zi_lin_forward(&m->x_emb, P, S, X);
    for (int b = 0; b < B; b++)
        for (int n = (h[b] / p) * (w[b] / p); n < sx->len[b]; n++)
            memcpy(X + (int64_t)(sx->off[b] + n) * D, m->x_pad, D * sizeof(float));
    free(P);
}

/* Backward of embed_image (B = 1): dX [Sx, D] -> the x_embedder's adapters. The pad rows hold
 * x_pad_token, a constant here: only the Ni real rows reach the embedder. */
static void embed_image_backward(const zi_dit *m, const dit_train *tr, const float *dX) {
    int p = m->c.patch, Ni = (tr->h / p) * (tr->w / p), pdim = (int)m->x_emb.W.cols;
    float *P = zi_malloc((size_t)Ni * pdim * sizeof(float));
    patchify(P, tr->x, m->c.in_channels, tr->h, tr->w, p);
    zi_lin_backward(&m->x_emb, P, dX, Ni, NULL);
    free(P);
}

/* Caption tokens: Cc [Sc, D] = cap_embedder.1(RMSNorm(cap)), pad rows = cap_pad_token;
 * position ids (k + 1, 0, 0) for every row k, pads included. */
static void embed_caption(const zi_dit *m, int B, const float *const *cap, const int *L, const segs *sc, float *Cc,
                          int *pos) {
    int cd = m->c.cap_feat_dim, D = m->c.dim, S = segs_rows(sc);
    float *Cin = zi_calloc((size_t)S * cd, sizeof(float));
    for (int b = 0; b < B; b++) {
        memcpy(Cin + (int64_t)sc->off[b] * cd, cap[b], (size_t)L[b] * cd * sizeof(float));
        for (int k = 0; k < sc->len[b]; k++) {
            int *id = pos + (int64_t)(sc->off[b] + k) * 3;
            id[0] = k + 1;
            id[1] = id[2] = 0;
        }
    }
    zi_rmsnorm(Cin, Cin, m->cap_norm, S, cd, m->c.norm_eps);
    zi_lin_forward(&m->cap_lin, Cin, S, Cc);
    for (int b = 0; b < B; b++)
        for (int k = L[b]; k < sc->len[b]; k++)
            memcpy(Cc + (int64_t)(sc->off[b] + k) * D, m->cap_pad, D * sizeof(float));
    free(Cin);
}

/* Backward of embed_caption (B = 1): dC [Sc, D] -> cap_embedder.1's adapters (the RMSNorm
 * before it has no trainable part; pad rows are cap_pad_token). */
static void embed_caption_backward(const zi_dit *m, const dit_train *tr, const float *dC) {
    int cd = m->c.cap_feat_dim;
    float *Cin = zi_malloc((size_t)tr->L * cd * sizeof(float));
    zi_rmsnorm(Cin, tr->cap, m->cap_norm, tr->L, cd, m->c.norm_eps);
    zi_lin_backward(&m->cap_lin, Cin, dC, tr->L, NULL);
    free(Cin);
}

/* Final layer on the real image rows of each item (pads dropped):
 * Y = linear(LayerNorm(U) ⊙ (1 + adaLN_modulation.1(SiLU(temb)))), LayerNorm without affine.
 * sy: the items' Ni rows packed.  -> Y [ΣNi, p·p·C] */
static void final_forward(const zi_dit *m, const float *U, const segs *su, const segs *sy, const float *temb,
                          float *Y) {
    int B = su->n, D = m->c.dim, A = m->c.adaln_dim, S = segs_rows(sy);
    float *G = zi_malloc((size_t)S * D * sizeof(float));
    float *Gn = zi_malloc((size_t)S * D * sizeof(float));
    float *st = zi_malloc((size_t)B * A * sizeof(float));
    float *scale = zi_malloc((size_t)B * D * sizeof(float));
    for (int b = 0; b < B; b++)
        memcpy(G + (int64_t)sy->off[b] * D, U + (int64_t)su->off[b] * D, (size_t)sy->len[b] * D * sizeof(float));
    zi_layernorm(Gn, G, NULL, NULL, S, D, FINAL_LN_EPS);
    zi_silu(st, temb, (int64_t)B * A);
    zi_lin_forward(&m->final_ada, st, B, scale);
    for (int64_t i = 0; i < (int64_t)B * D; i++) scale[i] = 1.0f + scale[i];
    mul_rows(Gn, sy, D, scale, D);
    zi_lin_forward(&m->final_lin, Gn, S, Y);
    free(G); free(Gn); free(st); free(scale);
}

/* Backward of final_forward (B = 1): dout [C, 1, h, w] -> dU [Su, D] (image rows, added) and
 * dtemb [A] (added). The layer's forward is recomputed from U and temb. */
static void final_backward(const zi_dit *m, const dit_train *tr, const float *dout, float *dU, float *dtemb) {
    const zi_dit_cfg *c = &m->c;
    int D = c->dim, A = c->adaln_dim, p = c->patch, pdim = (int)m->final_lin.W.rows;
    int Ni = (tr->h / p) * (tr->w / p);
    segs sy = segs_new(1);
    sy.len[0] = Ni;
    float *Gn = zi_malloc((size_t)Ni * D * sizeof(float)), *Gm = zi_malloc((size_t)Ni * D * sizeof(float));
    float *dG = zi_malloc((size_t)Ni * D * sizeof(float));
    float *st = zi_malloc((size_t)A * sizeof(float)), *dst = zi_malloc((size_t)A * sizeof(float));
    float *scale = zi_malloc((size_t)D * sizeof(float)), *dscale = zi_calloc(D, sizeof(float));
    float *dY = zi_malloc((size_t)Ni * pdim * sizeof(float));
    /* recompute: Gm = LayerNorm(U[:Ni]) ⊙ scale, scale = 1 + adaLN_modulation.1(SiLU(temb)) */
    zi_layernorm(Gn, tr->U, NULL, NULL, Ni, D, FINAL_LN_EPS);
    zi_silu(st, tr->temb, A);
    zi_lin_forward(&m->final_ada, st, 1, scale);
    for (int d = 0; d < D; d++) scale[d] = 1.0f + scale[d];
    memcpy(Gm, Gn, (size_t)Ni * D * sizeof(float));
    mul_rows(Gm, &sy, D, scale, D);
    /* out = unpatchify(Y): the gradient of Y is dout patchified */
    patchify(dY, dout, c->in_channels, tr->h, tr->w, p);
    zi_lin_backward(&m->final_lin, Gm, dY, Ni, dG);                /* dG = dGm */
    mul_rows_backward(dG, dscale, dG, Gn, &sy, D, scale, D);        /* dG = dGn */
    zi_layernorm_backward(dU, dG, tr->U, NULL, Ni, D, FINAL_LN_EPS);
    zi_lin_backward(&m->final_ada, st, dscale, 1, dst);
    zi_silu_backward(dst, dst, tr->temb, A);
    for (int i = 0; i < A; i++) dtemb[i] += dst[i];
    free(Gn); free(Gm); free(dG); free(st); free(dst); free(scale); free(dscale); free(dY);
    segs_free(&sy);
}

/* A stage: the blocks in order over the packed sequence x, with RoPE rows from pos.
 * keep (training, B = 1): receives the RoPE rows, each block's input and, without gradient
 * checkpointing, its activations. */
static void run_stage(const zi_dit *m, const dit_block *blocks, int n, float *x, const segs *sg, const int *pos,
                      const float *temb, block_acts *a, stage_saved *keep) {
    int S = segs_rows(sg), hh = m->c.head_dim / 2;
    float *cos_ = zi_malloc((size_t)S * hh * sizeof(float)), *sin_ = zi_malloc((size_t)S * hh * sizeof(float));
    rope_rows(m, pos, S, cos_, sin_);
    if (keep) {
        *keep = (stage_saved){ S, segs_new(1), cos_, sin_, zi_calloc(n, sizeof(block_saved)) };
        keep->sg.len[0] = S;
    }
    for (int i = 0; i < n; i++) {
        if (keep) keep->blk[i].x = dup_floats(x, (size_t)S * m->c.dim);
        block_forward(m, &blocks[i], x, sg, temb, cos_, sin_, a);
        if (keep && !m->tr->ckpt) keep_acts(m, &blocks[i], &keep->blk[i], a, S);
        dump_block(m, &blocks[i], x, sg);
    }
    if (!keep) {
        free(cos_);
        free(sin_);
    }
}

/* A stage in reverse: dx [S, D] = dL/d(stage output) -> dL/d(stage input). With gradient
 * checkpointing each block's forward runs again from its saved input first. Each block's
 * saved activations are freed after its backward. */
static void stage_backward(const zi_dit *m, const dit_block *blocks, int n, stage_saved *st, float *dx,
                           const float *temb, float *dtemb) {
    int S = st->S, D = m->c.dim;
    block_grads w;
    grads_alloc(&w, S, D, m->ffn_max, m->c.adaln_dim);
    block_acts a;
    float *xr = NULL;
    if (m->tr->ckpt) {
        acts_alloc(&a, 1, S, D, m->ffn_max, m->c.n_heads, 1, 0);
        xr = zi_malloc((size_t)S * D * sizeof(float));
    }
    for (int i = n - 1; i >= 0; i--) {
        block_saved *v = &st->blk[i], re = *v;
        if (m->tr->ckpt) {
            memcpy(xr, v->x, (size_t)S * D * sizeof(float));
            block_forward(m, &blocks[i], xr, &st->sg, temb, st->cos_, st->sin_, &a);
            re = (block_saved){ v->x, blocks[i].modulated ? a.mod : NULL, a.q0, a.k0, a.v, a.o, a.ao, a.f,
                                a.h1, a.h3, a.lse };
        }
        block_backward(m, &blocks[i], &re, &st->sg, st->cos_, st->sin_, temb, dx, dtemb, &w);
        saved_free(v);
    }
    if (m->tr->ckpt) {
        acts_free(&a);
        free(xr);
    }
    grads_free(&w);
}

int zi_dit_forward(const zi_dit *m, int B, const float *const *x, const int *h, const int *w, const float *t,
                   const float *const *cap, const int *L, float *const *out) {
    segs sx, sc, su;
    dit_train *tr = m->tr;
    if (tr && B != 1) {
        zi_seterr("dit: training runs one item at a time (B = %d)", B);
        return -1;
    }
    if (plan(m, B, x, h, w, t, cap, L, out, &sx, &sc, &su)) return -1;
    const zi_dit_cfg *c = &m->c;
    int D = c->dim, p = c->patch, Sx = segs_rows(&sx), Sc = segs_rows(&sc), Su = segs_rows(&su);
    float *temb = zi_malloc((size_t)B * c->adaln_dim * sizeof(float));
    t_embed(m, B, t, temb);
    if (tr) {
        train_release(m, tr);
        *tr = (dit_train){ .ckpt = tr->ckpt, .ready = 1, .t = t[0], .h = h[0], .w = w[0], .L = L[0],
                           .x = dup_floats(x[0], (size_t)c->in_channels * h[0] * w[0]),
                           .cap = dup_floats(cap[0], (size_t)L[0] * c->cap_feat_dim), .temb = temb };
    }
    block_acts a;
    acts_alloc(&a, B, Su, D, m->ffn_max, c->n_heads, tr != NULL, m->ffn_tile);

    float *X = zi_malloc((size_t)Sx * D * sizeof(float));
    int *posx = zi_malloc((size_t)Sx * 3 * sizeof(int));
    embed_image(m, B, x, h, w, &sx, &sc, X, posx);
    run_stage(m, m->noise_ref, c->n_refiner_layers, X, &sx, posx, temb, &a, tr ? &tr->st[0] : NULL);

    float *Cc = zi_malloc((size_t)Sc * D * sizeof(float));
    int *posc = zi_malloc((size_t)Sc * 3 * sizeof(int));
    embed_caption(m, B, cap, L, &sc, Cc, posc);
    run_stage(m, m->ctx_ref, c->n_refiner_layers, Cc, &sc, posc, NULL, &a, tr ? &tr->st[1] : NULL);

    /* unified sequence: per item its image rows, then its caption rows */
    float *U = zi_malloc((size_t)Su * D * sizeof(float));
    int *posu = zi_malloc((size_t)Su * 3 * sizeof(int));
    for (int b = 0; b < B; b++) {
        int64_t u = su.off[b], nx = sx.len[b], nc = sc.len[b];
        memcpy(U + u * D, X + (int64_t)sx.off[b] * D, nx * D * sizeof(float));
        memcpy(U + (u + nx) * D, Cc + (int64_t)sc.off[b] * D, nc * D * sizeof(float));
        memcpy(posu + u * 3, posx + (int64_t)sx.off[b] * 3, nx * 3 * sizeof(int));
        memcpy(posu + (u + nx) * 3, posc + (int64_t)sc.off[b] * 3, nc * 3 * sizeof(int));
    }
    free(X); free(posx); free(Cc); free(posc);
    run_stage(m, m->layers, c->n_layers, U, &su, posu, temb, &a, tr ? &tr->st[2] : NULL);
    acts_free(&a);

    segs sy = segs_new(B);
    for (int b = 0; b < B; b++) {
        sy.len[b] = (h[b] / p) * (w[b] / p);
        if (b) sy.off[b] = sy.off[b - 1] + sy.len[b - 1];
    }
    int pdim = (int)m->final_lin.W.rows;
    float *Y = zi_malloc((size_t)segs_rows(&sy) * pdim * sizeof(float));
    final_forward(m, U, &su, &sy, temb, Y);
    for (int b = 0; b < B; b++) unpatchify(out[b], Y + (int64_t)sy.off[b] * pdim, c->in_channels, h[b], w[b], p);
    free(Y); free(posu);
    if (tr) tr->U = U;              /* the training state owns U and temb now */
    else { free(U); free(temb); }
    segs_free(&sx); segs_free(&sc); segs_free(&su); segs_free(&sy);
    return 0;
}

int zi_dit_backward(zi_dit *m, const float *dout) {
    dit_train *tr = m->tr;
    if (!tr || !tr->ready) {
        zi_seterr("dit: backward without a training forward (zi_dit_set_training, then zi_dit_forward)");
        return -1;
    }
    const zi_dit_cfg *c = &m->c;
    int D = c->dim, Sx = tr->st[0].S, Su = tr->st[2].S;
    float *dtemb = zi_calloc(c->adaln_dim, sizeof(float));
    float *dU = zi_calloc((size_t)Su * D, sizeof(float));
    final_backward(m, tr, dout, dU, dtemb);
    stage_backward(m, m->layers, c->n_layers, &tr->st[2], dU, tr->temb, dtemb);
    /* U = [X ; Cc]: the image rows' gradient goes to the noise refiners, the rest to the
     * context refiners */
    float *dX = dU, *dC = dU + (int64_t)Sx * D;
    stage_backward(m, m->ctx_ref, c->n_refiner_layers, &tr->st[1], dC, NULL, NULL);
    embed_caption_backward(m, tr, dC);
    stage_backward(m, m->noise_ref, c->n_refiner_layers, &tr->st[0], dX, tr->temb, dtemb);
    embed_image_backward(m, tr, dX);
    t_embed_backward(m, tr->t, dtemb);
    free(dtemb);
    free(dU);
    train_release(m, tr);
    return 0;
}
