/* Tests of lora.c: key formats, conversion round trips, merge vs run-time application. */
#include "test.h"
#include "../zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const zi_lora_module *find_module(const zi_lora *l, const char *name) {
    for (int i = 0; i < l->n; i++)
        if (!strcmp(l->m[i].name, name)) return &l->m[i];
    return NULL;
}

/* same modules, same matrices (bitwise), same effective scale */
static int same_lora(const zi_lora *a, const zi_lora *b) {
    if (a->n != b->n) { fprintf(stderr, "    %d vs %d modules\n", a->n, b->n); return 0; }
    for (int i = 0; i < a->n; i++) {
        const zi_lora_module *x = &a->m[i], *y = find_module(b, x->name);
        if (!y) { fprintf(stderr, "    %s missing\n", x->name); return 0; }
        if (x->rank != y->rank || x->in != y->in || x->out != y->out) return 0;
        float sx = zi_lora_scale(x), sy = zi_lora_scale(y);
        if (memcmp(x->A, y->A, (size_t)x->rank * x->in * sizeof(float))) return 0;
        for (size_t k = 0; k < (size_t)x->out * x->rank; k++)
            if (fabsf(x->B[k] * sx - y->B[k] * sy) > 1e-6f * fabsf(x->B[k] * sx)) {
                fprintf(stderr, "    %s B differs\n", x->name);
                return 0;
            }
    }
    return 1;
}

TEST(lora_formats_agree) {
    zi_lora *a = zi_lora_load(zt_golden("lora-a-diffsynth.safetensors"));
    zi_lora *b = zi_lora_load(zt_golden("lora-a-diffusers.safetensors"));
    CHECK(a && b, "%s", zi_err());
    /* the oracle's LoRA: attention q, k, v, out and feed-forward w1, w2, w3 of every block */
    zi_dit *dit = zi_dit_load(zt_golden("tiny-zimage/transformer"));
    CHECK(dit, "%s", zi_err());
    const zi_dit_cfg *cfg = zi_dit_config(dit);
    int blocks = zt_dit_blocks(cfg);
    char last[64];
    snprintf(last, sizeof last, "layers.%d.feed_forward.w2", cfg->n_layers - 1);
    zi_dit_free(dit);
    CHECK(a->n == 7 * blocks, "%d modules, want 7 in each of %d blocks", a->n, blocks);
    CHECK(find_module(a, last) && find_module(a, "context_refiner.0.attention.to_out.0"),
          "diffusers module names expected");
    CHECK(same_lora(a, b), "diffsynth and diffusers files of the same LoRA differ");
    zi_lora *c = zi_lora_load(zt_golden("lora-b-aitoolkit.safetensors"));
    CHECK(c && c->n == a->n && c->m[0].rank == 8, "aitoolkit file");
    zi_lora_free(a); zi_lora_free(b); zi_lora_free(c);
}

TEST(lora_convert_round_trip) {
    static const char *const fmts[] = {"diffsynth", "diffusers", "comfyui", "kohya"};
    zi_lora *a = zi_lora_load(zt_golden("lora-b-aitoolkit.safetensors"));
    CHECK(a, "%s", zi_err());
    a->m[0].alpha = 4.0f;     /* one module with alpha != rank: kept or folded, never lost */
    for (int f = 0; f < 4; f++) {
        char path[512];
        snprintf(path, sizeof path, "%s/conv-%s.safetensors", zt_tmpdir(), fmts[f]);
        CHECK(zi_lora_save(a, path, fmts[f], ZI_BF16, "Tongyi-MAI/Z-Image-Turbo") == 0, "%s", zi_err());
        zi_lora *b = zi_lora_load(path);
        CHECK(b, "%s: %s", fmts[f], zi_err());
        CHECK(same_lora(a, b), "round trip through %s changed the LoRA", fmts[f]);
        zi_lora_free(b);
    }
    /* the CLI converter writes the same files */
    char out[4096];
    int rc = zt_sh(out, sizeof out, "%s/sample --convert-lora %s %s/cli.safetensors --to kohya", zt_bin(),
                   zt_golden("lora-a-diffsynth.safetensors"), zt_tmpdir());
    CHECK(rc == 0, "sample --convert-lora failed: %s", out);
    char p[512];
    snprintf(p, sizeof p, "%s/cli.safetensors", zt_tmpdir());
    zi_lora *k = zi_lora_load(p), *d = zi_lora_load(zt_golden("lora-a-diffsynth.safetensors"));
    CHECK(k && d && same_lora(d, k), "CLI kohya conversion");
    zi_lora_free(k); zi_lora_free(d);
    zi_lora_free(a);
}

/* A ComfyUI-native file: fused attention.qkv and attention.out, kohya-style flattening too */
TEST(lora_comfy_fused_and_kohya_names) {
    const int r = 2, in = 4, out = 4;
    float down[2 * 4], up[12 * 2], up1[4 * 2], alpha = 1.0f;
    for (int i = 0; i < r * in; i++) down[i] = (float)i;
    for (int i = 0; i < 3 * out * r; i++) up[i] = (float)(100 + i);
    for (int i = 0; i < out * r; i++) up1[i] = (float)(-i);
    zi_stw *w = zi_stw_new();
    zi_stw_add_f32(w, "diffusion_model.layers.0.attention.qkv.lora_down.weight", 2, (int64_t[]){r, in}, down);
    zi_stw_add_f32(w, "diffusion_model.layers.0.attention.qkv.lora_up.weight", 2, (int64_t[]){3 * out, r}, up);
    zi_stw_add_f32(w, "diffusion_model.layers.0.attention.out.lora_down.weight", 2, (int64_t[]){r, in}, down);
    zi_stw_add_f32(w, "diffusion_model.layers.0.attention.out.lora_up.weight", 2, (int64_t[]){out, r}, up1);
    zi_stw_add_f32(w, "lora_unet__all_final_layer_2-1_adaLN_modulation_1.lora_down.weight", 2, (int64_t[]){r, in}, down);
    zi_stw_add_f32(w, "lora_unet__all_final_layer_2-1_adaLN_modulation_1.lora_up.weight", 2, (int64_t[]){out, r}, up1);
    zi_stw_add_f32(w, "lora_unet__all_final_layer_2-1_adaLN_modulation_1.alpha", 0, NULL, &alpha);
    zi_stw_add_f32(w, "lora_unet_noise_refiner_1_feed_forward_w2.lora_down.weight", 2, (int64_t[]){r, in}, down);
    zi_stw_add_f32(w, "lora_unet_noise_refiner_1_feed_forward_w2.lora_up.weight", 2, (int64_t[]){out, r}, up1);
    char path[512];
    snprintf(path, sizeof path, "%s/comfy.safetensors", zt_tmpdir());
    CHECK(zi_stw_write(w, path) == 0, "%s", zi_err());
    zi_stw_free(w);
    zi_lora *l = zi_lora_load(path);
    CHECK(l, "%s", zi_err());
    CHECK(l->n == 6, "%d modules", l->n);
    const zi_lora_module *k = find_module(l, "layers.0.attention.to_k");
    CHECK(k && k->out == out && k->B[0] == 100 + out * r, "to_k takes the middle third of qkv's up");
    CHECK(find_module(l, "layers.0.attention.to_out.0"), "attention.out -> to_out.0");
    const zi_lora_module *f = find_module(l, "all_final_layer.2-1.adaLN_modulation.1");
    CHECK(f && zi_lora_scale(f) == 0.5f, "kohya double underscore name and alpha");
    CHECK(find_module(l, "noise_refiner.1.feed_forward.w2"), "kohya single underscore name");
    zi_lora_free(l);
}

TEST(lora_bad_files) {
    char path[512];
    snprintf(path, sizeof path, "%s/nolora.safetensors", zt_tmpdir());
    zi_stw *w = zi_stw_new();
    float v[4] = {1, 2, 3, 4};
    zi_stw_add_f32(w, "layers.0.attention.to_q.weight", 2, (int64_t[]){2, 2}, v);
    CHECK(zi_stw_write(w, path) == 0, "%s", zi_err());
    zi_stw_free(w);
    CHECK(!zi_lora_load(path) && strstr(zi_err(), "no LoRA"), "a file without LoRA keys: %s", zi_err());
    w = zi_stw_new();
    zi_stw_add_f32(w, "layers.0.attention.to_q.lora_A.weight", 2, (int64_t[]){2, 2}, v);
    CHECK(zi_stw_write(w, path) == 0, "%s", zi_err());
    zi_stw_free(w);
    CHECK(!zi_lora_load(path) && strstr(zi_err(), "up (B)"), "missing B: %s", zi_err());
    CHECK(!zi_lora_load("/nonexistent/x.safetensors"), "missing file");
}
