/* The DiT against diffusers (test/golden/dit-*.safetensors, made with the tiny random model
 * test/golden/tiny-zimage/transformer in float32). */
#include "test.h"
#include "../zimage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TINY "tiny-zimage/transformer"

/* The inputs of a golden file: latent [C, 1, h, w], time, caption [L, cap_dim]. */
typedef struct {
    zi_st *st;
    float *x, *cap, t;
    int h, w, L;
    size_t n;       /* elements of x (and of the output) */
} dit_case;

static int case_open(dit_case *c, const char *file) {
    memset(c, 0, sizeof *c);
    if (!(c->st = zi_st_open(zt_golden(file)))) return -1;
    const zi_tensor *x = zi_st_get(c->st, "dit.x"), *t = zi_st_get(c->st, "dit.t"), *cap = zi_st_get(c->st, "dit.cap");
    if (!x || !t || !cap || x->ndim != 4 || cap->ndim != 2) return -1;
    c->x = zi_tensor_f32(x);
    c->cap = zi_tensor_f32(cap);
    float *tt = zi_tensor_f32(t);
    c->t = tt[0];
    free(tt);
    c->h = (int)x->shape[2];
    c->w = (int)x->shape[3];
    c->L = (int)cap->shape[0];
    c->n = (size_t)x->numel;
    return 0;
}

static void case_close(dit_case *c) {
    free(c->x);
    free(c->cap);
    zi_st_close(c->st);
}

/* zi_dit_forward on one item; the result is malloc'd. */
static float *run1(const zi_dit *m, const dit_case *c) {
    float *out = malloc(c->n * sizeof(float));
    const float *x = c->x, *cap = c->cap;
    if (zi_dit_forward(m, 1, &x, &c->h, &c->w, &c->t, &cap, &c->L, &out)) {
        fprintf(stderr, "    %s\n", zi_err());
        free(out);
        return NULL;
    }
    return out;
}

/* max-relative comparison of got against tensor NAME of st */
static int close_to(const char *what, const float *got, const zi_st *st, const char *name, size_t n) {
    const zi_tensor *r = zi_st_get(st, name);
    if (!r || (size_t)r->numel != n) {
        fprintf(stderr, "    %s: reference %s missing or of another size\n", what, name);
        return 0;
    }
    float *ref = zi_tensor_f32(r);
    int ok = zt_close(what, got, ref, n, 1e-4);
    free(ref);
    return ok;
}

TEST(dit_golden) {
    zi_dit *m = zi_dit_load(zt_golden(TINY));
    CHECK(m, "load: %s", zi_err());
    int ok = 1;
    for (int i = 0; i < 4; i++) {
        char file[32], what[32];
        snprintf(file, sizeof file, "dit-%d.safetensors", i);
        snprintf(what, sizeof what, "dit-%d dit.out", i);
        dit_case c;
        if (case_open(&c, file)) { ok = 0; fprintf(stderr, "    %s: %s\n", file, zi_err()); continue; }
        float *out = run1(m, &c);
        if (!out || !close_to(what, out, c.st, "dit.out", c.n)) ok = 0;
        free(out);
        case_close(&c);
    }
    zi_dit_free(m);
    CHECK(ok, "outputs differ from diffusers");
}

/* --dump records every block's output; dit-0 holds diffusers' block outputs. */
TEST(dit_blocks) {
    zi_dit *m = zi_dit_load(zt_golden(TINY));
    CHECK(m, "load: %s", zi_err());
    const zi_dit_cfg *cfg = zi_dit_config(m);
    int want = zt_dit_blocks(cfg);
    dit_case c;
    CHECK(!case_open(&c, "dit-0.safetensors"), "dit-0: %s", zi_err());
    char path[512];
    snprintf(path, sizeof path, "%s/dit-dump.safetensors", zt_tmpdir());
    zi_dump_begin();
    float *out = run1(m, &c);
    int rc = zi_dump_end(path);
    free(out);
    zi_st *d = rc ? NULL : zi_st_open(path);
    int ok = d != NULL, nblocks = 0;
    for (int i = 0; d && i < zi_st_count(c.st); i++) {
        const zi_tensor *ref = zi_st_at(c.st, i);
        if (strncmp(ref->name, "dit.block.", 10)) continue;
        nblocks++;
        const zi_tensor *got = zi_st_get(d, ref->name);
        if (!got || got->ndim != ref->ndim || got->numel != ref->numel ||
            memcmp(got->shape, ref->shape, ref->ndim * sizeof(int64_t))) {
            fprintf(stderr, "    %s: missing or of another shape in the dump\n", ref->name);
            ok = 0;
            continue;
        }
        float *g = zi_tensor_f32(got);
        if (!close_to(ref->name, g, c.st, ref->name, (size_t)ref->numel)) ok = 0;
        free(g);
    }
    zi_st_close(d);
    case_close(&c);
    zi_dit_free(m);
    CHECK(nblocks == want, "dit-0 holds %d block outputs, the model has %d blocks", nblocks, want);
    CHECK(ok, "block outputs differ from diffusers");
}

/* dit-0 and dit-1 (different image and caption sizes) as one batch: diffusers' batch
 * outputs, and bit for bit the single runs. */
TEST(dit_batch) {
    zi_dit *m = zi_dit_load(zt_golden(TINY));
    CHECK(m, "load: %s", zi_err());
    dit_case c[2];
    CHECK(!case_open(&c[0], "dit-0.safetensors") && !case_open(&c[1], "dit-1.safetensors"), "%s", zi_err());
    zi_st *ref = zi_st_open(zt_golden("dit-batch.safetensors"));
    const float *x[2] = { c[0].x, c[1].x }, *cap[2] = { c[0].cap, c[1].cap };
    int h[2] = { c[0].h, c[1].h }, w[2] = { c[0].w, c[1].w }, L[2] = { c[0].L, c[1].L };
    float t[2] = { c[0].t, c[1].t };
    float *out[2] = { malloc(c[0].n * sizeof(float)), malloc(c[1].n * sizeof(float)) };
    int rc = zi_dit_forward(m, 2, x, h, w, t, cap, L, out);
    int ok = rc == 0 && ref;
    if (rc) fprintf(stderr, "    %s\n", zi_err());
    for (int b = 0; ok && b < 2; b++) {
        char what[32], name[32];
        snprintf(what, sizeof what, "batch item %d", b);
        snprintf(name, sizeof name, "dit.out.%d", b);
        if (!close_to(what, out[b], ref, name, c[b].n)) ok = 0;
        float *single = run1(m, &c[b]);
        if (!single || memcmp(single, out[b], c[b].n * sizeof(float))) {
            fprintf(stderr, "    batch item %d differs from its single run\n", b);
            ok = 0;
        }
        free(single);
    }
    for (int b = 0; b < 2; b++) { free(out[b]); case_close(&c[b]); }
    zi_st_close(ref);
    zi_dit_free(m);
    CHECK(ok, "batch results differ");
}

/* Same bits for 1 thread and for several. */
TEST(dit_threads) {
    zi_dit *m = zi_dit_load(zt_golden(TINY));
    CHECK(m, "load: %s", zi_err());
    dit_case c;
    CHECK(!case_open(&c, "dit-3.safetensors"), "dit-3: %s", zi_err());
    int nt = zi_nthreads(), same = 1;
    zi_threads_init(1);
    float *one = run1(m, &c);
    for (int n = 2; n <= 5; n += 3) {
        zi_threads_init(n);
        float *many = run1(m, &c);
        if (!one || !many || memcmp(one, many, c.n * sizeof(float))) same = 0;
        free(many);
    }
    zi_threads_init(nt);
    free(one);
    case_close(&c);
    zi_dit_free(m);
    CHECK(same, "results depend on the thread count");
}

/* Bad sizes and positions past the RoPE tables fail with a message, without computing. */
TEST(dit_bad_inputs) {
    zi_dit *m = zi_dit_load(zt_golden(TINY));
    CHECK(m, "load: %s", zi_err());
    const zi_dit_cfg *cfg = zi_dit_config(m);
    zj *json = zj_load(zt_golden(TINY "/config.json"));
    CHECK(json, "%s", zi_err());
    const zj *patch = zj_at(zj_get(json, "all_patch_size"), 0);
    int dim = (int)zj_num(json, "dim", 0), heads = (int)zj_num(json, "n_heads", 0);
    int read_right = cfg->dim == dim && cfg->n_heads == heads && cfg->head_dim == dim / heads &&
                     patch && cfg->patch == (int)patch->num && cfg->adaln_dim == (dim < 256 ? dim : 256) &&
                     cfg->cap_feat_dim == (int)zj_num(json, "cap_feat_dim", 0) &&
                     cfg->n_layers == (int)zj_num(json, "n_layers", 0) &&
                     cfg->n_refiner_layers == (int)zj_num(json, "n_refiner_layers", 0);
    zj_free(json);
    CHECK(read_right, "config read wrong");
    /* 6 outside the blocks (x embedder, t embedder's two, caption embedder, final layer's two); 7
     * in each context refiner block (attention 4, feed-forward 3); 8 in each modulated block */
    int nref = cfg->n_refiner_layers, nlay = cfg->n_layers;
    CHECK(zi_dit_nlin(m) == 6 + nref * 7 + (nref + nlay) * 8, "%d Linear layers", zi_dit_nlin(m));
    char last[64];
    snprintf(last, sizeof last, "layers.%d.feed_forward.w2", nlay - 1);
    CHECK(zi_dit_linear(m, last) && zi_dit_linear(m, "noise_refiner.0.adaLN_modulation.0") &&
          zi_dit_linear(m, "all_final_layer.2-1.linear") && !zi_dit_linear(m, "context_refiner.0.adaLN_modulation.0"),
          "Linear layers by name");
    /* Sizes from the model: a side not a multiple of the patch, a caption whose padded length
     * (a multiple of 32, as diffusers pads it) reaches axes_lens[0], an image row or column
     * index reaching axes_lens[1] / axes_lens[2]. */
    int C = cfg->in_channels, p = cfg->patch, far_h = p * (cfg->axes_lens[1] + 1), far_w = p * (cfg->axes_lens[2] + 1);
    int Lmax = (cfg->axes_lens[0] - 2) / 32 * 32;  /* the longest caption that fits: padded Lmax + 1 < axes_lens[0] */
    size_t npix = (size_t)p * (far_h > far_w ? far_h : far_w);
    float *x = calloc((size_t)C * npix, sizeof(float)), *cap = calloc((size_t)(Lmax + 32) * cfg->cap_feat_dim, sizeof(float));
    float *out = calloc((size_t)C * npix, sizeof(float)), t = 0.5f;
    const float *xp = x, *cp = cap;
    struct { int h, w, L; const char *what; } bad[] = {
        { p + 1, 2 * p, 5, "patch" }, { 2 * p, 0, 5, "patch" }, { 2 * p, 2 * p, 0, "caption length" },
        { 2 * p, 2 * p, cfg->axes_lens[0] - 1, "axes_lens" }, { p, far_w, 5, "axes_lens" }, { far_h, p, 5, "axes_lens" },
    };
    int ok = 1;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = zi_dit_forward(m, 1, &xp, &bad[i].h, &bad[i].w, &t, &cp, &bad[i].L, &out);
        if (rc != -1 || !strstr(zi_err(), bad[i].what)) {
            fprintf(stderr, "    %dx%d L=%d: rc %d, '%s'\n", bad[i].h, bad[i].w, bad[i].L, rc, zi_err());
            ok = 0;
        }
    }
    int h = p, w = p, L = Lmax;
    if (zi_dit_forward(m, 1, &xp, &h, &w, &t, &cp, &L, &out)) ok = 0;
    free(x); free(cap); free(out);
    zi_dit_free(m);
    CHECK(ok, "bad inputs accepted");
}

/* A copy of the tiny transformer directory whose config.json went through the sed expression */
static zi_dit *load_edited(const char *sed_expr) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/dit-edit", zt_tmpdir());
    int rc = zt_sh(NULL, 0, "rm -rf %s && mkdir -p %s && ln -s \"$PWD\"/test/golden/%s/*.safetensors* %s/ && "
                   "sed '%s' test/golden/%s/config.json > %s/config.json", dir, dir, TINY, dir, sed_expr, TINY, dir);
    if (rc) return NULL;
    return zi_dit_load(dir);
}

/* the sed expression that sets KEY's number to VALUE */
static const char *set_num(const char *key, int value) {
    static char e[128];
    snprintf(e, sizeof e, "s/\"%s\": *[0-9]*/\"%s\": %d/", key, key, value);
    return e;
}

/* Config values that contradict the weights, each named in the error: twice the heads (head_dim
 * no longer the sum of axes_dims), half the caption width, one layer more than stored, a
 * temporal patch list of two. */
TEST(dit_bad_models) {
    CHECK(!zi_dit_load("/nonexistent/transformer"), "loaded a missing directory");
    zi_dit *m = zi_dit_load(zt_golden(TINY));
    CHECK(m, "load: %s", zi_err());
    zi_dit_cfg cfg = *zi_dit_config(m);
    zi_dit_free(m);
    char layer[32];
    snprintf(layer, sizeof layer, "layers.%d", cfg.n_layers);
    m = load_edited(set_num("n_heads", 2 * cfg.n_heads));
    CHECK(!m && strstr(zi_err(), "config.json") && strstr(zi_err(), "axes_dims"), "n_heads %d: %s", 2 * cfg.n_heads, zi_err());
    m = load_edited(set_num("cap_feat_dim", cfg.cap_feat_dim / 2));
    CHECK(!m && strstr(zi_err(), "cap_embedder"), "cap_feat_dim %d: %s", cfg.cap_feat_dim / 2, zi_err());
    m = load_edited(set_num("n_layers", cfg.n_layers + 1));
    CHECK(!m && strstr(zi_err(), layer), "n_layers %d: %s", cfg.n_layers + 1, zi_err());
    m = load_edited("s/\"all_f_patch_size\": \\[/\"all_f_patch_size\": [2, /");
    CHECK(!m && strstr(zi_err(), "config.json"), "f_patch 2: %s", zi_err());
    m = load_edited("");
    CHECK(m, "unchanged copy: %s", zi_err());
    zi_dit_free(m);
}
