/* Tests of convert.c: `sample --convert` on an fp32 copy of the tiny transformer gives back the
 * bf16 checkpoint bit for bit (bf16 -> f32 -> bf16 is exact), shards, index and config included. */
#include "test.h"
#include "../zimage.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* dst: every shard of the tiny transformer (each *.safetensors file of src: their number and
 * names depend on the model's size) with its tensors widened to float32; the index and the
 * config copied. */
static int write_fp32_copy(const char *src, const char *dst) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "mkdir -p %s && cp %s/config.json %s/*.index.json %s/", dst, src, src, dst);
    if (system(cmd)) return -1;
    DIR *d = opendir(src);
    if (!d) return -1;
    int rc = 0;
    for (struct dirent *e; !rc && (e = readdir(d));) {
        size_t n = strlen(e->d_name);
        if (n < 12 || strcmp(e->d_name + n - 12, ".safetensors")) continue;
        char *in = zi_path("%s/%s", src, e->d_name), *out = zi_path("%s/%s", dst, e->d_name);
        zi_st *st = zi_st_open(in);
        zi_stw *w = zi_stw_new();
        for (int i = 0; st && i < zi_st_count(st); i++) {
            const zi_tensor *t = zi_st_at(st, i);
            float *f = zi_tensor_f32(t);
            zi_stw_add_f32(w, t->name, t->ndim, t->shape, f);
            free(f);
        }
        rc = !st || zi_stw_write(w, out);
        zi_stw_free(w);
        zi_st_close(st);
        free(in); free(out);
    }
    closedir(d);
    return rc ? -1 : 0;
}

TEST(convert_bf16) {
    const char *src = zt_golden("tiny-zimage/transformer");
    char *f32 = zi_path("%s/conv-f32", zt_tmpdir()), *bf = zi_path("%s/conv-bf16", zt_tmpdir());
    CHECK(!write_fp32_copy(src, f32), "fp32 copy: %s", zi_err());
    char out[4096];
    int rc = zt_sh(out, sizeof out, "%s/sample --convert %s %s", zt_bin(), f32, bf);
    CHECK(rc == 0, "sample --convert failed: %s", out);
    zi_st *a = zi_st_open(src), *b = zi_st_open(bf);
    CHECK(a && b, "%s", zi_err());
    int bad = 0, n = zi_st_count(a);
    for (int i = 0; i < n; i++) {
        const zi_tensor *ta = zi_st_at(a, i), *tb = zi_st_get(b, ta->name);
        if (!tb || tb->dtype != ZI_BF16 || tb->nbytes != ta->nbytes || memcmp(ta->data, tb->data, ta->nbytes)) bad++;
    }
    int nb = zi_st_count(b), shards = zi_st_nshards(b), want = zi_st_nshards(a);
    zi_st_close(a);
    zi_st_close(b);
    CHECK(bad == 0 && nb == n && shards == want, "%d of %d tensors differ (%d tensors, %d shards, want %d)", bad, n,
          nb, shards, want);
    zi_dit *dit = zi_dit_load(bf);
    CHECK(dit, "the converted transformer does not load: %s", zi_err());
    zi_dit_free(dit);
    /* the index's total_size is the bf16 data size, as in the original */
    char *ia = zi_path("%s/diffusion_pytorch_model.safetensors.index.json", src);
    char *ib = zi_path("%s/diffusion_pytorch_model.safetensors.index.json", bf);
    zj *ja = zj_load(ia), *jb = zj_load(ib);
    CHECK(ja && jb, "%s", zi_err());
    double sa = zi_cfg_num(ja, "total_size", -1), sb = zi_cfg_num(jb, "total_size", -2);
    zj_free(ja); zj_free(jb);
    free(ia); free(ib); free(f32); free(bf);
    CHECK(sa == sb, "index total_size %.0f, want %.0f", sb, sa);
}

TEST(convert_errors) {
    char out[4096];
    CHECK(zt_sh(out, sizeof out, "%s/sample --convert /nonexistent %s/x", zt_bin(), zt_tmpdir()) != 0, "no error");
    CHECK(strstr(out, "/nonexistent"), "message does not name the input: %s", out);
    const char *src = zt_golden("tiny-zimage/transformer");
    CHECK(zt_sh(out, sizeof out, "%s/sample --convert %s %s", zt_bin(), src, src) != 0, "same dir accepted");
}
