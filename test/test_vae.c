/* Tests of vae.c: decoder and encoder against diffusers (tiny random FLUX-topology VAE),
 * thread-count invariance, bad checkpoints. */
#include "test.h"
#include "../zimage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VAE_DIR "test/golden/tiny-zimage/vae"

/* float32 copy of a golden tensor with exactly ndim dims (shape returned) */
static float *golden(const zi_st *st, const char *name, int ndim, int64_t *shape) {
    const zi_tensor *t = zi_st_get(st, name);
    if (!t || t->ndim != ndim) return NULL;
    memcpy(shape, t->shape, (size_t)ndim * sizeof *shape);
    return zi_tensor_f32(t);
}

TEST(vae_decode_golden) {
    zi_vae *v = zi_vae_load(VAE_DIR);
    CHECK(v, "load: %s", zi_err());
    zi_st *g = zi_st_open(zt_golden("vae-dec.safetensors"));
    CHECK(g, "%s", zi_err());
    int64_t zs[4], is[4];
    float *z = golden(g, "vae.z", 4, zs), *ref = golden(g, "vae.img", 4, is);
    CHECK(z && ref && zs[1] == zi_vae_latent_channels(v), "golden tensors");
    int f = zi_vae_factor(v);
    CHECK(f == 8 && is[1] == 3 && is[2] == zs[2] * f && is[3] == zs[3] * f, "factor %d", f);
    float *img = zi_vae_decode(v, z, (int)zs[2], (int)zs[3]);
    CHECK(img, "decode: %s", zi_err());
    CHECK_CLOSE("vae.img", img, ref, (size_t)(3 * is[2] * is[3]), 1e-4);
    CHECK(zi_vae_scaling(v) == 0.3611f && zi_vae_shift(v) == 0.1159f, "scaling/shift");
    free(img), free(z), free(ref);
    zi_st_close(g);
    zi_vae_free(v);
}

TEST(vae_encode_golden) {
    zi_vae *v = zi_vae_load(VAE_DIR);
    CHECK(v, "load: %s", zi_err());
    zi_st *g = zi_st_open(zt_golden("vae-enc.safetensors"));
    CHECK(g, "%s", zi_err());
    int64_t is[4], ms[4], ls[4];
    float *img = golden(g, "vae.img_in", 4, is), *rmean = golden(g, "vae.mean", 4, ms),
          *rlogvar = golden(g, "vae.logvar", 4, ls);
    CHECK(img && rmean && rlogvar, "golden tensors");
    float *mean, *logvar;
    CHECK(zi_vae_encode(v, img, (int)is[2], (int)is[3], &mean, &logvar) == 0, "encode: %s", zi_err());
    size_t n = (size_t)(ms[1] * ms[2] * ms[3]);
    CHECK_CLOSE("vae.mean", mean, rmean, n, 1e-4);
    CHECK_CLOSE("vae.logvar", logvar, rlogvar, n, 1e-4);
    free(mean), free(logvar);
    /* sizes that are not multiples of the down-sampling factor are refused */
    CHECK(zi_vae_encode(v, img, (int)is[2] - 4, (int)is[3], &mean, &logvar) == -1 && !mean,
          "odd size accepted");
    free(img), free(rmean), free(rlogvar);
    zi_st_close(g);
    zi_vae_free(v);
}

/* A decode and an encode give the same bits with 1 thread and with 3. */
TEST(vae_threads) {
    zi_vae *v = zi_vae_load(VAE_DIR);
    CHECK(v, "load: %s", zi_err());
    int h = 4, w = 6, L = zi_vae_latent_channels(v), f = zi_vae_factor(v);
    float *z = zi_malloc((size_t)L * h * w * sizeof(float));
    for (int i = 0; i < L * h * w; i++) z[i] = (float)((i * 37 % 101) - 50) / 25.0f;
    float *out[2], *mean[2], *logvar[2];
    for (int k = 0; k < 2; k++) {
        zi_threads_init(k == 0 ? 1 : 3);
        out[k] = zi_vae_decode(v, z, h, w);
        CHECK(out[k], "decode: %s", zi_err());
        CHECK(zi_vae_encode(v, out[k], h * f, w * f, &mean[k], &logvar[k]) == 0, "encode: %s", zi_err());
    }
    zi_threads_init(0);
    size_t ni = (size_t)3 * h * f * w * f, nl = (size_t)L * h * w;
    CHECK(!memcmp(out[0], out[1], ni * sizeof(float)), "decode depends on the thread count");
    CHECK(!memcmp(mean[0], mean[1], nl * sizeof(float)) && !memcmp(logvar[0], logvar[1], nl * sizeof(float)),
          "encode depends on the thread count");
    for (int k = 0; k < 2; k++) free(out[k]), free(mean[k]), free(logvar[k]);
    free(z);
    zi_vae_free(v);
}

/* Writes DIR/config.json (a copy) and DIR/vae.safetensors: the tiny VAE with tensor `drop`
 * left out and tensor `shrink` one element shorter in its first dimension. */
static int write_variant(const char *dir, const char *drop, const char *shrink) {
    if (zt_sh(NULL, 0, "mkdir -p %s && cp %s/config.json %s/", dir, VAE_DIR, dir)) return -1;
    zi_st *st = zi_st_open(VAE_DIR);
    if (!st) return -1;
    zi_stw *w = zi_stw_new();
    for (int i = 0; i < zi_st_count(st); i++) {
        const zi_tensor *t = zi_st_at(st, i);
        int64_t shape[ZI_MAXDIM];
        memcpy(shape, t->shape, sizeof shape);
        if (drop && !strcmp(t->name, drop)) continue;
        if (shrink && !strcmp(t->name, shrink)) shape[0]--;
        zi_stw_add(w, t->name, t->dtype, t->ndim, shape, t->data);
    }
    char path[512];
    snprintf(path, sizeof path, "%s/vae.safetensors", dir);
    int rc = zi_stw_write(w, path);
    zi_stw_free(w);
    zi_st_close(st);
    return rc;
}

/* The first tensor of the tiny VAE whose name contains pattern (copied into name[cap]); 0 or -1. */
static int find_tensor(const char *pattern, char *name, size_t cap) {
    zi_st *st = zi_st_open(VAE_DIR);
    int rc = -1;
    for (int i = 0; st && rc && i < zi_st_count(st); i++)
        if (strstr(zi_st_at(st, i)->name, pattern)) rc = snprintf(name, cap, "%s", zi_st_at(st, i)->name) < 0;
    zi_st_close(st);
    return rc;
}

/* The damaged tensors are chosen from the model's own config and names, so that the cases
 * hold for any tiny VAE the golden set has (other channel counts, layers per block). */
TEST(vae_bad_input) {
    char dir[512], name[256];
    CHECK(!zi_vae_load("test/golden/no-such-vae"), "missing directory accepted");

    zj *cfg = zi_config_load(VAE_DIR, "");
    int layers = 0, groups = 0, ch[8];
    CHECK(cfg && !zi_cfg_need_int(cfg, "layers_per_block", &layers) && !zi_cfg_need_int(cfg, "norm_num_groups", &groups)
          && zi_cfg_ints(cfg, "block_out_channels", ch, 8) > 1, "config: %s", zi_err());
    zj_free(cfg);

    /* the last resnet of a decoder up block (the decoder has layers_per_block + 1 of them) */
    snprintf(dir, sizeof dir, "%s/vae-missing", zt_tmpdir());
    snprintf(name, sizeof name, "decoder.up_blocks.1.resnets.%d.conv2.bias", layers);
    CHECK(write_variant(dir, name, NULL) == 0, "%s", zi_err());
    CHECK(!zi_vae_load(dir), "missing weight %s accepted", name);
    CHECK(strstr(zi_err(), name), "message: %s", zi_err());

    /* a 1x1 shortcut conv (where a block changes the channel count) one output channel short */
    snprintf(dir, sizeof dir, "%s/vae-shape", zt_tmpdir());
    CHECK(find_tensor("conv_shortcut.weight", name, sizeof name) == 0, "no conv_shortcut in the VAE");
    CHECK(write_variant(dir, NULL, name) == 0, "%s", zi_err());
    CHECK(!zi_vae_load(dir), "wrong shape of %s accepted", name);
    CHECK(strstr(zi_err(), name), "message: %s", zi_err());

    /* a config whose channel counts do not split into the GroupNorm groups: more groups than
     * the first block has channels */
    snprintf(dir, sizeof dir, "%s/vae-groups", zt_tmpdir());
    CHECK(write_variant(dir, NULL, NULL) == 0, "%s", zi_err());
    CHECK(zt_sh(NULL, 0, "sed -i 's/\"norm_num_groups\": %d,/\"norm_num_groups\": %d,/' %s/config.json", groups,
                ch[0] + groups, dir) == 0, "sed");
    CHECK(!zi_vae_load(dir), "bad norm_num_groups accepted");
    CHECK(strstr(zi_err(), "norm_num_groups"), "message: %s", zi_err());
}
