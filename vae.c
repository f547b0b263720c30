/* vae.c: the FLUX VAE, i.e. diffusers' AutoencoderKL (Encoder, Decoder and the diagonal
 * Gaussian posterior), one sample at a time, float32 activations.
 *
 * Layout: every activation is [C, H, W] (channels first, one sample), the layout of the
 * convolution and GroupNorm kernels. Weights stay in the mmap'd checkpoint (conv weights
 * [Cout, Cin, k, k] are viewed as [Cout, Cin·k·k] matrices); biases and norm parameters are
 * converted once to float32.
 *
 * Topology (diffusers vae.py / unet_2d_blocks.py), with ch = block_out_channels, n = len(ch),
 * L = layers_per_block, every GroupNorm norm_num_groups groups, eps 1e-6 (hard-coded by
 * diffusers' Encoder/Decoder, not a config value):
 *   encoder: conv_in (in→ch[0]); block i: L resnets (ch[i-1]→ch[i], then ch[i]→ch[i]) and,
 *            except the last, a downsample (pad right/bottom 1, conv3x3 stride 2);
 *            mid (resnet, attention, resnet); GN, SiLU, conv_out (→ 2·latent: mean | logvar)
 *   decoder: conv_in (latent→ch[n-1]); mid; block i (channels ch reversed): L+1 resnets and,
 *            except the last, an upsample (nearest ×2, conv3x3); GN, SiLU, conv_out (→ out)
 *   resnet:  y = shortcut(x) + conv2(SiLU(GN2(conv1(SiLU(GN1(x))))))  (shortcut: 1x1 conv
 *            when the channel count changes, else identity)
 *   attention: one head of width C over the H·W positions, x + out(softmax(q kᵀ/√C) v)
 *            with q, k, v = Linear(GN(x)) per position.
 * Optional 1x1 convs: quant_conv after the encoder, post_quant_conv before the decoder.
 *
 * Memory: buffers are freed as soon as they are consumed; the upsample never materialises the
 * 4× larger nearest-neighbour image (it is built band by band just ahead of its conv). The
 * peak of a 1024² decode is about 2 GiB of activations, in the first resnet of the last up
 * block: its 256-channel input (1 GiB), its 128-channel shortcut and conv1 output. */
#include "zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VAE_MAXBLOCKS 8
#define VAE_EPS 1e-6f               /* every GroupNorm of diffusers' Encoder/Decoder */
#define VAE_BAND_FLOATS (4 << 20)   /* target size of one upsample band (16 MB) */
#define VAE_KEEP 4                  /* freed activation buffers kept for reuse (see act_new) */

/* ---------------------------------------------------------------- model structures */
typedef struct {
    zi_mat w;           /* [cout, cin·k·k], a view into the checkpoint */
    const float *b;     /* [cout] */
    int cin, cout, k;
} vae_conv;

typedef struct { const float *w, *b; int C; } vae_norm;   /* GroupNorm affine parameters */

typedef struct {
    vae_norm norm1, norm2;
    vae_conv conv1, conv2;
    vae_conv shortcut;  /* 1x1; used when has_shortcut (cin != cout) */
    int has_shortcut;
} vae_resnet;

typedef struct {
    vae_norm norm;
    zi_mat q, k, v, out;            /* Linear weights [C, C] */
    const float *bq, *bk, *bv, *bout;
    int C;
} vae_attn;

typedef struct {
    vae_resnet *res;
    int nres;
    vae_conv resample;  /* downsample (encoder) or upsample (decoder) conv; has_resample */
    int has_resample;
} vae_block;

typedef struct {
    vae_conv conv_in, conv_out;
    vae_block blocks[VAE_MAXBLOCKS];
    vae_resnet mid[2];
    vae_attn attn;      /* used when has_attn (mid_block_add_attention) */
    int has_attn;
    vae_norm norm_out;
} vae_coder;

struct zi_vae {
    zi_st *st;
    int in_ch, out_ch, latent_ch, groups, nblocks, layers;
    int ch[VAE_MAXBLOCKS];          /* block_out_channels */
    float scaling, shift;
    vae_coder enc, dec;
    vae_conv quant, post_quant;     /* 1x1 convs, when has_quant / has_post_quant */
    int has_quant, has_post_quant;
    float **owned;                  /* float32 copies of biases and norm parameters */
    int nowned;
    struct {                        /* freed activation buffers, all of `bytes` bytes */
        float *buf[VAE_KEEP];
        size_t bytes;
        int n;
    } kept;
};

/* ---------------------------------------------------------------- loading */
static float *vec_f32(zi_vae *v, const char *pre, const char *suf, int64_t n) {
    char *name = zi_path("%s.%s", pre, suf);
    float *f = zi_st_need_f32(v->st, name, 1, &n);
    free(name);
    if (!f) return NULL;
    v->owned = zi_realloc(v->owned, (size_t)(v->nowned + 1) * sizeof *v->owned);
    v->owned[v->nowned++] = f;
    return f;
}

/* A weight of the given shape as a [shape0, rest] matrix of a dtype the GEMM takes. */
static int weight(zi_vae *v, zi_mat *m, const char *pre, int ndim, const int64_t *shape) {
    char *name = zi_path("%s.weight", pre);
    int rc = zi_st_need_mat(v->st, name, ndim, shape, m);
    free(name);
    return rc;
}

static int load_conv(zi_vae *v, vae_conv *c, const char *pre, int cin, int cout, int k) {
    int64_t shape[4] = { cout, cin, k, k };
    c->cin = cin, c->cout = cout, c->k = k;
    if (weight(v, &c->w, pre, 4, shape)) return -1;
    return (c->b = vec_f32(v, pre, "bias", cout)) ? 0 : -1;
}

static int load_norm(zi_vae *v, vae_norm *n, const char *pre, int C) {
    n->C = C;
    if (!(n->w = vec_f32(v, pre, "weight", C))) return -1;
    return (n->b = vec_f32(v, pre, "bias", C)) ? 0 : -1;
}

static int load_linear(zi_vae *v, zi_mat *w, const float **b, const char *pre, int C) {
    int64_t shape[2] = { C, C };
    if (weight(v, w, pre, 2, shape)) return -1;
    return (*b = vec_f32(v, pre, "bias", C)) ? 0 : -1;
}

static int load_resnet(zi_vae *v, vae_resnet *r, const char *pre, int cin, int cout) {
    char name[256];
#define SUB(s) (snprintf(name, sizeof name, "%s.%s", pre, s), name)
    if (load_norm(v, &r->norm1, SUB("norm1"), cin) || load_conv(v, &r->conv1, SUB("conv1"), cin, cout, 3) ||
        load_norm(v, &r->norm2, SUB("norm2"), cout) || load_conv(v, &r->conv2, SUB("conv2"), cout, cout, 3))
        return -1;
    r->has_shortcut = cin != cout;
    if (r->has_shortcut && load_conv(v, &r->shortcut, SUB("conv_shortcut"), cin, cout, 1)) return -1;
#undef SUB
    return 0;
}

/* PRE.mid_block: resnets.0, attentions.0 (optional), resnets.1, all of width C */
static int load_mid(zi_vae *v, vae_coder *c, const char *pre, int C, int add_attention) {
    char name[256];
#define SUB(s) (snprintf(name, sizeof name, "%s.mid_block.%s", pre, s), name)
    if (load_resnet(v, &c->mid[0], SUB("resnets.0"), C, C) || load_resnet(v, &c->mid[1], SUB("resnets.1"), C, C))
        return -1;
    c->has_attn = add_attention;
    if (!add_attention) return 0;
    vae_attn *a = &c->attn;
    a->C = C;
    if (load_norm(v, &a->norm, SUB("attentions.0.group_norm"), C) ||
        load_linear(v, &a->q, &a->bq, SUB("attentions.0.to_q"), C) ||
        load_linear(v, &a->k, &a->bk, SUB("attentions.0.to_k"), C) ||
        load_linear(v, &a->v, &a->bv, SUB("attentions.0.to_v"), C) ||
        load_linear(v, &a->out, &a->bout, SUB("attentions.0.to_out.0"), C))
        return -1;
#undef SUB
    return 0;
}

/* Shared by both halves: the blocks (down_blocks / up_blocks) with their resnets and
 * resampling convs. chs[i] is the width of block i; the input of block 0 is cin. */
static int load_blocks(zi_vae *v, vae_coder *c, const char *pre, const char *blocks, const char *sampler,
                       int nres, const int *chs, int cin) {
    char name[256];
    for (int i = 0; i < v->nblocks; i++) {
        vae_block *b = &c->blocks[i];
        b->nres = nres;
        b->res = zi_calloc((size_t)nres, sizeof *b->res);
        for (int j = 0; j < nres; j++) {
            snprintf(name, sizeof name, "%s.%s.%d.resnets.%d", pre, blocks, i, j);
            if (load_resnet(v, &b->res[j], name, j == 0 ? cin : chs[i], chs[i])) return -1;
        }
        b->has_resample = i < v->nblocks - 1;
        snprintf(name, sizeof name, "%s.%s.%d.%s.0.conv", pre, blocks, i, sampler);
        if (b->has_resample && load_conv(v, &b->resample, name, chs[i], chs[i], 3)) return -1;
        cin = chs[i];
    }
    return 0;
}

static int load_encoder(zi_vae *v, int add_attention) {
    vae_coder *e = &v->enc;
    int top = v->ch[v->nblocks - 1];
    if (load_conv(v, &e->conv_in, "encoder.conv_in", v->in_ch, v->ch[0], 3) ||
        load_blocks(v, e, "encoder", "down_blocks", "downsamplers", v->layers, v->ch, v->ch[0]) ||
        load_mid(v, e, "encoder", top, add_attention) ||
        load_norm(v, &e->norm_out, "encoder.conv_norm_out", top) ||
        load_conv(v, &e->conv_out, "encoder.conv_out", top, 2 * v->latent_ch, 3))
        return -1;
    return 0;
}

static int load_decoder(zi_vae *v, int add_attention) {
    vae_coder *d = &v->dec;
    int rev[VAE_MAXBLOCKS], n = v->nblocks;
    for (int i = 0; i < n; i++) rev[i] = v->ch[n - 1 - i];
    if (load_conv(v, &d->conv_in, "decoder.conv_in", v->latent_ch, rev[0], 3) ||
        load_mid(v, d, "decoder", rev[0], add_attention) ||
        load_blocks(v, d, "decoder", "up_blocks", "upsamplers", v->layers + 1, rev, rev[0]) ||
        load_norm(v, &d->norm_out, "decoder.conv_norm_out", v->ch[0]) ||
        load_conv(v, &d->conv_out, "decoder.conv_out", v->ch[0], v->out_ch, 3))
        return -1;
    return 0;
}

/* Checks that every entry of the array KEY (when present) is the block type diffusers'
 * Encoder/Decoder needs here, and that there is one per block. */
static int check_types(const zj *cfg, const char *path, const char *key, const char *want, int n) {
    const zj *a = zj_get(cfg, key);
    if (!a) return 0;
    if (a->type != ZJ_ARR || a->n != n) {
        zi_seterr("%s: %s must list %d block types", path, key, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        const zj *s = zj_at(a, i);
        if (s->type != ZJ_STR || strcmp(s->str, want)) {
            zi_seterr("%s: %s[%d] is not %s (unsupported)", path, key, i, want);
            return -1;
        }
    }
    return 0;
}

/* Reads vae/config.json into v (the sizes every weight shape is checked against). */
static int read_config(zi_vae *v, const zj *cfg, const char *path, int *add_attention) {
    v->nblocks = zi_cfg_ints(cfg, "block_out_channels", v->ch, VAE_MAXBLOCKS);
    if (v->nblocks < 1) {
        zi_seterr("%s: block_out_channels missing or longer than %d", path, VAE_MAXBLOCKS);
        return -1;
    }
    if (zi_cfg_need_int(cfg, "layers_per_block", &v->layers) ||
        zi_cfg_need_int(cfg, "latent_channels", &v->latent_ch) ||
        zi_cfg_need_int(cfg, "norm_num_groups", &v->groups))
        return -1;
    v->in_ch = (int)zi_cfg_num(cfg, "in_channels", 3);
    v->out_ch = (int)zi_cfg_num(cfg, "out_channels", 3);
    /* diffusers' defaults: quant convs on, attention on, scaling 0.18215, no shift */
    v->has_quant = zj_bool(cfg, "use_quant_conv", 1);
    v->has_post_quant = zj_bool(cfg, "use_post_quant_conv", 1);
    *add_attention = zj_bool(cfg, "mid_block_add_attention", 1);
    v->scaling = (float)zi_cfg_num(cfg, "scaling_factor", 0.18215);
    v->shift = (float)zi_cfg_num(cfg, "shift_factor", 0.0);
    if (strcmp(zj_str(cfg, "act_fn", "silu"), "silu")) {
        zi_seterr("%s: act_fn %s is not supported (silu only)", path, zj_str(cfg, "act_fn", ""));
        return -1;
    }
    if (check_types(cfg, path, "down_block_types", "DownEncoderBlock2D", v->nblocks) ||
        check_types(cfg, path, "up_block_types", "UpDecoderBlock2D", v->nblocks))
        return -1;
    if (v->layers < 1 || v->latent_ch < 1 || v->in_ch < 1 || v->out_ch < 1 || v->groups < 1) {
        zi_seterr("%s: invalid sizes in the config", path);
        return -1;
    }
    for (int i = 0; i < v->nblocks; i++)
        if (v->ch[i] < 1 || v->ch[i] % v->groups) {
            zi_seterr("%s: block_out_channels[%d] = %d is not a multiple of norm_num_groups %d",
                      path, i, v->ch[i], v->groups);
            return -1;
        }
    return 0;
}

zi_vae *zi_vae_load(const char *vae_dir) {
    char *path = zi_path("%s/config.json", vae_dir);
    zj *cfg = zj_load(path);
    zi_vae *v = zi_calloc(1, sizeof *v);
    int add_attention = 1;
    int ok = cfg && !read_config(v, cfg, path, &add_attention) && (v->st = zi_st_open(vae_dir)) &&
             !load_encoder(v, add_attention) && !load_decoder(v, add_attention) &&
             !(v->has_quant && load_conv(v, &v->quant, "quant_conv", 2 * v->latent_ch, 2 * v->latent_ch, 1)) &&
             !(v->has_post_quant && load_conv(v, &v->post_quant, "post_quant_conv", v->latent_ch, v->latent_ch, 1));
    zj_free(cfg);
    free(path);
    if (!ok) { zi_vae_free(v); return NULL; }
    return v;
}

void zi_vae_free(zi_vae *v) {
    if (!v) return;
    for (int i = 0; i < v->nowned; i++) free(v->owned[i]);
    free(v->owned);
    for (int i = 0; i < VAE_MAXBLOCKS; i++) {
        free(v->enc.blocks[i].res);
        free(v->dec.blocks[i].res);
    }
    zi_st_close(v->st);
    free(v);
}

float zi_vae_scaling(const zi_vae *v) { return v->scaling; }
float zi_vae_shift(const zi_vae *v) { return v->shift; }
int zi_vae_latent_channels(const zi_vae *v) { return v->latent_ch; }
int zi_vae_factor(const zi_vae *v) { return 1 << (v->nblocks - 1); }

/* ---------------------------------------------------------------- activation buffers
 * Every layer writes a new [C, H, W] buffer, and the decoder asks for the same few sizes over
 * and over. Memory fresh from malloc (mmap'd, for these sizes) is new pages, which the
 * kernel faults in and zeroes one by one on first touch, and unmaps again on free, all of it
 * system time of the thread that touches it. So a freed activation is kept (up to
 * VAE_KEEP of them) and handed out again for the next request of its size; a request of
 * another size releases the kept ones first, and so does the end of a decode or an encode.
 * The peak memory does not grow: kept buffers are reused before any buffer of their size is
 * allocated, and released before any buffer of another size is. */
static void act_release(zi_vae *v) {
    while (v->kept.n) free(v->kept.buf[--v->kept.n]);
}

static float *act_new(zi_vae *v, int C, int64_t HW) {
    size_t bytes = (size_t)C * (size_t)HW * sizeof(float);
    if (v->kept.n && v->kept.bytes == bytes) return v->kept.buf[--v->kept.n];
    act_release(v);
    return zi_malloc(bytes);
}

/* frees x [C, HW], or keeps it when it has the kept buffers' size (or there are none) */
static void act_free(zi_vae *v, float *x, int C, int64_t HW) {
    size_t bytes = (size_t)C * (size_t)HW * sizeof(float);
    if (v->kept.n == 0) v->kept.bytes = bytes;
    if (v->kept.bytes == bytes && v->kept.n < VAE_KEEP) v->kept.buf[v->kept.n++] = x;
    else free(x);
}

/* ---------------------------------------------------------------- building blocks */
/* A stride-1 "same" convolution into a new buffer: x [cin, H, W] -> [cout, H, W]. */
static float *conv_same(zi_vae *v, const vae_conv *c, const float *x, int H, int W) {
    float *y = act_new(v, c->cout, (int64_t)H * W);
    int p = c->k / 2;
    zi_conv2d(y, x, c->cin, H, W, &c->w, c->b, c->k, c->k, 1, p, p, p, p);
    return y;
}

/* x [C, HW] -> SiLU(GroupNorm(x)) in y (y may be x) */
static void norm_silu(const zi_vae *v, const vae_norm *n, float *y, const float *x, int64_t HW) {
    zi_groupnorm_silu(y, x, n->w, n->b, n->C, HW, v->groups, VAE_EPS);
}

/* ResnetBlock2D. Consumes x [cin, H, W] (freed), returns [cout, H, W].
 * Peak: three buffers of the larger width (x or the shortcut, conv1's input, conv1's output). */
static float *resnet(zi_vae *v, const vae_resnet *r, float *x, int H, int W) {
    int64_t HW = (int64_t)H * W;
    int cin = r->conv1.cin, cout = r->conv2.cout;
    float *skip = x, *t = x;
    if (r->has_shortcut) {
        skip = conv_same(v, &r->shortcut, x, H, W); /* x is not needed afterwards: */
    } else {
        t = act_new(v, cin, HW);                    /* x is the skip, keep it */
    }
    norm_silu(v, &r->norm1, t, x, HW);
    float *h = conv_same(v, &r->conv1, t, H, W);
    act_free(v, t, cin, HW);
    norm_silu(v, &r->norm2, h, h, HW);
    float *y = conv_same(v, &r->conv2, h, H, W);    /* dropout is 0 */
    act_free(v, h, cout, HW);
    zi_add(y, y, skip, (int64_t)cout * HW);
    act_free(v, skip, cout, HW);
    return y;
}

/* [rows, cols] -> [cols, rows], threaded over the columns (rows of dst) */
typedef struct { float *dst; const float *src; int64_t rows, cols; } transpose_ctx;

static void transpose_cols(void *vctx, int64_t j0, int64_t j1) {
    const transpose_ctx *t = vctx;
    for (int64_t i = 0; i < t->rows; i++)
        for (int64_t j = j0; j < j1; j++) t->dst[j * t->rows + i] = t->src[i * t->cols + j];
}

static void transpose(float *dst, const float *src, int64_t rows, int64_t cols) {
    transpose_ctx t = { dst, src, rows, cols };
    zi_parallel_for(cols, 16, transpose_cols, &t);
}

/* The mid-block attention, in place on x [C, HW]: x += out(attention(q, k, v)) where
 * q, k, v = Linear(GN(x)ᵀ) are [HW, C]: one head of width C, HW tokens. zi_attention
 * streams over the keys, so no [HW, HW] score matrix is ever formed. */
static void attention(zi_vae *v, const vae_attn *a, float *x, int64_t HW) {
    int C = a->C, S = (int)HW;
    float *t = act_new(v, C, HW), *tok = act_new(v, C, HW);
    zi_groupnorm(t, x, a->norm.w, a->norm.b, C, HW, v->groups, VAE_EPS);
    transpose(tok, t, C, HW);                       /* [C, HW] -> tokens [HW, C] */
    float *q = t, *k = act_new(v, C, HW), *val = act_new(v, C, HW);
    zi_linear(q, tok, S, &a->q, a->bq);
    zi_linear(k, tok, S, &a->k, a->bk);
    zi_linear(val, tok, S, &a->v, a->bv);
    float *o = tok;                                 /* tok is consumed: reuse it */
    zi_attention(o, C, q, C, k, C, val, C, S, S, 1, 1, C, 1.0f / sqrtf((float)C), 0, S, NULL);
    float *p = k;
    zi_linear(p, o, S, &a->out, a->bout);           /* [HW, C] */
    transpose(t, p, HW, C);                         /* back to [C, HW] */
    zi_add(x, x, t, (int64_t)C * HW);               /* residual connection, rescale 1 */
    act_free(v, t, C, HW), act_free(v, tok, C, HW), act_free(v, k, C, HW), act_free(v, val, C, HW);
}

/* UNetMidBlock2D: resnet, attention, resnet at constant width. Consumes x. */
static float *mid_block(zi_vae *v, const vae_coder *c, float *x, int H, int W) {
    x = resnet(v, &c->mid[0], x, H, W);
    if (c->has_attn) attention(v, &c->attn, x, (int64_t)H * W);
    return resnet(v, &c->mid[1], x, H, W);
}

/* Downsample2D (padding 0): zero-pad right and bottom by one, conv3x3 stride 2.
 * Consumes x [C, H, W]; returns [C, H/2, W/2]. */
static float *downsample(zi_vae *v, const vae_conv *c, float *x, int H, int W) {
    float *y = act_new(v, c->cout, (int64_t)(H / 2) * (W / 2));
    zi_conv2d(y, x, c->cin, H, W, &c->w, c->b, c->k, c->k, 2, 0, 0, 1, 1);
    act_free(v, x, c->cin, (int64_t)H * W);
    return y;
}

/* Band [lo, hi) of the nearest-neighbour ×2 upsampling of x [C, H, W]:
 * band[c][r - lo][j] = x[c][r / 2][j / 2]; one channel per index. */
typedef struct { float *band; const float *x; int H, W, lo, hi; } upfill_ctx;

static void upfill(void *vctx, int64_t c0, int64_t c1) {
    const upfill_ctx *u = vctx;
    int W2 = 2 * u->W, n = u->hi - u->lo;
    for (int64_t c = c0; c < c1; c++)
        for (int r = u->lo; r < u->hi; r++) {
            const float *src = u->x + ((size_t)c * u->H + r / 2) * u->W;
            float *dst = u->band + ((size_t)c * n + (r - u->lo)) * W2;
            for (int j = 0; j < W2; j++) dst[j] = src[j / 2];
        }
}

/* A band's conv output out [Cout, n, Wo] into rows r0 .. r0 + n of y [Cout, Ho, Wo]; one
 * channel per index. */
typedef struct { float *y; const float *out; int Ho, Wo, r0, n; } bandcopy_ctx;

static void bandcopy(void *vctx, int64_t o0, int64_t o1) {
    const bandcopy_ctx *b = vctx;
    size_t len = (size_t)b->n * b->Wo;
    for (int64_t o = o0; o < o1; o++)
        memcpy(b->y + ((size_t)o * b->Ho + b->r0) * b->Wo, b->out + (size_t)o * len, len * sizeof(float));
}

/* Upsample2D: nearest ×2 then conv3x3 (padding 1). Consumes x [C, H, W]; returns
 * [C, 2H, 2W]. The output is produced in bands of rows; each band's conv reads the upsampled
 * rows it covers plus one halo row on either side (zero padding at the image border), so
 * only one band of the upsampled image exists at a time. */
static float *upsample(zi_vae *v, const vae_conv *c, float *x, int H, int W) {
    int Ho = 2 * H, Wo = 2 * W, C = c->cin;
    int R = (int)(VAE_BAND_FLOATS / ((int64_t)C * Wo));
    R = R < 1 ? 1 : R > Ho ? Ho : R;
    float *y = act_new(v, c->cout, (int64_t)Ho * Wo);
    float *in = zi_malloc((size_t)C * (R + 2) * Wo * sizeof(float));
    float *out = zi_malloc((size_t)c->cout * R * Wo * sizeof(float));
    for (int r0 = 0; r0 < Ho; r0 += R) {
        int r1 = r0 + R < Ho ? r0 + R : Ho, n = r1 - r0;
        int lo = r0 > 0 ? r0 - 1 : 0, hi = r1 < Ho ? r1 + 1 : Ho;
        upfill_ctx u = { in, x, H, W, lo, hi };
        zi_parallel_for(C, 1, upfill, &u);
        zi_conv2d(out, in, C, hi - lo, Wo, &c->w, c->b, 3, 3, 1, r0 == 0, 1, r1 == Ho, 1);
        bandcopy_ctx b = { y, out, Ho, Wo, r0, n };
        zi_parallel_for(c->cout, 1, bandcopy, &b);
    }
    free(in), free(out);
    act_free(v, x, C, (int64_t)H * W);
    return y;
}

/* conv_norm_out, SiLU, conv_out. Consumes x. */
static float *head(zi_vae *v, const vae_coder *c, float *x, int H, int W) {
    norm_silu(v, &c->norm_out, x, x, (int64_t)H * W);
    float *y = conv_same(v, &c->conv_out, x, H, W);
    act_free(v, x, c->norm_out.C, (int64_t)H * W);
    return y;
}

/* h, w: positive multiples of mult, small enough for int pixel counts after upsampling */
static int check_size(const char *what, int h, int w, int mult) {
    if (h < 1 || w < 1 || h % mult || w % mult || (int64_t)h * w > INT32_MAX / 64) {
        zi_seterr("VAE %s: unsupported size %dx%d (positive multiples of %d expected)", what, w, h, mult);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- decoder and encoder */
float *zi_vae_decode(zi_vae *v, const float *z, int h, int w) {
    if (check_size("decode", h, w, 1)) return NULL;
    const vae_coder *d = &v->dec;
    float *pq = NULL;
    if (v->has_post_quant) z = pq = conv_same(v, &v->post_quant, z, h, w);
    float *x = conv_same(v, &d->conv_in, z, h, w);
    free(pq);
    x = mid_block(v, d, x, h, w);
    for (int i = 0; i < v->nblocks; i++) {
        const vae_block *b = &d->blocks[i];
        for (int j = 0; j < b->nres; j++) x = resnet(v, &b->res[j], x, h, w);
        if (b->has_resample) x = upsample(v, &b->resample, x, h, w), h *= 2, w *= 2;
    }
    x = head(v, d, x, h, w);
    act_release(v);
    return x;
}

int zi_vae_encode(zi_vae *v, const float *img, int H, int W, float **mean, float **logvar) {
    *mean = *logvar = NULL;
    if (check_size("encode", H, W, zi_vae_factor(v))) return -1;
    const vae_coder *e = &v->enc;
    float *x = conv_same(v, &e->conv_in, img, H, W);
    for (int i = 0; i < v->nblocks; i++) {
        const vae_block *b = &e->blocks[i];
        for (int j = 0; j < b->nres; j++) x = resnet(v, &b->res[j], x, H, W);
        if (b->has_resample) x = downsample(v, &b->resample, x, H, W), H /= 2, W /= 2;
    }
    x = mid_block(v, e, x, H, W);
    x = head(v, e, x, H, W);                        /* [2·latent, H, W] */
    if (v->has_quant) {
        float *q = conv_same(v, &v->quant, x, H, W);
        free(x);
        x = q;
    }
    /* DiagonalGaussianDistribution: the first half is the mean, the second the log-variance,
     * clamped to [-30, 20] */
    size_t n = (size_t)v->latent_ch * H * W;
    *mean = zi_malloc(n * sizeof(float));
    *logvar = zi_malloc(n * sizeof(float));
    memcpy(*mean, x, n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        float l = x[n + i];
        (*logvar)[i] = l < -30.0f ? -30.0f : l > 20.0f ? 20.0f : l;
    }
    free(x);
    act_release(v);
    return 0;
}
