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
    dit_case c;
    CHECK(!case_open(&c, "dit-0.safetensors"), "dit-0: %s", zi_err());
    char path[512];
    snprintf(path, sizeof path, "%s/dit-dump.safetensors", zt_tmpdir());
    zi_dump_begin();
    float *out = run1(m, &c);
    int rc = zi_dump_end(path);
    free(out);
    zi_dit_free(m);
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
    CHECK(nblocks == 6, "dit-0 holds %d block outputs", nblocks);
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
    int nt = zi_nthreads();
    zi_threads_init(1);
    float *one = run1(m, &c);
    zi_threads_init(nt > 1 ? nt : 3);
    float *many = run1(m, &c);
    zi_threads_init(nt);
    int same = one && many && !memcmp(one, many, c.n * sizeof(float));
    free(one);
    free(many);
    case_close(&c);
    zi_dit_free(m);
    CHECK(same, "results depend on the thread count");
}

/* Bad sizes and positions past the RoPE tables fail with a message, without computing. */
TEST(dit_bad_inputs) {
    zi_dit *m = zi_dit_load(zt_golden(TINY));
    CHECK(m, "load: %s", zi_err());
    const zi_dit_cfg *cfg = zi_dit_config(m);
    CHECK(cfg->dim == 64 && cfg->n_heads == 2 && cfg->patch == 2 && cfg->adaln_dim == 64 && cfg->cap_feat_dim == 32,
          "config read wrong");
    CHECK(zi_dit_nlin(m) == 6 + 2 * 7 + 4 * 8, "%d Linear layers", zi_dit_nlin(m));
    CHECK(zi_dit_linear(m, "layers.1.feed_forward.w2") && zi_dit_linear(m, "noise_refiner.0.adaLN_modulation.0") &&
          zi_dit_linear(m, "all_final_layer.2-1.linear") && !zi_dit_linear(m, "context_refiner.0.adaLN_modulation.0"),
          "Linear layers by name");
    int C = cfg->in_channels;
    float *x = calloc((size_t)C * 2 * 1026, sizeof(float)), *cap = calloc((size_t)1600 * 32, sizeof(float));
    float *out = calloc((size_t)C * 2 * 1026, sizeof(float)), t = 0.5f;
    const float *xp = x, *cp = cap;
    struct { int h, w, L; const char *what; } bad[] = {
        { 3, 4, 5, "patch" }, { 4, 0, 5, "patch" }, { 4, 4, 0, "caption length" },
        { 4, 4, 1535, "axes_lens" }, { 2, 1026, 5, "axes_lens" }, { 1026, 2, 5, "axes_lens" },
    };
    int ok = 1;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = zi_dit_forward(m, 1, &xp, &bad[i].h, &bad[i].w, &t, &cp, &bad[i].L, &out);
        if (rc != -1 || !strstr(zi_err(), bad[i].what)) {
            fprintf(stderr, "    %dx%d L=%d: rc %d, '%s'\n", bad[i].h, bad[i].w, bad[i].L, rc, zi_err());
            ok = 0;
        }
    }
    /* the largest caption that still fits: padded 1504 + 1 < 1536 */
    int h = 2, w = 2, L = 1504;
    if (zi_dit_forward(m, 1, &xp, &h, &w, &t, &cp, &L, &out)) ok = 0;
    free(x); free(cap); free(out);
    zi_dit_free(m);
    CHECK(ok, "bad inputs accepted");
}

/* A copy of the tiny transformer directory whose config.json has FROM replaced by TO. */
static zi_dit *load_edited(const char *from, const char *to) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/dit-edit", zt_tmpdir());
    int rc = zt_sh(NULL, 0, "rm -rf %s && mkdir -p %s && ln -s \"$PWD\"/test/golden/%s/*.safetensors* %s/ && "
                   "sed 's/%s/%s/' test/golden/%s/config.json > %s/config.json", dir, dir, TINY, dir, from, to, TINY, dir);
    if (rc) return NULL;
    return zi_dit_load(dir);
}

TEST(dit_bad_models) {
    CHECK(!zi_dit_load("/nonexistent/transformer"), "loaded a missing directory");
    zi_dit *m = load_edited("\"n_heads\": 2", "\"n_heads\": 4");
    CHECK(!m && strstr(zi_err(), "config.json") && strstr(zi_err(), "axes_dims"), "n_heads 4: %s", zi_err());
    m = load_edited("\"cap_feat_dim\": 32", "\"cap_feat_dim\": 16");
    CHECK(!m && strstr(zi_err(), "cap_embedder"), "cap_feat_dim 16: %s", zi_err());
    m = load_edited("\"n_layers\": 2", "\"n_layers\": 3");
    CHECK(!m && strstr(zi_err(), "layers.2"), "n_layers 3: %s", zi_err());
    m = load_edited("\"all_f_patch_size\": \\[", "\"all_f_patch_size\": [2, ");
    CHECK(!m && strstr(zi_err(), "config.json"), "f_patch 2: %s", zi_err());
    m = load_edited("x", "x");
    CHECK(m, "unchanged copy: %s", zi_err());
    zi_dit_free(m);
}
