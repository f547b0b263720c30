/* Tests of json.c and safetensors.c: the JSON parser on tricky input, every golden
 * safetensors file (single and sharded), the writer round trip, --dump, configs, and
 * malformed files (each must give a one-line error naming the file, never a crash). */
#include "test.h"
#include "../safetensors.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------- JSON */
static zj *parse(const char *s) { return zj_parse(s, strlen(s), "t.json"); }

TEST(json_values) {
    zj *j = parse(" {\"a\": [1, -0, 1e308, 1E-5, -2.5e+3, 0.125, 123456789012345678901234567890],"
                  " \"b\": {\"c\": true, \"d\": false, \"e\": null}, \"s\": \"x\\\"\\\\\\/\\b\\f\\n\\r\\t\","
                  " \"u\": \"\\u00e9\\u4e2d\\ud83d\\ude00\", \"raw\": \"é中😀\", \"nul\": \"a\\u0000b\","
                  " \"empty\": {}, \"ea\": [], \"dup\": 1, \"dup\": 2 } \n");
    CHECK(j && j->type == ZJ_OBJ, "parse failed: %s", zi_err());
    const zj *a = zj_get(j, "a");
    CHECK(a && a->type == ZJ_ARR && a->n == 7, "array");
    CHECK(zj_at(a, 0)->num == 1 && zj_at(a, 1)->num == 0 && signbit(zj_at(a, 1)->num), "1, -0");
    CHECK(zj_at(a, 2)->num == 1e308 && zj_at(a, 3)->num == 1e-5 && zj_at(a, 4)->num == -2500, "exponents");
    CHECK(zj_at(a, 5)->num == 0.125 && zj_at(a, 6)->num == 123456789012345678901234567890.0, "big numbers");
    CHECK(zj_at(a, 7) == NULL && zj_at(a, -1) == NULL, "zj_at bounds");
    const zj *b = zj_get(j, "b");
    CHECK(zj_bool(b, "c", 0) == 1 && zj_bool(b, "d", 1) == 0 && zj_get(b, "e")->type == ZJ_NULL, "literals");
    CHECK(zj_bool(b, "e", 7) == 7 && zj_num(b, "zz", 3.5) == 3.5 && !zj_str(b, "c", NULL), "defaults");
    CHECK(!strcmp(zj_str(j, "s", ""), "x\"\\/\b\f\n\r\t"), "escapes: '%s'", zj_str(j, "s", ""));
    CHECK(!strcmp(zj_str(j, "u", ""), "\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80"), "\\u escapes and surrogates");
    CHECK(!strcmp(zj_str(j, "raw", ""), zj_str(j, "u", "")), "raw UTF-8");
    const zj *nul = zj_get(j, "nul");
    CHECK(nul->len == 3 && !memcmp(nul->str, "a\0b", 4), "\\u0000 kept with its length");
    CHECK(zj_get(j, "empty")->n == 0 && zj_get(j, "ea")->n == 0, "empty containers");
    CHECK(zj_num(j, "dup", 0) == 2, "the last duplicate wins");
    CHECK(!zj_get(a, "x") && !zj_get(NULL, "x"), "zj_get on no object");
    zj_free(j);

    j = parse("\xEF\xBB\xBF[\"bom\"]");
    CHECK(j && j->n == 1, "a leading BOM is skipped: %s", zi_err());
    zj_free(j);
    j = parse("  42 ");
    CHECK(j && j->type == ZJ_NUM && j->num == 42, "a scalar document");
    zj_free(j);
}

TEST(json_errors) {
    static const char *bad[] = {
        "", "   ", "01", "-01", "1.", ".5", "+1", "-", "1e", "1e+", "0x10", "NaN", "Infinity", "1e400",
        "[1,]", "{\"a\":1,}", "[1 2]", "{\"a\" 1}", "{a:1}", "{\"a\":1", "[", "]", "tru", "nul",
        "\"abc", "\"a\tb\"", "\"a\nb\"", "\"\\x\"", "\"\\u12\"", "\"\\u12G4\"",
        "\"\\ud800\"", "\"\\ud800x\"", "\"\\udc00\"", "\"\\ud800\\u0041\"", "\"\xff\"", "\"\xc0\xaf\"",
        "\"\xed\xa0\x80\"", "\"\xf4\x90\x80\x80\"", "[1] x", "{} {}", "'a'", "[1,,2]", "\xEF\xBB",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        zj *j = parse(bad[i]);
        CHECK(!j, "accepted invalid JSON #%zu: %s", i, bad[i]);
        CHECK(strstr(zi_err(), "t.json: line 1 col ") && !strchr(zi_err(), '\n'), "message: %s", zi_err());
    }
    zj *j = parse("{\n  \"a\": 1,\n  \"b\": 01\n}");
    CHECK(!j && strstr(zi_err(), "line 3 col 9"), "line/col: %s", zi_err());

    /* nesting: 512 levels are fine, 513 are not */
    char deep[2 * 600 + 1];
    for (int depth = 512; depth <= 513; depth++) {
        memset(deep, '[', (size_t)depth);
        memset(deep + depth, ']', (size_t)depth);
        deep[2 * depth] = 0;
        j = parse(deep);
        CHECK((j != NULL) == (depth == 512), "nesting %d: %s", depth, zi_err());
        zj_free(j);
    }
    /* a NUL byte inside the text is no whitespace */
    j = zj_parse("[1]\0", 4, "t.json");
    CHECK(!j, "NUL after the value accepted");
}

TEST(json_tokenizer_speed) {
    const char *path = zt_golden("tiny-zimage/tokenizer/tokenizer.json");
    double t0 = zi_now();
    zj *j = zj_load(path);
    double dt = zi_now() - t0;
    CHECK(j, "%s", zi_err());
    const zj *vocab = zj_get(zj_get(j, "model"), "vocab");
    fprintf(stderr, "    tokenizer.json: %.1f ms, %d vocab entries\n", dt * 1e3, vocab ? vocab->n : -1);
    int nvocab = vocab ? vocab->n : 0;
    zj_free(j);
    CHECK(nvocab > 100000, "vocab");
    CHECK(!zj_load("/nonexistent/x.json") && strstr(zi_err(), "/nonexistent/x.json"), "missing file");
}

/* ---------------------------------------------------------------- golden files */
static int all_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* Every tensor of st: lookup, size bookkeeping, finite float values. Returns the count. */
static int check_all_tensors(const zi_st *st) {
    for (int i = 0; i < zi_st_count(st); i++) {
        const zi_tensor *t = zi_st_at(st, i);
        if (zi_st_get(st, t->name) != t) { fprintf(stderr, "lookup of %s\n", t->name); return -1; }
        int64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) numel *= t->shape[d];
        if (numel != t->numel || t->nbytes != (size_t)numel * zi_dtype_size(t->dtype)) return -1;
        if (i && strcmp(zi_st_at(st, i - 1)->name, t->name) >= 0) return -1;
        if (t->dtype == ZI_F32 || t->dtype == ZI_F16 || t->dtype == ZI_BF16 || t->dtype == ZI_F64) {
            float *f = zi_tensor_f32(t);
            int ok = all_finite(f, t->numel);
            free(f);
            if (!ok) { fprintf(stderr, "non-finite value in %s\n", t->name); return -1; }
        }
    }
    return zi_st_count(st);
}

TEST(st_golden_files) {
    DIR *d = opendir("test/golden");
    CHECK(d, "test/golden missing");
    int files = 0;
    for (struct dirent *e; (e = readdir(d));) {
        size_t n = strlen(e->d_name);
        if (n < 12 || strcmp(e->d_name + n - 12, ".safetensors")) continue;
        char path[512];
        snprintf(path, sizeof path, "test/golden/%s", e->d_name);
        zi_st *st = zi_st_open(path);
        if (!st) closedir(d);
        CHECK(st, "%s", zi_err());
        int count = check_all_tensors(st);
        CHECK(count > 0, "%s: tensor check failed", path);
        CHECK(zi_st_nshards(st) == 1 && zi_st_shard_bytes(st, 0) > 8, "%s: shards", path);
        zi_st_close(st);
        files++;
    }
    closedir(d);
    fprintf(stderr, "    %d golden files read\n", files);
    CHECK(files >= 20, "only %d golden files", files);
}

/* Distinct shard files named by an index's weight_map (its values, in any order). */
static int index_files(const zj *wm) {
    int n = 0;
    for (int i = 0; i < wm->n; i++) {
        int seen = 0;
        for (int k = 0; k < i && !seen; k++) seen = !strcmp(wm->kids[k].str, wm->kids[i].str);
        n += !seen;
    }
    return n;
}

/* The sharded parts open through their directory with as many shards as the index names (the
 * count depends on the model's sizes: the golden set may be another tiny model); the VAE is
 * one file. */
TEST(st_golden_model) {
    static const struct { const char *dir, *index; } parts[] = {
        { "tiny-zimage/transformer", "diffusion_pytorch_model.safetensors.index.json" },
        { "tiny-zimage/text_encoder", "model.safetensors.index.json" },
        { "tiny-zimage/vae", NULL },
    };
    for (int p = 0; p < 3; p++) {
        char dir[512];
        snprintf(dir, sizeof dir, "%s", zt_golden(parts[p].dir));
        zi_st *st = zi_st_open(dir);
        CHECK(st, "%s", zi_err());
        int count = check_all_tensors(st);
        size_t bytes = 0;
        for (int s = 0; s < zi_st_nshards(st); s++) bytes += zi_st_shard_bytes(st, s);
        fprintf(stderr, "    %-26s %4d tensors, %d shards, %zu bytes\n", parts[p].dir, count, zi_st_nshards(st), bytes);
        CHECK(count > 0, "%s: tensor check failed", dir);
        if (parts[p].index) {
            /* the index lists every tensor; opening the index itself gives the same set */
            char idx[600];
            snprintf(idx, sizeof idx, "%s/%s", dir, parts[p].index);
            zj *j = zj_load(idx);
            CHECK(j, "%s", zi_err());
            const zj *wm = zj_get(j, "weight_map");
            int listed = wm->n, files = index_files(wm);
            for (int i = 0; i < wm->n; i++) CHECK(zi_st_get(st, wm->keys[i]), "%s missing", wm->keys[i]);
            zj_free(j);
            CHECK(listed == count, "%d listed, %d found", listed, count);
            CHECK(files > 1 && zi_st_nshards(st) == files, "%s: %d shards, the index names %d", dir,
                  zi_st_nshards(st), files);
            zi_st *st2 = zi_st_open(idx);
            CHECK(st2 && zi_st_count(st2) == count, "opening the index: %s", zi_err());
            zi_st_close(st2);
        } else {
            CHECK(zi_st_nshards(st) == 1, "%s: %d shards", dir, zi_st_nshards(st));
        }
        zi_st_close(st);
    }
}

TEST(st_need_and_mat) {
    zi_st *st = zi_st_open(zt_golden("tiny-zimage/vae"));
    CHECK(st, "%s", zi_err());
    const zi_tensor *t = NULL;
    for (int i = 0; i < zi_st_count(st) && !t; i++)
        if (zi_st_at(st, i)->ndim == 4) t = zi_st_at(st, i);
    CHECK(t, "no conv weight in the VAE");
    CHECK(zi_st_need(st, t->name, 4, t->shape) == t, "need with the right shape: %s", zi_err());
    int64_t wrong[4] = { t->shape[0], t->shape[1], t->shape[2], t->shape[3] + 1 };
    CHECK(!zi_st_need(st, t->name, 4, wrong) && strstr(zi_err(), t->name) && strstr(zi_err(), "expected"),
          "wrong shape: %s", zi_err());
    CHECK(!zi_st_need(st, t->name, 3, t->shape), "wrong ndim");
    CHECK(!zi_st_need(st, "no.such.tensor", 1, wrong) && strstr(zi_err(), "no.such.tensor") &&
          strstr(zi_err(), "vae"), "missing: %s", zi_err());
    zi_mat m = zi_tensor_mat(t);
    CHECK(m.rows == t->shape[0] && m.cols == t->shape[1] * t->shape[2] * t->shape[3] && m.data == t->data &&
          m.dtype == t->dtype, "conv weight as a matrix");
    CHECK(!zi_st_get(st, "") && !zi_st_get(st, "x"), "absent names");
    zi_st_close(st);
}

/* ---------------------------------------------------------------- writer */
static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*len + 1);
    if (fread(b, 1, *len, f) != *len) { free(b); b = NULL; }
    fclose(f);
    return b;
}

TEST(st_writer_roundtrip) {
    float a[6] = { 1, -2, 3.5f, 1e-30f, -0.0f, 7 };
    uint16_t h[3] = { 0x3c00, 0xc000, 0x7bff };            /* f16: 1, -2, 65504 */
    uint16_t bf[2] = { 0x3f80, 0xc0a0 };                   /* bf16: 1, -5 */
    int64_t ids[3] = { -1, 0, 1ll << 40 };
    uint8_t u[5] = { 1, 2, 3, 4, 5 };
    int64_t s23[2] = { 2, 3 }, s3[1] = { 3 }, s2[1] = { 2 }, s5[1] = { 5 };
    zi_stw *w = zi_stw_new();
    zi_stw_add(w, "z.u8", ZI_U8, 1, s5, u);
    zi_stw_add_f32(w, "b.f32", 2, s23, a);
    zi_stw_add(w, "a.f16", ZI_F16, 1, s3, h);
    zi_stw_add(w, "c.bf16", ZI_BF16, 1, s2, bf);
    zi_stw_add(w, "ids", ZI_I64, 1, s3, ids);
    zi_stw_add_f32(w, "scalar", 0, NULL, a + 2);
    zi_stw_meta(w, "format", "pt");
    zi_stw_meta(w, "note", "quote \" backslash \\ newline \n tab \t é");
    char path[512];
    snprintf(path, sizeof path, "%s/rt.safetensors", zt_tmpdir());
    CHECK(zi_stw_write(w, path) == 0, "%s", zi_err());
    zi_stw_free(w);
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(access(tmp, F_OK) != 0, "the temporary file is left behind");

    /* layout: header length a multiple of 8, compact JSON, data in the Python library's
     * order (larger dtypes first, then by name) */
    size_t len;
    unsigned char *raw = read_file(path, &len);
    CHECK(raw, "read back");
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | raw[i];
    CHECK(n % 8 == 0 && 8 + n <= len, "header length %llu", (unsigned long long)n);
    const char *hdr = (const char *)raw + 8;
    CHECK(!memcmp(hdr, "{\"__metadata__\":{\"format\":\"pt\",", 31), "header starts: %.40s", hdr);
    const char *order[] = { "\"ids\":{\"dtype\":\"I64\",\"shape\":[3],\"data_offsets\":[0,24]}",
                            "\"b.f32\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[24,48]}",
                            "\"scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[48,52]}",
                            "\"c.bf16\"", "\"a.f16\"", "\"z.u8\"" };
    const char *prev = hdr;
    for (int i = 0; i < 6; i++) {
        const char *at = strstr(hdr, order[i]);
        CHECK(at && at > prev && at < hdr + n, "%s not in order", order[i]);
        prev = at;
    }
    CHECK(len == 8 + n + 24 + 24 + 4 + 4 + 6 + 5, "file size %zu", len);
    free(raw);

    zi_st *st = zi_st_open(path);
    CHECK(st, "%s", zi_err());
    CHECK(zi_st_count(st) == 6, "count %d", zi_st_count(st));
    CHECK(!strcmp(zi_st_meta(st, "format"), "pt"), "metadata");
    CHECK(!strcmp(zi_st_meta(st, "note"), "quote \" backslash \\ newline \n tab \t é"), "metadata escapes");
    CHECK(!zi_st_meta(st, "absent"), "absent metadata");
    const zi_tensor *t = zi_st_need(st, "b.f32", 2, s23);
    CHECK(t && !memcmp(t->data, a, sizeof a), "f32 data: %s", zi_err());
    CHECK(((uintptr_t)t->data & 7) == 0, "data area aligned");
    t = zi_st_get(st, "a.f16");
    float *f = zi_tensor_f32(t);
    CHECK(f[0] == 1 && f[1] == -2 && f[2] == 65504, "f16 to f32: %g %g %g", f[0], f[1], f[2]);
    free(f);
    f = zi_tensor_f32(zi_st_get(st, "c.bf16"));
    CHECK(f[0] == 1 && f[1] == -5, "bf16 to f32");
    free(f);
    t = zi_st_get(st, "ids");
    CHECK(t->dtype == ZI_I64 && !memcmp(t->data, ids, sizeof ids), "i64 data");
    CHECK(!zi_tensor_f32(t) && strstr(zi_err(), "ids"), "integers are no float tensor");
    t = zi_st_get(st, "scalar");
    CHECK(t->ndim == 0 && t->numel == 1 && *(const float *)t->data == 3.5f, "scalar");
    CHECK(!memcmp(zi_st_get(st, "z.u8")->data, u, 5), "u8 data");
    zi_st_close(st);

    /* no metadata, no tensors: still a valid file */
    w = zi_stw_new();
    CHECK(zi_stw_write(w, path) == 0, "%s", zi_err());
    zi_stw_free(w);
    st = zi_st_open(path);
    CHECK(st && zi_st_count(st) == 0 && !zi_st_meta(st, "format"), "empty file: %s", zi_err());
    zi_st_close(st);
}

/* Re-writing every golden file (written by the Python library) with our writer must give
 * the same bytes: header layout, tensor order, escapes, padding. */
TEST(st_writer_matches_python) {
    /* a text encoder shard too: the one holding model.norm.weight (shard names depend on the
     * model's size), as the index says */
    char path[1100], te_shard[512];
    CHECK(!zt_tensor_file(path, sizeof path, zt_golden("tiny-zimage/text_encoder"), "model.norm.weight"),
          "text encoder index: %s", path);
    snprintf(te_shard, sizeof te_shard, "tiny-zimage/text_encoder/%s", strrchr(path, '/') + 1);
    const char *names[] = {
        "dit-lora1.safetensors", "dit-batch.safetensors", "lora-a-diffsynth.safetensors", "pipe-0.safetensors",
        "rng.safetensors", "te-0.safetensors", "train-0.safetensors", "pipe-lora.safetensors",
        te_shard,
        "tiny-zimage/vae/diffusion_pytorch_model.safetensors",
    };
    char out[512];
    snprintf(out, sizeof out, "%s/rewrite.safetensors", zt_tmpdir());
    for (size_t f = 0; f < sizeof names / sizeof *names; f++) {
        char in[512];
        snprintf(in, sizeof in, "%s", zt_golden(names[f]));
        zi_st *st = zi_st_open(in);
        CHECK(st, "%s", zi_err());
        zj *hdr = NULL;
        size_t len_in, len_out;
        unsigned char *a = read_file(in, &len_in);
        uint64_t n = 0;
        for (int i = 7; i >= 0; i--) n = n << 8 | a[i];
        hdr = zj_parse((const char *)a + 8, (size_t)n, in);
        const zj *meta = zj_get(hdr, "__metadata__");
        zi_stw *w = zi_stw_new();
        for (int i = 0; meta && i < meta->n; i++) zi_stw_meta(w, meta->keys[i], meta->kids[i].str);
        for (int i = 0; i < zi_st_count(st); i++) {
            const zi_tensor *t = zi_st_at(st, i);
            zi_stw_add(w, t->name, t->dtype, t->ndim, t->shape, t->data);
        }
        int rc = zi_stw_write(w, out);
        zi_stw_free(w);
        zj_free(hdr);
        zi_st_close(st);
        unsigned char *b = rc ? NULL : read_file(out, &len_out);
        int same = b && len_in == len_out && !memcmp(a, b, len_in);
        if (!same && b) fprintf(stderr, "    ours:   %.200s\n    theirs: %.200s\n", b + 8, a + 8);
        free(a);
        free(b);
        CHECK(same, "%s: the rewritten file differs", names[f]);
    }
}

TEST(st_writer_errors) {
    zi_stw *w = zi_stw_new();
    float x = 1;
    int64_t s1[1] = { 1 };
    zi_stw_add_f32(w, "x", 1, s1, &x);
    const char *path = "/nonexistent-dir/out.safetensors";
    CHECK(zi_stw_write(w, path) == -1 && strstr(zi_err(), "/nonexistent-dir/out.safetensors"),
          "unwritable: %s", zi_err());
    zi_stw_free(w);
}

TEST(st_dump) {
    CHECK(!zi_dump_active(), "no dump active at start");
    float x[4] = { 1, 2, 3, 4 };
    int64_t shape[2] = { 2, 2 }, ids[3] = { 7, 8, 9 };
    zi_dump("ignored", 2, shape, x);                    /* no dump active: nothing happens */
    zi_dump_begin();
    CHECK(zi_dump_active(), "active");
    zi_dump("dit.x", 2, shape, x);
    x[0] = 10;
    zi_dump("te.hidden.1", 2, shape, x);
    zi_dump_i64("te.ids", 3, ids);
    char path[512];
    snprintf(path, sizeof path, "%s/dump.safetensors", zt_tmpdir());
    CHECK(zi_dump_end(path) == 0, "%s", zi_err());
    CHECK(!zi_dump_active(), "inactive after the end");
    zi_st *st = zi_st_open(path);
    CHECK(st && zi_st_count(st) == 3, "dump file: %s", zi_err());
    const zi_tensor *t = zi_st_need(st, "dit.x", 2, shape);
    CHECK(t && ((const float *)t->data)[0] == 1, "the dump keeps a copy");
    CHECK(((const float *)zi_st_get(st, "te.hidden.1")->data)[0] == 10, "second tensor");
    CHECK(!memcmp(zi_st_get(st, "te.ids")->data, ids, sizeof ids), "i64 ids");
    CHECK(!zi_st_get(st, "ignored"), "dumped while inactive");
    zi_st_close(st);
}

/* ---------------------------------------------------------------- configs */
/* Number i of the value of "key" in JSON text, read without the JSON parser (the first match
 * of "key":, then numbers separated by blanks, brackets or commas): the reference the config
 * helpers are checked against, whatever sizes the golden model has. NAN when not there. */
static double raw_num(const char *text, const char *key, int i) {
    char pat[128];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = text ? strstr(text, pat) : NULL;
    if (!p) return NAN;
    p += strlen(pat);
    for (int k = 0;; k++) {
        p += strspn(p, " \n[,");
        char *end;
        double v = strtod(p, &end);
        if (end == p) return NAN;
        if (k == i) return v;
        p = end;
    }
}

TEST(st_configs) {
    const char *dir = zt_golden("tiny-zimage");
    char d[256];
    snprintf(d, sizeof d, "%s", dir);
    size_t len;
    char *text = (char *)read_file(zt_golden("tiny-zimage/transformer/config.json"), &len);
    CHECK(text, "transformer/config.json unreadable");
    text[len] = 0;
    double raw_dim = raw_num(text, "dim", 0), raw_theta = raw_num(text, "rope_theta", 0);
    double raw_axes[3] = { raw_num(text, "axes_dims", 0), raw_num(text, "axes_dims", 1), raw_num(text, "axes_dims", 2) };
    free(text);
    zj *c = zi_config_load(d, "transformer");
    CHECK(c, "%s", zi_err());
    int dim = 0, axes[8];
    CHECK(zi_cfg_need_int(c, "dim", &dim) == 0 && dim == raw_dim, "dim %d, the file says %g", dim, raw_dim);
    CHECK(zi_cfg_num(c, "rope_theta", 0) == raw_theta && zi_cfg_num(c, "qk_norm", 0) == 1, "numbers");
    CHECK(zi_cfg_num(c, "siglip_feat_dim", -1) == -1, "null gives the default");
    CHECK(zi_cfg_ints(c, "axes_dims", axes, 8) == 3 && axes[0] == raw_axes[0] && axes[1] == raw_axes[1] &&
          axes[2] == raw_axes[2], "axes_dims");
    CHECK(zi_cfg_ints(c, "axes_dims", axes, 2) == -1, "too many values");
    CHECK(zi_cfg_need_int(c, "norm_eps", &dim) == -1, "1e-5 is no integer");
    CHECK(zi_cfg_need_int(c, "no_such_key", &dim) == -1 && strstr(zi_err(), "transformer/config.json") &&
          strstr(zi_err(), "no_such_key"), "missing key: %s", zi_err());
    zj_free(c);

    c = zi_config_load(d, "text_encoder");
    CHECK(c, "%s", zi_err());
    CHECK(zi_cfg_num(c, "rope_theta", 0) == 1e6, "rope_theta from rope_parameters");
    CHECK(zi_cfg_num(c, "rms_norm_eps", 0) == 1e-6, "rms_norm_eps");
    const zj *rp = zj_get(c, "rope_parameters");
    CHECK(zi_cfg_need_int(rp, "nope", &dim) == -1 && strstr(zi_err(), "text_encoder/config.json"),
          "a nested object names its file: %s", zi_err());
    zj_free(c);

    c = zi_config_load(d, "scheduler");
    CHECK(c && zi_cfg_num(c, "shift", 0) == 3.0, "scheduler_config.json: %s", zi_err());
    zj_free(c);
    c = zi_config_load(d, NULL);
    CHECK(c && !strcmp(zj_str(c, "_class_name", ""), "ZImagePipeline"), "model_index.json: %s", zi_err());
    zj_free(c);
    c = zi_config_load(d, "transformer/..");
    CHECK(!c, "a directory without config");
    CHECK(!zi_config_load(d, "nope") && strstr(zi_err(), "nope"), "missing: %s", zi_err());

    char *p = zi_path("%s/%d-%s", "a", 42, "b");
    CHECK(!strcmp(p, "a/42-b"), "zi_path");
    free(p);
}

/* ---------------------------------------------------------------- malformed files */
/* Writes a safetensors file: header length n_claimed (or the real one when 0), the header
 * text, then data_len zero bytes. */
static void write_st(const char *path, const char *header, uint64_t n_claimed, size_t data_len) {
    FILE *f = fopen(path, "wb");
    uint64_t n = n_claimed ? n_claimed : strlen(header);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)(n >> (8 * i));
    fwrite(len8, 1, 8, f);
    fputs(header, f);
    for (size_t i = 0; i < data_len; i++) fputc(0, f);
    fclose(f);
}

/* zi_st_open(path) must fail with a one-line message holding path and `what`. */
static int open_fails(const char *path, const char *what) {
    zi_st *st = zi_st_open(path);
    if (st) { zi_st_close(st); fprintf(stderr, "    %s opened\n", path); return 0; }
    const char *e = zi_err();
    int ok = strstr(e, path) && strstr(e, what) && !strchr(e, '\n');
    fprintf(stderr, "    %s %s\n", ok ? "ok:" : "BAD MESSAGE:", e);
    return ok;
}

TEST(st_bad_files) {
    static const struct { const char *name, *header, *what; uint64_t n; size_t data; } cases[] = {
        { "empty", "", "unexpected end", 0, 0 },
        { "past", "{}", "past the end", 1000, 0 },
        { "notjson", "{\"a\": {\"dtype\": \"F32\",", "line 1 col", 0, 64 },
        { "notobj", "[1, 2]", "not a JSON object", 0, 0 },
        { "range", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", "outside", 0, 8 },
        { "backwards", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", "outside", 0, 8 },
        { "overlap", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                     "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", "overlap", 0, 16 },
        { "overlap2", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                      "\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", "overlap", 0, 16 },
        { "dtype", "{\"a\":{\"dtype\":\"F31\",\"shape\":[1],\"data_offsets\":[0,4]}}", "unknown dtype", 0, 8 },
        { "size", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", "need 12", 0, 8 },
        { "overflow", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,0]}}",
          "too large", 0, 8 },
        /* 2^61 elements of 8 bytes: the byte count wraps around to 0 in 64 bits */
        { "overflow2", "{\"a\":{\"dtype\":\"F64\",\"shape\":[2147483648,1073741824],\"data_offsets\":[0,0]}}",
          "too large", 0, 8 },
        { "negdim", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", "bad shape", 0, 8 },
        { "fracoff", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0.5,4]}}", "data_offsets", 0, 8 },
        { "nooffs", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", "missing", 0, 8 },
        { "meta", "{\"__metadata__\":{\"a\":1}}", "__metadata__", 0, 0 },
        { "ndim", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}",
          "dimensions", 0, 8 },
    };
    char path[512];
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(path, sizeof path, "%s/bad-%s.safetensors", zt_tmpdir(), cases[i].name);
        write_st(path, cases[i].header, cases[i].n, cases[i].data);
        CHECK(open_fails(path, cases[i].what), "%s", cases[i].name);
    }
    snprintf(path, sizeof path, "%s/bad-short.safetensors", zt_tmpdir());
    FILE *f = fopen(path, "wb");
    fputs("\x10\0\0", f);
    fclose(f);
    CHECK(open_fails(path, "truncated"), "a file shorter than 8 bytes");
    /* a truncated copy of a real file */
    size_t len;
    unsigned char *raw = read_file(zt_golden("rng.safetensors"), &len);
    CHECK(raw, "rng.safetensors");
    snprintf(path, sizeof path, "%s/bad-truncated.safetensors", zt_tmpdir());
    f = fopen(path, "wb");
    fwrite(raw, 1, len - 100, f);
    fclose(f);
    free(raw);
    CHECK(open_fails(path, "outside"), "truncated file");
    snprintf(path, sizeof path, "%s/no-such-file.safetensors", zt_tmpdir());
    CHECK(open_fails(path, "No such file"), "missing file");
}

TEST(st_bad_index) {
    char dir[512], path[600], shard[700];
    snprintf(dir, sizeof dir, "%s/sharded", zt_tmpdir());
    mkdir(dir, 0755);
    float x[2] = { 1, 2 };
    int64_t s2[1] = { 2 };
    zi_stw *w = zi_stw_new();
    zi_stw_add_f32(w, "a", 1, s2, x);
    snprintf(shard, sizeof shard, "%s/m-00001-of-00002.safetensors", dir);
    CHECK(zi_stw_write(w, shard) == 0, "%s", zi_err());
    zi_stw_free(w);

    snprintf(path, sizeof path, "%s/m.safetensors.index.json", dir);
    FILE *f = fopen(path, "w");
    fputs("{\"metadata\": {}, \"weight_map\": {\"a\": \"m-00001-of-00002.safetensors\","
          " \"b\": \"m-00002-of-00002.safetensors\"}}", f);
    fclose(f);
    CHECK(open_fails(path, "m-00002-of-00002.safetensors"), "missing shard");
    CHECK(open_fails(dir, "m-00002-of-00002.safetensors"), "missing shard via the directory");

    /* the second shard exists but lacks "b" */
    w = zi_stw_new();
    zi_stw_add_f32(w, "c", 1, s2, x);
    snprintf(shard, sizeof shard, "%s/m-00002-of-00002.safetensors", dir);
    CHECK(zi_stw_write(w, shard) == 0, "%s", zi_err());
    CHECK(open_fails(path, "'b' is not in its shard"), "tensor not in its shard");

    /* now complete: b in shard 2 */
    zi_stw_add_f32(w, "b", 1, s2, x);
    CHECK(zi_stw_write(w, shard) == 0, "%s", zi_err());
    zi_stw_free(w);
    zi_st *st = zi_st_open(dir);
    CHECK(st && zi_st_count(st) == 3 && zi_st_nshards(st) == 2, "complete index: %s", zi_err());
    CHECK(zi_st_get(st, "a")->shard == 0 && zi_st_get(st, "b")->shard == 1, "shard numbers");
    zi_st_close(st);

    /* the same tensor in two shards */
    w = zi_stw_new();
    zi_stw_add_f32(w, "a", 1, s2, x);
    zi_stw_add_f32(w, "b", 1, s2, x);
    CHECK(zi_stw_write(w, shard) == 0, "%s", zi_err());
    zi_stw_free(w);
    CHECK(open_fails(path, "twice"), "duplicate tensor across shards");

    /* index that is not JSON; a directory with two candidate files */
    f = fopen(path, "w");
    fputs("{\"weight_map\": ", f);
    fclose(f);
    CHECK(open_fails(path, "unexpected end"), "broken index");
    unlink(path);
    CHECK(open_fails(dir, "2 .safetensors files"), "ambiguous directory");
}

/* A header without the alignment padding (older writers): the data is still exposed
 * 8-byte aligned and correct. A tensor at an offset not aligned to its dtype is refused. */
TEST(st_unpadded_header) {
    char path[512];
    snprintf(path, sizeof path, "%s/unpadded.safetensors", zt_tmpdir());
    const char *h = "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";   /* 55 bytes */
    FILE *f = fopen(path, "wb");
    uint64_t n = strlen(h);
    for (int i = 0; i < 8; i++) fputc((int)(n >> (8 * i) & 0xFF), f);
    fputs(h, f);
    float x[2] = { 1.5f, -3 };
    fwrite(x, sizeof x, 1, f);
    fclose(f);
    CHECK(n % 8, "the test header must be unpadded");
    zi_st *st = zi_st_open(path);
    CHECK(st, "%s", zi_err());
    const zi_tensor *t = zi_st_get(st, "x");
    CHECK(t && ((uintptr_t)t->data & 7) == 0 && !memcmp(t->data, x, sizeof x), "aligned copy");
    zi_st_close(st);

    snprintf(path, sizeof path, "%s/misaligned.safetensors", zt_tmpdir());
    write_st(path, "{\"b\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                   "\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[1,5]}}", 0, 8);
    CHECK(open_fails(path, "not aligned"), "misaligned tensor");
}

/* Random damage to a real header (deterministic): every open either succeeds with sane
 * tensors or fails with a message; never a crash or an out-of-bounds read (run it under
 * `make debug`). */
TEST(st_fuzz_headers) {
    size_t len;
    unsigned char *orig = read_file(zt_golden("dit-lora1.safetensors"), &len);
    CHECK(orig, "dit-lora1.safetensors");
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | orig[i];
    unsigned char *buf = malloc(len);
    char path[512];
    snprintf(path, sizeof path, "%s/fuzz.safetensors", zt_tmpdir());
    static const char alphabet[] = "{}[]\",:0123456789-eE.\\u ";
    uint64_t rng = 12345;
    int opened = 0, failed = 0;
    for (int iter = 0; iter < 400; iter++) {
        memcpy(buf, orig, len);
        size_t flen = len;
        int edits = 1 + iter % 3;
        for (int e = 0; e < edits; e++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            size_t at = (size_t)(rng >> 33) % (8 + n);
            int r = (int)(rng >> 20 & 0xFF);
            buf[at] = (r & 1) ? (unsigned char)alphabet[(r >> 1) % (sizeof alphabet - 1)] : (unsigned char)r;
        }
        if (iter % 17 == 0) flen = (size_t)(rng >> 40) % len;
        FILE *f = fopen(path, "wb");
        fwrite(buf, 1, flen, f);
        fclose(f);
        zi_st *st = zi_st_open(path);
        if (st) {
            opened++;
            for (int i = 0; i < zi_st_count(st); i++) {
                const zi_tensor *t = zi_st_at(st, i);
                const unsigned char *p = t->data;
                unsigned sum = 0;
                for (size_t b = 0; b < t->nbytes; b++) sum += p[b];      /* touch every byte */
                (void)sum;
            }
            zi_st_close(st);
        } else {
            failed++;
            CHECK(!strchr(zi_err(), '\n') && strstr(zi_err(), path), "message: %s", zi_err());
        }
    }
    fprintf(stderr, "    400 damaged files: %d opened, %d refused\n", opened, failed);
    free(buf);
    free(orig);
}

/* The same for JSON text. */
TEST(json_fuzz) {
    size_t len;
    unsigned char *orig = read_file(zt_golden("tiny-zimage/tokenizer/tokenizer_config.json"), &len);
    CHECK(orig, "tokenizer_config.json");
    unsigned char *buf = malloc(len);
    uint64_t rng = 777;
    int ok = 0;
    for (int iter = 0; iter < 400; iter++) {
        memcpy(buf, orig, len);
        for (int e = 0; e < 1 + iter % 2; e++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            buf[(rng >> 33) % len] = (unsigned char)(rng >> 24);
        }
        size_t flen = iter % 13 == 0 ? (size_t)(rng >> 40) % len : len;
        zj *j = zj_parse((const char *)buf, flen, "fuzz.json");
        ok += j != NULL;
        if (!j) CHECK(strstr(zi_err(), "fuzz.json: line "), "message: %s", zi_err());
        zj_free(j);
    }
    fprintf(stderr, "    400 damaged texts: %d still valid\n", ok);
    free(buf);
    free(orig);
}

/* The dtype conversions the reader relies on (zi_tensor_f32). */
TEST(st_dtype_conversion) {
    /* every f16 value against its definition, and back */
    for (uint32_t h = 0; h < 65536; h++) {
        int e = h >> 10 & 31, m = h & 1023;
        double want = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
        if (h & 0x8000) want = -want;
        float got = zi_f16_to_f32((uint16_t)h);
        if (e == 31) {
            CHECK(m ? isnan(got) : isinf(got), "f16 %04x special", h);
            if (!m) CHECK(zi_f32_to_f16(got) == h, "inf back");
            continue;
        }
        CHECK(got == (float)want, "f16 %04x: %g, want %g", h, got, want);
        CHECK(zi_f32_to_f16(got) == h, "f16 %04x round trip gives %04x", h, zi_f32_to_f16(got));
    }
    /* rounding to nearest even */
    CHECK(zi_f32_to_f16(1.0f + 0x1p-11f) == 0x3c00 && zi_f32_to_f16(1.0f + 3 * 0x1p-11f) == 0x3c02, "f16 ties");
    CHECK(zi_f32_to_f16(65520.0f) == 0x7c00 && zi_f32_to_f16(65519.0f) == 0x7bff, "f16 overflow");
    CHECK(zi_f32_to_f16(0x1p-25f) == 0 && zi_f32_to_f16(0x1.8p-25f) == 1 && zi_f32_to_f16(0x1.8p-24f) == 2, "f16 tiny");
    CHECK(zi_f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80 && zi_f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82, "bf16 ties");
    CHECK(isnan(zi_bf16_to_f32(zi_f32_to_bf16(NAN))), "bf16 NaN");
    /* fp8 and integers through zi_to_f32 */
    uint8_t f8[4] = { 0x38, 0xC0, 0x01, 0x7F };     /* E4M3: 1, -2, 2^-9, NaN */
    float out[4];
    zi_to_f32(out, f8, ZI_F8_E4M3, 4);
    CHECK(out[0] == 1 && out[1] == -2 && out[2] == 0x1p-9f && isnan(out[3]), "e4m3");
    uint8_t e5[2] = { 0x3C, 0x7B };                 /* E5M2: 1, 57344 */
    zi_to_f32(out, e5, ZI_F8_E5M2, 2);
    CHECK(out[0] == 1 && out[1] == 57344, "e5m2");
    int16_t i16[2] = { -7, 300 };
    zi_to_f32(out, i16, ZI_I16, 2);
    CHECK(out[0] == -7 && out[1] == 300, "i16");
    double f64[1] = { 0.1 };
    zi_to_f32(out, f64, ZI_F64, 1);
    CHECK(out[0] == 0.1f, "f64");
}

/* zi_st_close gives the mapping back: the file no longer shows in /proc/self/maps. */
static int mapped(const char *name) {
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return -1;
    char line[4096];
    int found = 0;
    while (fgets(line, sizeof line, f)) found |= strstr(line, name) != NULL;
    fclose(f);
    return found;
}

TEST(st_close_unmaps) {
    const char *name = "tiny-zimage/vae/diffusion_pytorch_model.safetensors";
    zi_st *st = zi_st_open(zt_golden("tiny-zimage/vae"));
    CHECK(st, "%s", zi_err());
    int before = mapped(name);
    if (before < 0) return;     /* no /proc */
    CHECK(before == 1, "the file is not mapped while open");
    zi_st_close(st);
    CHECK(mapped(name) == 0, "the file is still mapped after zi_st_close");
}
