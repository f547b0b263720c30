/* qwen3.c: the Qwen3 text encoder (transformers' Qwen3Model) as the Z-Image pipeline uses it.
 *
 * Z-Image conditions the DiT on hidden_states[-2] of Qwen3: the output of the second-to-last
 * decoder layer, before the final RMSNorm. So only the embeddings and the first
 * num_hidden_layers - 1 layers are loaded and run; the last layer, model.norm and lm_head are
 * never touched. One prompt at a time, only its real tokens (positions 0..L-1): with causal
 * attention the right padding of the reference changes nothing for them.
 *
 * One decoder layer (h: [L, D], pre-norm, two residual branches):
 *   a = RMSNorm(h)                                   input_layernorm
 *   q = a·Wqᵀ [L, Hq, hd], k = a·Wkᵀ, v = a·Wvᵀ [L, Hkv, hd]
 *   q, k = RMSNorm per head (q_norm, k_norm), then rotate-half RoPE
 *   h += softmax(q·kᵀ / sqrt(hd) + causal) · v · Woᵀ  grouped-query: head j uses kv head j / (Hq/Hkv)
 *   m = RMSNorm(h)                                   post_attention_layernorm
 *   h += (silu(m·Wgᵀ) ⊙ m·Wuᵀ) · Wdᵀ                 SwiGLU MLP
 */
#include "zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { LIN_Q, LIN_K, LIN_V, LIN_O, LIN_GATE, LIN_UP, LIN_DOWN, NLIN };
static const char *const lin_names[NLIN] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
};

typedef struct {
    float *in_norm, *post_norm;     /* [D] */
    float *q_norm, *k_norm;         /* [hd], shared by all heads */
    zi_lin lin[NLIN];
} te_layer;

struct zi_te {
    zi_st *st;
    int dim, inter, n_heads, n_kv, head_dim, vocab;
    int n_layers;                   /* layers run: num_hidden_layers - 1 */
    float eps, theta;
    const zi_tensor *embed;         /* [vocab, D], any float dtype, inside the mmap */
    te_layer *layers;
};

/* ---------------------------------------------------------------- loading */

/* An optional integer of config.json: def when absent or null, an error when not an integer. */
static int cfg_int_or(const zj *cfg, const char *key, int def, int *out) {
    if (isnan(zi_cfg_num(cfg, key, NAN))) {
        *out = def;
        return 0;
    }
    return zi_cfg_need_int(cfg, key, out);
}

/* Hyper-parameters from config.json. Defaults as in transformers' Qwen3Config where the key
 * may be absent; head_dim, when absent, is read later from the q_norm weight. */
static int read_config(zi_te *te, const char *te_dir) {
    zj *cfg = zi_config_load(te_dir, "");
    if (!cfg) return -1;
    int total = 0, rc = -1;
    if (zi_cfg_need_int(cfg, "hidden_size", &te->dim) || zi_cfg_need_int(cfg, "intermediate_size", &te->inter) ||
        zi_cfg_need_int(cfg, "num_hidden_layers", &total) ||
        zi_cfg_need_int(cfg, "num_attention_heads", &te->n_heads) || zi_cfg_need_int(cfg, "vocab_size", &te->vocab))
        goto done;
    if (cfg_int_or(cfg, "num_key_value_heads", te->n_heads, &te->n_kv) || cfg_int_or(cfg, "head_dim", 0, &te->head_dim))
        goto done;
    te->eps = (float)zi_cfg_num(cfg, "rms_norm_eps", 1e-6);
    /* v4 configs: top-level rope_theta; v5: rope_parameters.rope_theta (zi_cfg_num looks in both) */
    te->theta = (float)zi_cfg_num(cfg, "rope_theta", 10000.0);
    const char *act = zj_str(cfg, "hidden_act", "silu");
    /* only plain RoPE: v5 names the type in rope_parameters, v4 in rope_scaling (null when plain) */
    const zj *scaling = zj_get(cfg, "rope_scaling");
    const char *rope_type = zj_str(zj_get(cfg, "rope_parameters"), "rope_type",
                                   zj_str(scaling, "rope_type", zj_str(scaling, "type", "default")));
    if (strcmp(act, "silu") || strcmp(rope_type, "default") || zj_bool(cfg, "use_sliding_window", 0) ||
        zj_bool(cfg, "attention_bias", 0)) {
        zi_seterr("%s/config.json: unsupported Qwen3 variant (hidden_act %s, rope_type %s, sliding window or "
                  "attention bias)", te_dir, act, rope_type);
        goto done;
    }
    if (te->dim <= 0 || te->inter <= 0 || total < 1 || te->n_heads <= 0 || te->n_kv <= 0 || te->vocab <= 0 ||
        te->n_heads % te->n_kv || te->head_dim < 0 || te->head_dim % 2 || !(te->eps > 0) || !(te->theta > 0)) {
        zi_seterr("%s/config.json: invalid text encoder dimensions", te_dir);
        goto done;
    }
    te->n_layers = total - 1;
    rc = 0;
done:
    zj_free(cfg);
    return rc;
}

/* The checkpoint's tensor for "PREFIXname" with exactly this shape (NULL, error set, if not). */
static const zi_tensor *need(const zi_te *te, const char *prefix, const char *name, int ndim,
                             int64_t d0, int64_t d1) {
    char key[256];
    snprintf(key, sizeof key, "%s%s", prefix, name);
    int64_t shape[2] = { d0, d1 };
    return zi_st_need(te->st, key, ndim, shape);
}

/* A float32 copy of a norm weight [n]. */
static float *need_f32(const zi_te *te, const char *prefix, const char *name, int64_t n) {
    char key[256];
    snprintf(key, sizeof key, "%s%s", prefix, name);
    return zi_st_need_f32(te->st, key, 1, &n);
}

static int load_layer(zi_te *te, const char *prefix, int i) {
    te_layer *l = &te->layers[i];
    int64_t D = te->dim, qw = (int64_t)te->n_heads * te->head_dim, kvw = (int64_t)te->n_kv * te->head_dim;
    /* [out, in] of each Linear, in lin_names order */
    const int64_t shapes[NLIN][2] = {
        { qw, D }, { kvw, D }, { kvw, D }, { D, qw }, { te->inter, D }, { te->inter, D }, { D, te->inter },
    };
    char name[128];
    for (int j = 0; j < NLIN; j++) {
        snprintf(name, sizeof name, "layers.%d.%s.weight", i, lin_names[j]);
        char key[256];
        snprintf(key, sizeof key, "%s%s", prefix, name);
        if (zi_st_need_mat(te->st, key, 2, shapes[j], &l->lin[j].W)) return -1;
        l->lin[j].name = zi_path("layers.%d.%s", i, lin_names[j]);
    }
    snprintf(name, sizeof name, "layers.%d.input_layernorm.weight", i);
    if (!(l->in_norm = need_f32(te, prefix, name, D))) return -1;
    snprintf(name, sizeof name, "layers.%d.post_attention_layernorm.weight", i);
    if (!(l->post_norm = need_f32(te, prefix, name, D))) return -1;
    snprintf(name, sizeof name, "layers.%d.self_attn.q_norm.weight", i);
    if (!(l->q_norm = need_f32(te, prefix, name, te->head_dim))) return -1;
    snprintf(name, sizeof name, "layers.%d.self_attn.k_norm.weight", i);
    if (!(l->k_norm = need_f32(te, prefix, name, te->head_dim))) return -1;
    return 0;
}

/* head_dim absent from config.json: transformers' Qwen3Config then assumes 128, while older
 * Qwen code used hidden / heads; the q_norm weight [head_dim] settles it. */
static int infer_head_dim(zi_te *te, const char *prefix) {
    char key[256];
    snprintf(key, sizeof key, "%slayers.0.self_attn.q_norm.weight", prefix);
    const zi_tensor *t = zi_st_get(te->st, key);
    if (!t || t->ndim != 1 || t->shape[0] <= 0 || t->shape[0] % 2) {
        zi_seterr("%s: no head_dim in config.json and no usable %s", zi_st_path(te->st), key);
        return -1;
    }
    te->head_dim = (int)t->shape[0];
    return 0;
}

zi_te *zi_te_load(const char *te_dir) {
    zi_te *te = zi_calloc(1, sizeof *te);
    if (read_config(te, te_dir) || !(te->st = zi_st_open(te_dir))) goto fail;
    /* Qwen3ForCausalLM checkpoints name everything "model.…", a bare Qwen3Model does not */
    const char *prefix = zi_st_get(te->st, "model.embed_tokens.weight") ? "model." : "";
    if (!te->head_dim && infer_head_dim(te, prefix)) goto fail;
    if (!(te->embed = need(te, prefix, "embed_tokens.weight", 2, te->vocab, te->dim))) goto fail;
    if (te->embed->dtype != ZI_F32 && te->embed->dtype != ZI_BF16 && te->embed->dtype != ZI_F16) {
        zi_seterr("%s: embed_tokens.weight: unsupported dtype %s", zi_st_path(te->st), zi_dtype_name(te->embed->dtype));
        goto fail;
    }
    te->layers = zi_calloc(te->n_layers ? te->n_layers : 1, sizeof *te->layers);
    for (int i = 0; i < te->n_layers; i++)
        if (load_layer(te, prefix, i)) goto fail;
    return te;
fail:
    zi_te_free(te);
    return NULL;
}

void zi_te_free(zi_te *te) {
    if (!te) return;
    for (int i = 0; te->layers && i < te->n_layers; i++) {
        te_layer *l = &te->layers[i];
        free(l->in_norm); free(l->post_norm); free(l->q_norm); free(l->k_norm);
        for (int j = 0; j < NLIN; j++) free((char *)l->lin[j].name);
    }
    free(te->layers);
    zi_st_close(te->st);
    free(te);
}

int zi_te_dim(const zi_te *te) { return te->dim; }

/* ---------------------------------------------------------------- forward */

/* RoPE tables [L, hd/2] as transformers computes them in float32:
 * inv_freq[i] = 1 / theta^(float(2i) / hd), angle = float(p) · inv_freq[i].
 *
 * inv_freq is then rounded to bfloat16. Why: the golden reference (test/golden, made by
 * gen_golden.py) casts the whole Qwen3 module to bf16 to save it and back to float32 to run it;
 * nn.Module.to() rounds the inv_freq buffer too, so every reference output (te-N and the
 * pipe-N prompt embeddings) was computed from a bf16-rounded inv_freq (our float32 table
 * differs by up to 6e-4 of the output's magnitude; the rounded one matches to 3e-7).
 * transformers' from_pretrained() keeps inv_freq float32. When the oracle is fixed (run the
 * encoder after reloading it, or restore inv_freq), drop this rounding. */
static void rope_tables(float *cos_, float *sin_, int L, int hd, float theta) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
        inv_freq = zi_bf16_round(inv_freq);
        for (int p = 0; p < L; p++) {
            float a = (float)p * inv_freq;
            cos_[(size_t)p * half + i] = cosf(a);
            sin_[(size_t)p * half + i] = sinf(a);
        }
    }
}

static void dump_hidden(int k, const float *h, int L, int D) {
    if (!zi_dump_active()) return;
    char name[32];
    snprintf(name, sizeof name, "te.hidden.%d", k);
    int64_t shape[2] = { L, D };
    zi_dump(name, 2, shape, h);
}

/* Scratch buffers of one forward, sized for L tokens. */
typedef struct {
    float *a;           /* [L, D]   normed input of a branch, then its output */
    float *q, *k, *v;   /* [L, Hq·hd], [L, Hkv·hd] x2 */
    float *o;           /* [L, Hq·hd] attention output */
    float *g, *u;       /* [L, inter] */
    float *cos_, *sin_; /* [L, hd/2] */
} te_scratch;

static void attention_block(const zi_te *te, const te_layer *l, te_scratch *s, float *h, int L) {
    int D = te->dim, hd = te->head_dim, Hq = te->n_heads, Hkv = te->n_kv;
    zi_rmsnorm(s->a, h, l->in_norm, L, D, te->eps);
    zi_lin_forward(&l->lin[LIN_Q], s->a, L, s->q);
    zi_lin_forward(&l->lin[LIN_K], s->a, L, s->k);
    zi_lin_forward(&l->lin[LIN_V], s->a, L, s->v);
    /* QK-norm over each head vector, before RoPE */
    zi_rmsnorm(s->q, s->q, l->q_norm, (int64_t)L * Hq, hd, te->eps);
    zi_rmsnorm(s->k, s->k, l->k_norm, (int64_t)L * Hkv, hd, te->eps);
    zi_rope_half(s->q, (int64_t)Hq * hd, L, Hq, hd, s->cos_, s->sin_);
    zi_rope_half(s->k, (int64_t)Hkv * hd, L, Hkv, hd, s->cos_, s->sin_);
    /* scale: transformers' head_dim**-0.5 */
    zi_attention(s->o, (int64_t)Hq * hd, s->q, (int64_t)Hq * hd, s->k, (int64_t)Hkv * hd, s->v,
                 (int64_t)Hkv * hd, L, L, Hq, Hkv, hd, (float)(1.0 / sqrt((double)hd)), 1, L, NULL);
    zi_lin_forward(&l->lin[LIN_O], s->o, L, s->a);
    zi_add(h, h, s->a, (int64_t)L * D);
}

static void mlp_block(const zi_te *te, const te_layer *l, te_scratch *s, float *h, int L) {
    int D = te->dim;
    zi_rmsnorm(s->a, h, l->post_norm, L, D, te->eps);
    zi_lin_forward(&l->lin[LIN_GATE], s->a, L, s->g);
    zi_lin_forward(&l->lin[LIN_UP], s->a, L, s->u);
    zi_silu_mul(s->g, s->g, s->u, (int64_t)L * te->inter);
    zi_lin_forward(&l->lin[LIN_DOWN], s->g, L, s->a);
    zi_add(h, h, s->a, (int64_t)L * D);
}

float *zi_te_encode(zi_te *te, const int32_t *ids, int L) {
    if (L <= 0) {
        zi_seterr("%s: empty token sequence", zi_st_path(te->st));
        return NULL;
    }
    for (int p = 0; p < L; p++)
        if (ids[p] < 0 || ids[p] >= te->vocab) {
            zi_seterr("%s: token id %d at position %d outside the vocabulary (%d)", zi_st_path(te->st), ids[p], p,
                      te->vocab);
            return NULL;
        }
    size_t D = (size_t)te->dim, qw = (size_t)te->n_heads * te->head_dim, kvw = (size_t)te->n_kv * te->head_dim;
    size_t esize = zi_dtype_size(te->embed->dtype);

    /* h = E[ids]: only the rows used are converted */
    float *h = zi_malloc((size_t)L * D * sizeof(float));
    for (int p = 0; p < L; p++)
        zi_to_f32(h + p * D, (const char *)te->embed->data + (size_t)ids[p] * D * esize, te->embed->dtype, D);
    dump_hidden(0, h, L, te->dim);

    te_scratch s;
    s.a = zi_malloc((size_t)L * D * sizeof(float));
    s.q = zi_malloc((size_t)L * qw * sizeof(float));
    s.k = zi_malloc((size_t)L * kvw * sizeof(float));
    s.v = zi_malloc((size_t)L * kvw * sizeof(float));
    s.o = zi_malloc((size_t)L * qw * sizeof(float));
    s.g = zi_malloc((size_t)L * te->inter * sizeof(float));
    s.u = zi_malloc((size_t)L * te->inter * sizeof(float));
    s.cos_ = zi_malloc((size_t)L * (te->head_dim / 2) * sizeof(float));
    s.sin_ = zi_malloc((size_t)L * (te->head_dim / 2) * sizeof(float));
    rope_tables(s.cos_, s.sin_, L, te->head_dim, te->theta);

    for (int i = 0; i < te->n_layers; i++) {
        attention_block(te, &te->layers[i], &s, h, L);
        mlp_block(te, &te->layers[i], &s, h, L);
        dump_hidden(i + 1, h, L, te->dim);
    }
    free(s.a); free(s.q); free(s.k); free(s.v); free(s.o); free(s.g); free(s.u); free(s.cos_); free(s.sin_);
    return h;
}
