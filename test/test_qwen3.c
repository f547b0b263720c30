/* Tests of qwen3.c: the text encoder against transformers (te-N golden files), thread-count
 * invariance, checkpoint variants (no "model." prefix, no head_dim) and bad input. */
#include "test.h"
#include "../zimage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TE_DIR "test/golden/tiny-zimage/text_encoder"

/* te.ids of a golden file as int32 (malloc'd), its length in *L. */
static int32_t *golden_ids(const zi_st *g, int *L) {
    const zi_tensor *t = zi_st_get(g, "te.ids");
    if (!t || t->dtype != ZI_I64 || t->ndim != 1) return NULL;
    int32_t *ids = malloc(t->numel * sizeof *ids);
    for (int64_t i = 0; i < t->numel; i++) ids[i] = (int32_t)((const int64_t *)t->data)[i];
    *L = (int)t->numel;
    return ids;
}

/* Number of te.hidden.K tensors in a file. */
static int count_hidden(const zi_st *f) {
    int n = 0;
    char name[32];
    for (;; n++) {
        snprintf(name, sizeof name, "te.hidden.%d", n);
        if (!zi_st_get(f, name)) return n;
    }
}

/* Encodes te-N's ids with a dump active; compares te.embeds and every te.hidden.K we computed.
 * The golden file holds num_hidden_layers + 1 hidden states (the last one after model.norm):
 * we run one layer less, so we must produce exactly the first num_hidden_layers of them, and
 * te.embeds (from the pipeline) must be hidden state num_hidden_layers - 1. */
static void check_golden(const char *file) {
    zi_st *g = zi_st_open(zt_golden(file));
    CHECK(g, "%s", zi_err());
    int L = 0;
    int32_t *ids = golden_ids(g, &L);
    zi_te *te = zi_te_load(TE_DIR);
    CHECK(ids && te, "%s", zi_err());
    char dump[512];
    snprintf(dump, sizeof dump, "%s/%s.dump", zt_tmpdir(), file);
    zi_dump_begin();
    float *out = zi_te_encode(te, ids, L);
    CHECK(out && zi_dump_end(dump) == 0, "%s", zi_err());

    const zi_tensor *ref = zi_st_get(g, "te.embeds");
    int D = zi_te_dim(te);
    CHECK(ref && ref->numel == (int64_t)L * D, "te.embeds shape");

    zi_st *d = zi_st_open(dump);
    CHECK(d, "%s", zi_err());
    int ng = count_hidden(g), nd = count_hidden(d);
    CHECK(nd == ng - 1, "dumped %d hidden states, golden has %d (we should stop one layer short)", nd, ng);
    char name[32];
    snprintf(name, sizeof name, "te.hidden.%d", nd - 1);
    /* (the reference pipeline ran the prompt padded to 512 tokens: equal up to rounding) */
    CHECK_CLOSE("golden te.embeds vs hidden", zi_st_get(g, name)->data, ref->data, ref->numel, 1e-5);
    for (int k = 0; k < nd; k++) {
        snprintf(name, sizeof name, "te.hidden.%d", k);
        const zi_tensor *a = zi_st_get(d, name), *b = zi_st_get(g, name);
        CHECK(a->numel == b->numel, "%s size", name);
        CHECK_CLOSE(name, a->data, b->data, b->numel, 1e-4);
    }
    CHECK_CLOSE("te.embeds", out, ref->data, ref->numel, 1e-4);
    zi_st_close(d);
    free(out);
    zi_te_free(te);
    free(ids);
    zi_st_close(g);
}

TEST(qwen3_golden_0) { check_golden("te-0.safetensors"); }
TEST(qwen3_golden_1) { check_golden("te-1.safetensors"); }

static float *encode_file(const char *te_dir, const char *file, int *n) {
    zi_st *g = zi_st_open(zt_golden(file));
    int L = 0;
    int32_t *ids = g ? golden_ids(g, &L) : NULL;
    zi_te *te = ids ? zi_te_load(te_dir) : NULL;
    float *out = te ? zi_te_encode(te, ids, L) : NULL;
    if (out) *n = L * zi_te_dim(te);
    zi_te_free(te);
    free(ids);
    zi_st_close(g);
    return out;
}

TEST(qwen3_threads) {
    int n1 = 0, n2 = 0;
    zi_threads_init(1);
    float *a = encode_file(TE_DIR, "te-1.safetensors", &n1);
    zi_threads_init(2);
    float *b = encode_file(TE_DIR, "te-1.safetensors", &n2);
    zi_threads_init(0);
    CHECK(a && b && n1 == n2, "%s", zi_err());
    CHECK(!memcmp(a, b, (size_t)n1 * sizeof(float)), "1 and 2 threads give different bits");
    free(a);
    free(b);
}

/* A copy of the tiny text encoder in the scratch directory, its config edited by a sed script. */
static const char *te_copy(const char *name, const char *sed) {
    static char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", zt_tmpdir(), name);
    if (zt_sh(NULL, 0, "rm -rf %s && cp -r %s %s && sed -i '%s' %s/config.json", dir, TE_DIR, dir, sed, dir))
        return NULL;
    return dir;
}

/* Without head_dim in config.json, q_norm's length gives it; a bare Qwen3Model checkpoint
 * (no "model." prefix, one file) loads too. Both give the same bits as the original. */
TEST(qwen3_variants) {
    int n0 = 0, n1 = 0, n2 = 0;
    float *ref = encode_file(TE_DIR, "te-0.safetensors", &n0);
    const char *dir = te_copy("te_nohd", "/\"head_dim\"/d");
    CHECK(ref && dir, "setup: %s", zi_err());
    float *a = encode_file(dir, "te-0.safetensors", &n1);
    CHECK(a && n1 == n0 && !memcmp(a, ref, n0 * sizeof(float)), "without head_dim: %s", zi_err());

    dir = te_copy("te_bare", "");
    zi_st *src = zi_st_open(dir);
    CHECK(src, "%s", zi_err());
    zi_stw *w = zi_stw_new();
    for (int i = 0; i < zi_st_count(src); i++) {
        const zi_tensor *t = zi_st_at(src, i);
        CHECK(!strncmp(t->name, "model.", 6) || !strcmp(t->name, "lm_head.weight"), "name %s", t->name);
        if (!strncmp(t->name, "model.", 6)) zi_stw_add(w, t->name + 6, t->dtype, t->ndim, t->shape, t->data);
    }
    zi_st_close(src);
    zt_sh(NULL, 0, "rm -f %s/*.safetensors*", dir);
    char path[600];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(zi_stw_write(w, path) == 0, "%s", zi_err());
    zi_stw_free(w);
    float *b = encode_file(dir, "te-0.safetensors", &n2);
    CHECK(b && n2 == n0 && !memcmp(b, ref, n0 * sizeof(float)), "without prefix: %s", zi_err());
    free(ref);
    free(a);
    free(b);
}

/* Loading must fail with a message naming the file; nothing may crash. */
static void expect_load_error(const char *name, const char *sed, const char *needle) {
    const char *dir = te_copy(name, sed);
    CHECK(dir, "setup %s", name);
    zi_te *te = zi_te_load(dir);
    CHECK(!te, "%s: loaded", name);
    CHECK(strstr(zi_err(), needle), "%s: error \"%s\" does not name %s", name, zi_err(), needle);
}

/* An integer of the tiny text encoder's config.json (-1 when absent). */
static int te_cfg(const char *key) {
    zj *cfg = zi_config_load(TE_DIR, "");
    int v = -1;
    if (!cfg || zi_cfg_need_int(cfg, key, &v)) v = -1;
    zj_free(cfg);
    return v;
}

/* The wrong sizes are derived from the model's own (the golden set may hold another tiny
 * encoder): each stays a valid config, so only the weight of that size can catch it. */
TEST(qwen3_bad_input) {
    int hidden = te_cfg("hidden_size"), inter = te_cfg("intermediate_size"), heads = te_cfg("num_attention_heads");
    int kv = te_cfg("num_key_value_heads");
    CHECK(hidden > 0 && inter > 0 && heads > 0 && kv > 0, "config: %s", zi_err());
    /* another key/value head count that still divides the query heads */
    int kv_bad = kv == heads ? 1 : heads;
    CHECK(kv_bad != kv, "no other valid num_key_value_heads for %d heads", heads);
    char sed[256];
    expect_load_error("te_nohidden", "/\"hidden_size\"/d", "config.json");
    snprintf(sed, sizeof sed, "s/\"hidden_size\": %d,/\"hidden_size\": %d,/", hidden, 2 * hidden);
    expect_load_error("te_badhidden", sed, "embed_tokens");
    snprintf(sed, sizeof sed, "s/\"intermediate_size\": %d,/\"intermediate_size\": %d,/", inter, inter + 1);
    expect_load_error("te_badinter", sed, "gate_proj");
    snprintf(sed, sizeof sed, "s/\"num_key_value_heads\": %d,/\"num_key_value_heads\": %d,/", kv, kv_bad);
    expect_load_error("te_badheads", sed, "k_proj");
    expect_load_error("te_badjson", "s/\"vocab_size\"/vocab_size/", "config.json");
    snprintf(sed, sizeof sed, "s/\"num_key_value_heads\": %d,/\"num_key_value_heads\": 1.5,/", kv);
    expect_load_error("te_fractional", sed, "config.json");
    expect_load_error("te_yarn", "s/\"rope_type\": \"default\"/\"rope_type\": \"yarn\"/", "config.json");
    /* a shard cut short: the one holding the final norm (names depend on the shard count) */
    char path[1100], name[256];
    CHECK(!zt_tensor_file(path, sizeof path, TE_DIR, "model.norm.weight"), "index: %s", path);
    const char *shard = strrchr(path, '/') + 1;
    snprintf(name, sizeof name, "%.*s", (int)(strlen(shard) - strlen(".safetensors")), shard);
    const char *dir = te_copy("te_truncated", "");
    CHECK(dir && !zt_sh(NULL, 0, "truncate -s 4000 %s/%s.safetensors", dir, name), "setup");
    CHECK(!zi_te_load(dir) && strstr(zi_err(), name), "truncated shard %s: %s", name, zi_err());
    zi_te *te = zi_te_load("/nonexistent/text_encoder");
    CHECK(!te && strstr(zi_err(), "/nonexistent/text_encoder"), "missing dir: %s", zi_err());

    te = zi_te_load(TE_DIR);
    CHECK(te, "%s", zi_err());
    int32_t ids[3] = { 9707, 151936, 1 };
    CHECK(!zi_te_encode(te, ids, 3) && strstr(zi_err(), "151936"), "id out of range accepted");
    ids[1] = -1;
    CHECK(!zi_te_encode(te, ids, 3), "negative id accepted");
    CHECK(!zi_te_encode(te, ids, 0), "empty sequence accepted");
    zi_te_free(te);
}
