/* lora.c: Linear layers with LoRA adapters, and LoRA files: load every common key format,
 * attach at run time or merge into the weights, save and convert.
 *
 * A LoRA module adds ΔW = scale · B·A to a Linear W [out, in], with A [rank, in] (down) and
 * B [out, rank] (up); scale = alpha/rank when the file gives alpha, else 1, times the user's
 * strength. Files name the target Linear in one of several dialects:
 *   DiffSynth        layers.0.attention.to_q.lora_A.default.weight
 *   diffusers/PEFT   transformer.layers.0.attention.to_q.lora_A.weight (+ .alpha),
 *                    base_model.model.layers.0...
 *   ai-toolkit       diffusion_model.layers.0.attention.to_q.lora_A.weight
 *   ComfyUI native   diffusion_model.layers.0.attention.qkv.lora_down.weight (fused q/k/v),
 *                    ...attention.out...
 *   kohya / musubi   lora_unet_layers_0_attention_to_q.lora_down.weight, .lora_up, .alpha
 *                    (also "lora_unet__"): dots flattened to underscores.
 * Loading turns all of them into modules named as in diffusers (the names zi_lin carries).
 */
#include "zimage.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- run-time application */
void zi_lin_forward(const zi_lin *l, const float *x, int M, float *y) {
    zi_linear(y, x, M, &l->W, l->bias);
    for (const zi_lora_adapter *a = l->lora; a; a = a->next) {
        /* h = x·Aᵀ [M, rank], then y += scale · h·Bᵀ */
        float *h = zi_malloc((size_t)M * a->rank * sizeof(float));
        zi_gemm(0, 1, M, a->rank, (int)l->W.cols, 1.0f, x, l->W.cols, a->A, ZI_F32, l->W.cols, 0.0f, h, a->rank);
        zi_gemm(0, 1, M, (int)l->W.rows, a->rank, a->scale, h, a->rank, a->B, ZI_F32, a->rank, 1.0f, y, l->W.rows);
        free(h);
    }
}

void zi_lin_attach(zi_lin *l, zi_lora_adapter *a) {
    zi_lora_adapter **tail = &l->lora;
    while (*tail) tail = &(*tail)->next;
    a->next = NULL;
    *tail = a;
}

void zi_lin_detach(zi_lin *l, zi_lora_adapter *a) {
    zi_lora_adapter **p = &l->lora;
    while (*p && *p != a) p = &(*p)->next;
    if (*p) *p = a->next;
}

/* The backward of zi_lin_forward for dy [M, out] at input x [M, in]:
 *   dx  = dy·W + Σ scale·(dy·B)·A              (written; skipped when dx is NULL)
 *   dB += scale·dyᵀ·(x·Aᵀ)     [out, rank]     for adapters with gradient buffers
 *   dA += scale·(dy·B)ᵀ·x      [rank, in]
 * The sums over the M rows are GEMM reductions in a fixed order: the same bits for any
 * thread count. Adapters without dA/dB are frozen but still pass the gradient on to dx. */
void zi_lin_backward(const zi_lin *l, const float *x, const float *dy, int M, float *dx) {
    int in = (int)l->W.cols, out = (int)l->W.rows;
    if (dx) zi_gemm(0, 0, M, in, out, 1.0f, dy, out, l->W.data, l->W.dtype, in, 0.0f, dx, in);
    for (const zi_lora_adapter *a = l->lora; a; a = a->next) {
        int train = a->dA && a->dB;
        if (!train && !dx) continue;
        /* u = dy·B [M, rank] */
        float *u = zi_malloc((size_t)M * a->rank * sizeof(float));
        zi_gemm(0, 0, M, a->rank, out, 1.0f, dy, out, a->B, ZI_F32, a->rank, 0.0f, u, a->rank);
        if (dx) zi_gemm(0, 0, M, in, a->rank, a->scale, u, a->rank, a->A, ZI_F32, in, 1.0f, dx, in);
        if (train) {
            float *h = zi_malloc((size_t)M * a->rank * sizeof(float));
            zi_gemm(0, 1, M, a->rank, in, 1.0f, x, in, a->A, ZI_F32, in, 0.0f, h, a->rank);
            zi_gemm(1, 0, out, a->rank, M, a->scale, dy, out, h, ZI_F32, a->rank, 1.0f, a->dB, a->rank);
            zi_gemm(1, 0, a->rank, in, M, a->scale, u, a->rank, x, ZI_F32, in, 1.0f, a->dA, in);
            free(h);
        }
        free(u);
    }
}

char *zi_lora_arg(const char *arg, float *strength) {
    char *file = zi_strdup(arg), *colon = strrchr(file, ':');
    *strength = 1.0f;
    if (colon && colon[1]) {
        char *end;
        double v = strtod(colon + 1, &end);
        if (!*end) {
            if (!isfinite(v)) {
                zi_seterr("%s: LoRA strength must be a finite number", arg);
                free(file);
                return NULL;
            }
            *strength = (float)v;
            *colon = 0;
        }
    }
    return file;
}

/* ---------------------------------------------------------------- key names */
/* Prefixes that only say which model the key belongs to. */
static const char *const prefixes[] = {
    "base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.",
};
/* Prefixes after which the module name is flattened (dots -> underscores). */
static const char *const flat_prefixes[] = { "lora_unet__", "lora_unet_", "lycoris_" };

enum { ROLE_DOWN, ROLE_UP, ROLE_ALPHA };
static const struct { const char *suffix; int role; } suffixes[] = {
    {".lora_A.default.weight", ROLE_DOWN}, {".lora_B.default.weight", ROLE_UP},
    {".lora_A.weight", ROLE_DOWN},         {".lora_B.weight", ROLE_UP},
    {".lora_down.weight", ROLE_DOWN},      {".lora_up.weight", ROLE_UP},
    {".lora.down.weight", ROLE_DOWN},      {".lora.up.weight", ROLE_UP},
    {"_lora.down.weight", ROLE_DOWN},      {"_lora.up.weight", ROLE_UP},
    {".lora_linear_layer.down.weight", ROLE_DOWN}, {".lora_linear_layer.up.weight", ROLE_UP},
    {".lora_A", ROLE_DOWN},                {".lora_B", ROLE_UP},
    {".lora_down", ROLE_DOWN},             {".lora_up", ROLE_UP},
    {".alpha", ROLE_ALPHA},
};

/* Identifiers of the Z-Image DiT that contain underscores: un-flattening a kohya name joins
 * the pieces of these back together (the longest match wins), every other '_' is a '.'. */
static const char *const idents[] = {
    "all_final_layer", "all_x_embedder", "adaLN_modulation", "attention_norm1", "attention_norm2",
    "cap_embedder", "cap_pad_token", "context_refiner", "feed_forward", "ffn_norm1", "ffn_norm2",
    "noise_refiner", "norm_k", "norm_q", "k_norm", "q_norm", "t_embedder", "to_k", "to_out",
    "to_q", "to_v", "x_embedder", "x_pad_token", "final_layer",
};

static int starts(const char *s, const char *p) { return !strncmp(s, p, strlen(p)); }

static char *unflatten(const char *flat) {
    size_t n = strlen(flat);
    char *out = zi_malloc(n + 1);
    size_t o = 0, i = 0;
    while (i < n) {
        /* the longest identifier that starts here and ends at '_' or the end */
        size_t best = 0;
        for (size_t k = 0; k < sizeof idents / sizeof idents[0]; k++) {
            size_t l = strlen(idents[k]);
            if (l > best && !strncmp(flat + i, idents[k], l) && (flat[i + l] == '_' || !flat[i + l])) best = l;
        }
        if (!best) {
            while (i + best < n && flat[i + best] != '_') best++;
        }
        memcpy(out + o, flat + i, best);
        o += best;
        i += best;
        if (i < n) { out[o++] = '.'; i++; }   /* the separator */
    }
    out[o] = 0;
    return out;
}

/* Original (ComfyUI / Lumina2) module names -> diffusers names. */
static char *to_diffusers_name(char *name) {
    static const struct { const char *from, *to; } ren[] = {
        {"x_embedder", "all_x_embedder.2-1"},
        {"final_layer.", "all_final_layer.2-1."},
    };
    for (size_t k = 0; k < sizeof ren / sizeof ren[0]; k++) {
        if (starts(name, ren[k].from)) {
            char *r = zi_path("%s%s", ren[k].to, name + strlen(ren[k].from));
            free(name);
            return r;
        }
    }
    size_t n = strlen(name);
    if (n >= 14 && !strcmp(name + n - 14, ".attention.out")) {
        name[n - 4] = 0;                                  /* "...attention" + ".to_out.0" */
        char *r = zi_path("%s.to_out.0", name);
        free(name);
        return r;
    }
    return name;
}

/* Splits a key into module name (diffusers naming, malloc'd) and role; NULL when the key is
 * not a LoRA key of a form we know. */
static char *parse_key(const char *key, int *role) {
    const char *s = key;
    int flat = 0;
    for (int again = 1; again;) {
        again = 0;
        for (size_t k = 0; k < sizeof prefixes / sizeof prefixes[0]; k++)
            if (starts(s, prefixes[k])) { s += strlen(prefixes[k]); again = 1; }
    }
    for (size_t k = 0; k < sizeof flat_prefixes / sizeof flat_prefixes[0]; k++)
        if (starts(s, flat_prefixes[k])) { s += strlen(flat_prefixes[k]); flat = 1; break; }
    size_t n = strlen(s);
    for (size_t k = 0; k < sizeof suffixes / sizeof suffixes[0]; k++) {
        size_t l = strlen(suffixes[k].suffix);
        if (n > l && !strcmp(s + n - l, suffixes[k].suffix)) {
            *role = suffixes[k].role;
            char *base = strndup(s, n - l);
            if (flat) {
                char *u = unflatten(base);
                free(base);
                base = u;
            }
            return to_diffusers_name(base);
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------- loading */
typedef struct {
    char *name;
    const zi_tensor *down, *up, *alpha;
} key_group;

static key_group *group_of(key_group **g, int *n, char *name) {
    for (int i = 0; i < *n; i++)
        if (!strcmp((*g)[i].name, name)) { free(name); return &(*g)[i]; }
    *g = zi_realloc(*g, (size_t)(*n + 1) * sizeof **g);
    (*g)[*n] = (key_group){ .name = name };
    return &(*g)[(*n)++];
}

/* alpha from diffusers' "lora_adapter_metadata" (PEFT LoraConfig as JSON), NAN when absent */
static float metadata_alpha(const zi_st *st) {
    const char *meta = zi_st_meta(st, "lora_adapter_metadata");
    if (!meta) return NAN;
    zj *cfg = zj_parse(meta, strlen(meta), "lora_adapter_metadata");
    float a = cfg ? (float)zj_num(cfg, "lora_alpha", NAN) : NAN;
    zj_free(cfg);
    return a;
}

static void add_module(zi_lora *l, char *name, int rank, int in, int out, const float *A, const float *B,
                       float alpha) {
    l->m = zi_realloc(l->m, (size_t)(l->n + 1) * sizeof *l->m);
    zi_lora_module *m = &l->m[l->n++];
    *m = (zi_lora_module){ .name = name, .rank = rank, .in = in, .out = out, .alpha = alpha };
    m->A = memcpy(zi_malloc((size_t)rank * in * sizeof(float)), A, (size_t)rank * in * sizeof(float));
    m->B = memcpy(zi_malloc((size_t)out * rank * sizeof(float)), B, (size_t)out * rank * sizeof(float));
}

static int load_group(zi_lora *l, const key_group *g, float meta_alpha) {
    const char *path = l->path;
    if (!g->down || !g->up) {
        zi_seterr("%s: LoRA module %s has no %s matrix", path, g->name, g->down ? "up (B)" : "down (A)");
        return -1;
    }
    /* A [rank, in] (or a 1x1 conv [rank, in, 1, 1]), B [out, rank]; rank and out >= 1 (an
     * empty dimension would divide by zero below), all of them ints */
    const zi_tensor *a = g->down, *b = g->up;
    int64_t a_r = a->ndim >= 2 ? a->shape[0] : 0, b_out = b->ndim >= 2 ? b->shape[0] : 0;
    int64_t a_in = a_r > 0 ? a->numel / a_r : 0, b_r = b_out > 0 ? b->numel / b_out : 0;
    if (a_r < 1 || b_out < 1 || b_r != a_r || a_r > INT_MAX || a_in > INT_MAX || b_out > INT_MAX) {
        zi_seterr("%s: LoRA module %s: down and up shapes do not fit (rank %lld vs %lld)", path, g->name,
                  (long long)a_r, (long long)b_r);
        return -1;
    }
    float *A = zi_tensor_f32(a), *B = zi_tensor_f32(b);
    if (!A || !B) {
        free(A); free(B);
        zi_seterr("%s: LoRA module %s is not a float tensor", path, g->name);
        return -1;
    }
    float alpha = meta_alpha;
    if (g->alpha) {
        float *v = zi_tensor_f32(g->alpha);
        if (!v || g->alpha->numel != 1) {
            free(v); free(A); free(B);
            zi_seterr("%s: %s.alpha is not a scalar", path, g->name);
            return -1;
        }
        alpha = v[0];
        free(v);
    }
    int rank = (int)a->shape[0], in = (int)a_in, out = (int)b->shape[0];
    size_t n = strlen(g->name);
    if (n > 4 && !strcmp(g->name + n - 4, ".qkv")) {
        /* ComfyUI's fused attention.qkv: B's rows are q, k, v in thirds; A is shared
         * (musubi's block-diagonal export slices the same way). */
        if (out % 3) {
            free(A); free(B);
            zi_seterr("%s: %s: fused qkv with %d rows", path, g->name, out);
            return -1;
        }
        static const char *const qkv[3] = {"to_q", "to_k", "to_v"};
        for (int k = 0; k < 3; k++)
            add_module(l, zi_path("%.*s.%s", (int)(n - 4), g->name, qkv[k]), rank, in, out / 3,
                       A, B + (size_t)k * (out / 3) * rank, alpha);
    } else {
        add_module(l, zi_strdup(g->name), rank, in, out, A, B, alpha);
    }
    free(A);
    free(B);
    return 0;
}

zi_lora *zi_lora_load(const char *path) {
    zi_st *st = zi_st_open(path);
    if (!st) return NULL;
    zi_lora *l = zi_calloc(1, sizeof *l);
    l->path = zi_strdup(path);
    l->dtype = ZI_F32;
    key_group *g = NULL;
    int ng = 0, ok = 0;
    for (int i = 0; i < zi_st_count(st); i++) {
        const zi_tensor *t = zi_st_at(st, i);
        int role;
        char *name = parse_key(t->name, &role);
        if (!name) {
            l->unknown = zi_realloc(l->unknown, (size_t)(l->n_unknown + 1) * sizeof *l->unknown);
            l->unknown[l->n_unknown++] = zi_strdup(t->name);
            continue;
        }
        key_group *kg = group_of(&g, &ng, name);
        if (role == ROLE_DOWN) { kg->down = t; l->dtype = t->dtype; }
        else if (role == ROLE_UP) kg->up = t;
        else kg->alpha = t;
    }
    float meta_alpha = metadata_alpha(st);
    ok = 1;
    for (int i = 0; i < ng && ok; i++) ok = load_group(l, &g[i], meta_alpha) == 0;
    if (ok && l->n == 0) {
        zi_seterr("%s: no LoRA weights found (%d tensors, none named like a LoRA)", path, zi_st_count(st));
        ok = 0;
    }
    for (int i = 0; i < ng; i++) free(g[i].name);
    free(g);
    zi_st_close(st);
    if (!ok) { zi_lora_free(l); return NULL; }
    return l;
}

float zi_lora_scale(const zi_lora_module *m) {
    return isnan(m->alpha) ? 1.0f : m->alpha / (float)m->rank;
}

/* ---------------------------------------------------------------- applying */
struct zi_lora_applied {
    zi_lin *lin;
    zi_lora_adapter *adapter;   /* run-time: the node linked into lin->lora */
    zi_mat orig;                /* merged: the weight before, restored by zi_lora_remove */
    void *owned;                /* merged: the new weight's storage */
};

static zi_lin *find_lin(zi_lin *const *lins, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (!strcmp(lins[i]->name, name)) return lins[i];
    return NULL;
}

/* W += s·B·A, in W's own dtype, into a new buffer (the mmap'd original stays untouched so
 * that removing the LoRA restores it exactly). Row bands bound the float32 scratch. */
static void *merge_weight(const zi_mat *W, const zi_lora_module *m, float s) {
    size_t esz = zi_dtype_size(W->dtype), rows = (size_t)W->rows, cols = (size_t)W->cols;
    uint8_t *dst = zi_malloc(rows * cols * esz);
    const int band = 64;
    float *tmp = zi_malloc((size_t)band * cols * sizeof(float));
    for (size_t r0 = 0; r0 < rows; r0 += band) {
        int nr = (int)(rows - r0 < (size_t)band ? rows - r0 : (size_t)band);
        zi_to_f32(tmp, (const uint8_t *)W->data + r0 * cols * esz, W->dtype, (size_t)nr * cols);
        zi_gemm(0, 0, nr, (int)cols, m->rank, s, m->B + r0 * m->rank, m->rank, m->A, ZI_F32, (int64_t)cols,
                1.0f, tmp, (int64_t)cols);
        zi_from_f32(dst + r0 * cols * esz, tmp, W->dtype, (size_t)nr * cols);
    }
    free(tmp);
    return dst;
}

int zi_lora_apply(zi_lora *l, zi_lin *const *lins, int nlins, float strength, int merge, int verbose) {
    if (l->n_applied) { zi_seterr("%s: LoRA is already applied", l->path); return -1; }
    /* check everything before changing anything */
    int matched = 0;
    for (int i = 0; i < l->n; i++) {
        const zi_lora_module *m = &l->m[i];
        zi_lin *lin = find_lin(lins, nlins, m->name);
        if (!lin) continue;
        if (lin->W.rows != m->out || lin->W.cols != m->in) {
            zi_seterr("%s: %s: LoRA is %dx%d but the model's weight is %lldx%lld (a LoRA for another model?)",
                      l->path, m->name, m->out, m->in, (long long)lin->W.rows, (long long)lin->W.cols);
            return -1;
        }
        if (merge && lin->W.dtype != ZI_F32 && lin->W.dtype != ZI_BF16 && lin->W.dtype != ZI_F16) {
            zi_seterr("%s: %s: cannot merge into a %s weight", l->path, m->name, zi_dtype_name(lin->W.dtype));
            return -1;
        }
        matched++;
    }
    if (!matched) {
        zi_seterr("%s: none of its %d modules matches a layer of the model (first: %s)", l->path, l->n, l->m[0].name);
        return -1;
    }
    l->applied = zi_calloc((size_t)matched, sizeof *l->applied);
    int rank = 0, unmatched = 0;
    const char *first_unmatched = NULL;
    for (int i = 0; i < l->n; i++) {
        const zi_lora_module *m = &l->m[i];
        zi_lin *lin = find_lin(lins, nlins, m->name);
        if (!lin) {
            if (!unmatched++) first_unmatched = m->name;
            continue;
        }
        struct zi_lora_applied *ap = &l->applied[l->n_applied++];
        float s = strength * zi_lora_scale(m);
        ap->lin = lin;
        if (merge) {
            ap->orig = lin->W;
            ap->owned = merge_weight(&lin->W, m, s);
            lin->W.data = ap->owned;
        } else {
            ap->adapter = zi_calloc(1, sizeof *ap->adapter);
            *ap->adapter = (zi_lora_adapter){ .A = m->A, .B = m->B, .rank = m->rank, .scale = s };
            zi_lin_attach(lin, ap->adapter);          /* adapters apply in load order */
        }
        if (m->rank > rank) rank = m->rank;
    }
    if (verbose) {
        /* one line each, however many keys: a LoRA that also trains the text encoder has
         * hundreds of lora_te_* keys */
        if (unmatched)
            fprintf(stderr, "warning: %s: %d modules match no layer of the model (first: %s); ignored\n", l->path,
                    unmatched, first_unmatched);
        if (l->n_unknown)
            fprintf(stderr, "warning: %s: %d keys are no LoRA weight we know (first: %s); ignored\n", l->path,
                    l->n_unknown, l->unknown[0]);
        fprintf(stderr, "lora %s: %d modules, rank %d, strength %g, %s\n", l->path, l->n_applied, rank,
                strength, merge ? "merged" : "applied at run time");
    }
    return l->n_applied;
}

void zi_lora_remove(zi_lora *l) {
    for (int i = l->n_applied - 1; i >= 0; i--) {
        struct zi_lora_applied *ap = &l->applied[i];
        if (ap->adapter) {
            zi_lin_detach(ap->lin, ap->adapter);
            free(ap->adapter);
        } else {
            ap->lin->W = ap->orig;
            free(ap->owned);
        }
    }
    free(l->applied);
    l->applied = NULL;
    l->n_applied = 0;
}

void zi_lora_free(zi_lora *l) {
    if (!l) return;
    zi_lora_remove(l);
    for (int i = 0; i < l->n; i++) { free(l->m[i].name); free(l->m[i].A); free(l->m[i].B); }
    for (int i = 0; i < l->n_unknown; i++) free(l->unknown[i]);
    free(l->m);
    free(l->unknown);
    free(l->path);
    free(l);
}

/* ---------------------------------------------------------------- saving and converting */
/* "layers.3.attention.to_out.0" -> "to_out.0": the --lora-target-modules spelling */
static const char *target_of(const char *name) {
    const char *s = name;
    for (const char *p = name; *p; p++)
        if (*p == '.' && (starts(p + 1, "attention.") || starts(p + 1, "feed_forward.")))
            s = strchr(p + 1, '.') + 1;
    return s;
}

static char *flatten(const char *name) {
    char *f = zi_strdup(name);
    for (char *p = f; *p; p++)
        if (*p == '.') *p = '_';
    return f;
}

typedef enum { SAVE_DIFFSYNTH, SAVE_DIFFUSERS, SAVE_COMFYUI, SAVE_KOHYA } save_format;

/* The keys of module NAME in format f: down (A), up (B), and alpha (NULL: the format has none).
 * All malloc'd. */
static void save_keys(save_format f, const char *name, char **ka, char **kb, char **kalpha) {
    switch (f) {
    case SAVE_DIFFSYNTH:
        *ka = zi_path("%s.lora_A.default.weight", name); *kb = zi_path("%s.lora_B.default.weight", name);
        *kalpha = NULL;
        break;
    case SAVE_DIFFUSERS:
    case SAVE_COMFYUI: {
        const char *pre = f == SAVE_DIFFUSERS ? "transformer." : "diffusion_model.";
        *ka = zi_path("%s%s.lora_A.weight", pre, name); *kb = zi_path("%s%s.lora_B.weight", pre, name);
        *kalpha = zi_path("%s%s.alpha", pre, name);
        break;
    }
    case SAVE_KOHYA: {
        char *flat = flatten(name);
        *ka = zi_path("lora_unet_%s.lora_down.weight", flat); *kb = zi_path("lora_unet_%s.lora_up.weight", flat);
        *kalpha = zi_path("lora_unet_%s.alpha", flat);
        free(flat);
    }
    }
}

/* Adds module m to w: A and B·scale converted to dtype, and an explicit alpha where the
 * format has one (the file's, or rank (scale 1) when it had none). */
static void save_module(zi_stw *w, const zi_lora_module *m, save_format f, zi_dtype dtype, float scale) {
    size_t na = (size_t)m->rank * m->in, nb = (size_t)m->out * m->rank, esz = zi_dtype_size(dtype);
    uint8_t *A = zi_malloc(na * esz), *B = zi_malloc(nb * esz);
    float *Bs = zi_malloc(nb * sizeof(float));
    zi_scale(Bs, m->B, scale, (int64_t)nb);
    zi_from_f32(A, m->A, dtype, na);
    zi_from_f32(B, Bs, dtype, nb);
    char *ka, *kb, *kalpha;
    save_keys(f, m->name, &ka, &kb, &kalpha);
    zi_stw_add(w, ka, dtype, 2, (int64_t[]){m->rank, m->in}, A);
    zi_stw_add(w, kb, dtype, 2, (int64_t[]){m->out, m->rank}, B);
    if (kalpha) {
        float alpha = isnan(m->alpha) ? (float)m->rank : m->alpha;
        zi_stw_add(w, kalpha, ZI_F32, 0, NULL, &alpha);
    }
    free(A); free(B); free(Bs); free(ka); free(kb); free(kalpha);
}

/* Appends the target (to_q, w1, ...) of module NAME to the comma-separated list targets[cap]
 * unless it is there already (or the list is full). */
static void add_target(char *targets, size_t cap, const char *name) {
    const char *t = target_of(name);
    char quoted[128];
    snprintf(quoted, sizeof quoted, ",%s,", t);
    char padded[1030];
    snprintf(padded, sizeof padded, ",%s,", targets);
    if (!strstr(padded, quoted) && strlen(targets) + strlen(t) + 2 < cap)
        snprintf(targets + strlen(targets), cap - strlen(targets), "%s%s", targets[0] ? "," : "", t);
}

int zi_lora_save(const zi_lora *l, const char *path, const char *format, zi_dtype dtype, const char *base_model) {
    save_format f;
    if (!strcmp(format, "diffsynth")) f = SAVE_DIFFSYNTH;
    else if (!strcmp(format, "diffusers")) f = SAVE_DIFFUSERS;
    else if (!strcmp(format, "comfyui")) f = SAVE_COMFYUI;
    else if (!strcmp(format, "kohya")) f = SAVE_KOHYA;
    else { zi_seterr("--to: unknown LoRA format '%s' (diffsynth, diffusers, comfyui, kohya)", format); return -1; }
    if (dtype != ZI_F32 && dtype != ZI_BF16 && dtype != ZI_F16) {
        zi_seterr("%s: LoRA dtype must be F32, BF16 or F16", path);
        return -1;
    }
    /* DiffSynth's layout has no alpha: a scale other than 1 is folded into B, in float32 so
     * that nothing is rounded. */
    int fold = 0;
    if (f == SAVE_DIFFSYNTH)
        for (int i = 0; i < l->n; i++) fold |= zi_lora_scale(&l->m[i]) != 1.0f;
    if (fold) dtype = ZI_F32;

    zi_stw *w = zi_stw_new();
    char targets[1024] = "";
    int maxrank = 0;
    for (int i = 0; i < l->n; i++) {
        const zi_lora_module *m = &l->m[i];
        save_module(w, m, f, dtype, fold ? zi_lora_scale(m) : 1.0f);
        add_target(targets, sizeof targets, m->name);
        if (m->rank > maxrank) maxrank = m->rank;
    }
    char num[64];
    zi_stw_meta(w, "format", "pt");
    snprintf(num, sizeof num, "%d", maxrank);
    zi_stw_meta(w, "rank", num);
    float a0 = fold || isnan(l->m[0].alpha) ? (float)l->m[0].rank : l->m[0].alpha;
    snprintf(num, sizeof num, "%g", a0);
    zi_stw_meta(w, "alpha", num);
    zi_stw_meta(w, "targets", targets);
    if (base_model) zi_stw_meta(w, "base_model", base_model);
    int rc = zi_stw_write(w, path);
    zi_stw_free(w);
    return rc;
}
