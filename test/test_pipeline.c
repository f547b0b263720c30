/* End-to-end tests through the ./sample command line: the golden pipelines (every step's
 * latents and the image), --eval of each component, LoRAs merged and at run time, --info,
 * --tokenize (bad input: test_bad_inputs.c). */
#include "test.h"
#include "../zimage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define MODEL "test/golden/tiny-zimage"

/* Appends ' s ' quoted for the shell. */
static void shq(char *dst, size_t cap, const char *s) {
    size_t n = strlen(dst);
    n += (size_t)snprintf(dst + n, cap - n, " '");
    for (; *s && n + 5 < cap; s++) {
        if (*s == '\'') n += (size_t)snprintf(dst + n, cap - n, "'\\''");
        else dst[n++] = *s, dst[n] = 0;
    }
    snprintf(dst + n, cap - n, "'");
}

/* Every tensor of the golden file (or those named in need) must be in ours and agree: latents and
 * embeddings to 1e-4 of their largest magnitude, the image to 1e-3; ids exactly. */
static int compare_files(const char *golden, const char *ours, const char *const *need, int *n_compared) {
    zi_st *g = zi_st_open(golden), *o = zi_st_open(ours);
    int ok = g && o;
    if (!ok) fprintf(stderr, "    %s\n", zi_err());
    *n_compared = 0;
    for (int i = 0; ok && i < zi_st_count(g); i++) {
        const zi_tensor *tg = zi_st_at(g, i), *to = zi_st_get(o, tg->name);
        int needed = !need;
        for (int k = 0; need && need[k]; k++) needed |= !strcmp(need[k], tg->name);
        if (!needed) continue;
        if (!to) { fprintf(stderr, "    %s: missing from our output\n", tg->name); ok = 0; break; }
        if (tg->numel != to->numel) { fprintf(stderr, "    %s: %lld vs %lld values\n", tg->name,
                                              (long long)to->numel, (long long)tg->numel); ok = 0; break; }
        if (tg->dtype == ZI_I64) {
            ok = to->dtype == ZI_I64 && !memcmp(tg->data, to->data, tg->nbytes);
            if (!ok) fprintf(stderr, "    %s: ids differ\n", tg->name);
        } else {
            float *a = zi_tensor_f32(to), *b = zi_tensor_f32(tg);
            ok = zt_close(tg->name, a, b, (size_t)tg->numel, strcmp(tg->name, "image") ? 1e-4 : 1e-3);
            free(a); free(b);
        }
        (*n_compared)++;
    }
    zi_st_close(g);
    zi_st_close(o);
    return ok;
}

/* Runs ./sample with the arguments recorded in the golden pipeline file's metadata; with
 * `loras` (NULL-terminated "FILE:STRENGTH") in place of the recorded LoRAs. */
static int run_golden_pipe(const char *name, char *png, size_t pngcap, const char *const *loras_override) {
    zi_st *st = zi_st_open(zt_golden(name));
    if (!st) { fprintf(stderr, "    %s\n", zi_err()); return 0; }
    const char *args = zi_st_meta(st, "args");
    zj *a = args ? zj_parse(args, strlen(args), name) : NULL;
    if (!a) { zi_st_close(st); fprintf(stderr, "    no args in %s\n", name); return 0; }
    char cmd[8192], dump[512];
    snprintf(dump, sizeof dump, "%s/%s", zt_tmpdir(), name);
    snprintf(png, pngcap, "%s/%s.png", zt_tmpdir(), name);
    snprintf(cmd, sizeof cmd, "%s/sample %s", zt_bin(), MODEL);
    shq(cmd, sizeof cmd, zj_str(a, "prompt", ""));
    const char *neg = zj_str(a, "negative", NULL);
    if (neg) { strcat(cmd, " -n"); shq(cmd, sizeof cmd, neg); }
    snprintf(cmd + strlen(cmd), sizeof cmd - strlen(cmd),
             " -q --seed %.0f --steps %.0f --cfg %.17g -W %.0f -H %.0f --cfg-norm %.17g --cfg-trunc %.17g --rng %s"
             " --dump %s -o %s",
             zj_num(a, "seed", 0), zj_num(a, "steps", 8), zj_num(a, "cfg", 1), zj_num(a, "width", 64),
             zj_num(a, "height", 64), zj_num(a, "cfg_norm", 0), zj_num(a, "cfg_trunc", 1), zj_str(a, "rng", "cpu"),
             dump, png);
    const char *init = zj_str(a, "init_image", NULL);     /* img2img */
    if (init) {
        char path[1024];
        snprintf(path, sizeof path, "test/golden/%s", init);
        strcat(cmd, " --init-image");
        shq(cmd, sizeof cmd, path);
        snprintf(cmd + strlen(cmd), sizeof cmd - strlen(cmd), " --strength %.17g", zj_num(a, "strength", 0.6));
    }
    const zj *loras = zj_get(a, "loras");
    for (int i = 0; !loras_override && loras && i < loras->n; i++) {
        char l[1024];
        snprintf(l, sizeof l, "test/golden/%s", zj_at(loras, i)->str);
        strcat(cmd, " --lora");
        shq(cmd, sizeof cmd, l);
    }
    for (int i = 0; loras_override && loras_override[i]; i++) {
        strcat(cmd, " --lora");
        shq(cmd, sizeof cmd, loras_override[i]);
    }
    zj_free(a);
    zi_st_close(st);
    char out[4096];
    int rc = zt_sh(out, sizeof out, "%s", cmd);
    if (rc) { fprintf(stderr, "    %s\n    -> %s", cmd, out); return 0; }
    int n;
    int ok = compare_files(zt_golden(name), dump, NULL, &n);
    if (ok && n < 5) { fprintf(stderr, "    only %d tensors compared\n", n); ok = 0; }
    return ok;
}

/* The PNG holds round(255·image), read back by an independent decoder (Python's zlib). */
static int png_matches_dump(const char *png, const char *dump_name) {
    char out[4096];
    int rc = zt_sh(out, sizeof out,
                   "python3 -c \"import struct, sys, zlib\n"
                   "b = open(sys.argv[1], 'rb').read()\n"
                   "assert b[:8] == bytes([137,80,78,71,13,10,26,10])\n"
                   "i, idat, text = 8, b'', {}\n"
                   "while i < len(b):\n"
                   "    n, = struct.unpack('>I', b[i:i+4]); t = b[i+4:i+8]; d = b[i+8:i+8+n]\n"
                   "    assert zlib.crc32(t + d) == struct.unpack('>I', b[i+8+n:i+12+n])[0]\n"
                   "    if t == b'IHDR': w, h = struct.unpack('>II', d[:8])\n"
                   "    if t == b'IDAT': idat += d\n"
                   "    if t == b'tEXt': k, v = d.split(b'\\\\0', 1); text[k] = v\n"
                   "    i += 12 + n\n"
                   "assert b'parameters' in text and b'Steps: ' in text[b'parameters']\n"
                   "raw = zlib.decompress(idat); s = 3 * w; prev = bytearray(s); px = bytearray()\n"
                   "for y in range(h):\n"
                   "    f = raw[y * (s + 1)]; row = bytearray(raw[y * (s + 1) + 1:(y + 1) * (s + 1)])\n"
                   "    for x in range(s):\n"
                   "        a = row[x - 3] if x >= 3 else 0; c = prev[x - 3] if x >= 3 else 0; up = prev[x]\n"
                   "        p = a + up - c; pa, pb, pc = abs(p - a), abs(p - up), abs(p - c)\n"
                   "        pr = a if pa <= pb and pa <= pc else (up if pb <= pc else c)\n"
                   "        row[x] = (row[x] + [0, a, up, (a + up) // 2, pr][f]) & 255\n"
                   "    px += row; prev = row\n"
                   "hd = open(sys.argv[2], 'rb').read(); n, = struct.unpack('<Q', hd[:8])\n"
                   "import json; m = json.loads(hd[8:8 + n])['image']; o = m['data_offsets']\n"
                   "img = struct.unpack('<%%df' %% (3 * w * h), hd[8 + n + o[0]:8 + n + o[1]])\n"
                   "bad = sum(1 for c in range(3) for k in range(w * h) if abs(px[3 * k + c] - img[c * w * h + k] * 255) > 0.5 + 1e-3)\n"
                   "assert bad == 0, bad\n"
                   "print('png ok', w, h)\" %s %s/%s",
                   png, zt_tmpdir(), dump_name);
    if (rc) fprintf(stderr, "    %s", out);
    return rc == 0;
}

TEST(pipe_0_turbo_defaults) {
    char png[512];
    CHECK(run_golden_pipe("pipe-0.safetensors", png, sizeof png, NULL), "pipe-0 differs");
    CHECK(png_matches_dump(png, "pipe-0.safetensors"), "the PNG does not hold the image");
}

TEST(pipe_1_cfg_negative) {
    char png[512];
    CHECK(run_golden_pipe("pipe-1.safetensors", png, sizeof png, NULL), "pipe-1 differs");
}

TEST(pipe_2_cfg_norm_trunc) {
    char png[512];
    CHECK(run_golden_pipe("pipe-2.safetensors", png, sizeof png, NULL), "pipe-2 differs");
}

TEST(pipe_lora_two_stacked) {
    char png[512];
    CHECK(run_golden_pipe("pipe-lora.safetensors", png, sizeof png, NULL), "pipe-lora differs");
}

/* img2img (diffusers' ZImageImg2ImgPipeline): the VAE's posterior sample of the init image,
 * the noised start at the strength's first step, every step run, the image. */
TEST(pipe_img2img) {
    char png[512];
    CHECK(run_golden_pipe("pipe-img2img.safetensors", png, sizeof png, NULL), "pipe-img2img differs");
    char out[4096];
    int rc = zt_sh(out, sizeof out, "%s/sample %s 'a dog' -q --init-image test/golden/img2img-init.png -W 64 -H 64 -o %s/x.png",
                   zt_bin(), MODEL, zt_tmpdir());
    CHECK(rc != 0 && strstr(out, "64x48"), "an init image of another size must be refused: %s", out);
    rc = zt_sh(out, sizeof out, "%s/sample %s 'a dog' -q --init-image test/golden/img2img-init.png --steps 4 "
               "--strength 0 -o %s/x.png", zt_bin(), MODEL, zt_tmpdir());
    CHECK(rc != 0 && strstr(out, "--strength"), "strength 0 (no step to run) must be refused: %s", out);
}

/* Scheme 4 (training.md §11): an SFT LoRA plus a DistillPatch-style LoRA, both in DiffSynth's
 * layout (bare names, .lora_A.default.weight, no alpha), 8 steps at cfg 1. The second LoRA is
 * lora-b converted to that layout; the result must be pipe-lora's (the same two LoRAs in other
 * layouts) at run time. (--lora-merge, DiffSynth's fusing, rounds W + ΔW to bf16: see
 * lora_merge_vs_runtime.) */
TEST(pipe_lora_distillpatch_diffsynth) {
    char png[512], conv[600], out[4096], b[700];
    snprintf(conv, sizeof conv, "%s/lora-b-diffsynth.safetensors", zt_tmpdir());
    int rc = zt_sh(out, sizeof out, "%s/sample --convert-lora test/golden/lora-b-aitoolkit.safetensors %s --to diffsynth",
                   zt_bin(), conv);
    CHECK(rc == 0, "--convert-lora: %s", out);
    zi_st *st = zi_st_open(conv);
    CHECK(st && zi_st_get(st, "layers.0.attention.to_q.lora_A.default.weight"), "not in DiffSynth's layout");
    zi_st_close(st);
    snprintf(b, sizeof b, "%s:0.5", conv);
    const char *loras[] = {"test/golden/lora-a-diffsynth.safetensors:1", b, NULL};
    CHECK(run_golden_pipe("pipe-lora.safetensors", png, sizeof png, loras), "two DiffSynth-format LoRAs differ");
}

/* --eval of one golden file's inputs; the outputs named in `need` must match it. */
static int eval_golden(const char *name, const char *extra, const char *const *need) {
    char out[4096], res[512];
    snprintf(res, sizeof res, "%s/eval-%s", zt_tmpdir(), name);
    int rc = zt_sh(out, sizeof out, "%s/sample %s --eval %s --eval-out %s %s", zt_bin(), MODEL, zt_golden(name),
                   res, extra);
    if (rc) { fprintf(stderr, "    %s", out); return 0; }
    int n;
    return compare_files(zt_golden(name), res, need, &n);
}

TEST(eval_text_encoder) {
    static const char *const need[] = {"te.embeds", NULL};
    CHECK(eval_golden("te-0.safetensors", "", need) && eval_golden("te-1.safetensors", "", need), "te.embeds");
}

TEST(eval_dit) {
    static const char *const need[] = {"dit.out", NULL};
    for (int i = 0; i < 4; i++) {
        char name[64];
        snprintf(name, sizeof name, "dit-%d.safetensors", i);
        CHECK(eval_golden(name, "", need), "%s", name);
    }
}

TEST(eval_vae) {
    static const char *const dec[] = {"vae.img", NULL}, *const enc[] = {"vae.mean", "vae.logvar", NULL};
    CHECK(eval_golden("vae-dec.safetensors", "", dec), "vae decode");
    CHECK(eval_golden("vae-enc.safetensors", "", enc), "vae encode");
}

/* dit-lora1 (one LoRA) and dit-lora2 (two, different formats and strengths); the same LoRA
 * from its diffsynth and diffusers files gives the same answer. */
TEST(eval_dit_lora) {
    static const char *const need[] = {"dit.out", NULL};
    CHECK(eval_golden("dit-lora1.safetensors", "--lora test/golden/lora-a-diffsynth.safetensors:1.0", need), "lora1");
    CHECK(eval_golden("dit-lora1.safetensors", "--lora test/golden/lora-a-diffusers.safetensors", need), "lora1 diffusers");
    CHECK(eval_golden("dit-lora2.safetensors", "--lora test/golden/lora-a-diffsynth.safetensors:1.0 "
                      "--lora test/golden/lora-b-aitoolkit.safetensors:0.5", need), "lora2");
}

/* The tiny transformer with every tensor stored as float32, in DIR/transformer. */
static int write_f32_transformer(const char *dir) {
    zi_st *st = zi_st_open(MODEL "/transformer");
    if (!st) return 0;
    zi_stw *w = zi_stw_new();
    for (int i = 0; i < zi_st_count(st); i++) {
        const zi_tensor *t = zi_st_at(st, i);
        float *v = zi_tensor_f32(t);
        zi_stw_add_f32(w, t->name, t->ndim, t->shape, v);
        free(v);
    }
    char path[1024];
    snprintf(path, sizeof path, "%s/transformer/diffusion_pytorch_model.safetensors", dir);
    int ok = zt_sh(NULL, 0, "mkdir -p %s/transformer && cp %s/transformer/config.json %s/transformer/", dir, MODEL, dir) == 0 &&
             zi_stw_write(w, path) == 0;
    zi_stw_free(w);
    zi_st_close(st);
    return ok;
}

/* Merged into the weights vs applied at run time: merging into float32 weights gives the
 * golden answer; into bf16 weights each merged weight is round(W + s·B·A); removing merged
 * LoRAs restores the weights bit for bit. */
TEST(lora_merge_vs_runtime) {
    zi_st *g = zi_st_open(zt_golden("dit-lora2.safetensors")), *g3 = zi_st_open(zt_golden("dit-3.safetensors"));
    CHECK(g && g3, "%s", zi_err());
    const zi_tensor *tx = zi_st_get(g, "dit.x"), *tt = zi_st_get(g, "dit.t"), *tc = zi_st_get(g, "dit.cap"),
                    *to = zi_st_get(g, "dit.out");
    float *x = zi_tensor_f32(tx), *t = zi_tensor_f32(tt), *cap = zi_tensor_f32(tc), *ref = zi_tensor_f32(to);
    float *base = zi_tensor_f32(zi_st_get(g3, "dit.out"));
    int h = (int)tx->shape[2], w = (int)tx->shape[3], L = (int)tc->shape[0];
    char f32dir[512];
    snprintf(f32dir, sizeof f32dir, "%s/f32", zt_tmpdir());
    CHECK(write_f32_transformer(f32dir), "%s", zi_err());
    for (int f32 = 0; f32 < 2; f32++) {
        char dir[600];
        snprintf(dir, sizeof dir, "%s/transformer", f32 ? f32dir : MODEL);
        zi_dit *dit = zi_dit_load(dir);
        CHECK(dit, "%s", zi_err());
        int n = zi_dit_nlin(dit);
        zi_lin **lins = malloc((size_t)n * sizeof *lins);
        for (int i = 0; i < n; i++) lins[i] = zi_dit_lin_at(dit, i);
        zi_lin *q = zi_dit_linear(dit, "layers.0.attention.to_q");
        CHECK(q, "no layers.0.attention.to_q");
        zi_mat before = q->W;
        for (int mode = 0; mode < 3; mode++) {
            /* 0: run time, 1: merged, 2: merged then removed (the base model) */
            zi_lora *a = zi_lora_load(zt_golden("lora-a-diffsynth.safetensors"));
            zi_lora *b = zi_lora_load(zt_golden("lora-b-aitoolkit.safetensors"));
            CHECK(a && b, "%s", zi_err());
            CHECK(zi_lora_apply(a, lins, n, 1.0f, mode > 0, 0) > 0 && zi_lora_apply(b, lins, n, 0.5f, mode > 0, 0) > 0,
                  "%s", zi_err());
            if (mode == 1 && !f32) {
                /* one element of a merged bf16 weight, recomputed by hand */
                const zi_lora_module *ma = NULL, *mb = NULL;
                for (int i = 0; i < a->n; i++) if (!strcmp(a->m[i].name, q->name)) ma = &a->m[i];
                for (int i = 0; i < b->n; i++) if (!strcmp(b->m[i].name, q->name)) mb = &b->m[i];
                CHECK(ma && mb, "modules");
                int r = 3, c = 5;
                float w0 = zi_bf16_to_f32(((const uint16_t *)before.data)[r * before.cols + c]), d1 = 0, d2 = 0;
                for (int k = 0; k < ma->rank; k++) d1 += ma->B[r * ma->rank + k] * ma->A[k * ma->in + c];
                for (int k = 0; k < mb->rank; k++) d2 += mb->B[r * mb->rank + k] * mb->A[k * mb->in + c];
                float once = zi_bf16_to_f32(zi_f32_to_bf16(w0 + d1));
                float want = zi_bf16_to_f32(zi_f32_to_bf16(once + 0.5f * d2));
                float got = zi_bf16_to_f32(((const uint16_t *)q->W.data)[r * q->W.cols + c]);
                CHECK(fabsf(got - want) <= fabsf(want) * 0x1p-8f, "merged weight %g, want %g", got, want);
            }
            if (mode == 2) {
                zi_lora_remove(b);
                zi_lora_remove(a);
                CHECK(q->W.data == before.data && q->lora == NULL, "remove did not restore the weight");
            }
            float *out = malloc((size_t)to->numel * sizeof(float));
            CHECK(zi_dit_forward(dit, 1, (const float *const *)&x, &h, &w, t, (const float *const *)&cap, &L, &out) == 0,
                  "%s", zi_err());
            if (mode == 0 || (mode == 1 && f32))
                CHECK_CLOSE(mode ? "merged into f32" : f32 ? "run time, f32 base" : "run time", out, ref,
                            (size_t)to->numel, 1e-4);
            if (mode == 2) CHECK_CLOSE("merged, then removed", out, base, (size_t)to->numel, 1e-4);
            free(out);
            zi_lora_free(b);
            zi_lora_free(a);
        }
        free(lins);
        zi_dit_free(dit);
    }
    free(base); free(x); free(t); free(cap); free(ref);
    zi_st_close(g);
    zi_st_close(g3);
}

TEST(cli_info_and_tokenize) {
    char out[8192];
    CHECK(zt_sh(out, sizeof out, "%s/sample --info %s", zt_bin(), MODEL) == 0, "%s", out);
    CHECK(strstr(out, "ZImageTransformer2DModel") && strstr(out, "AutoencoderKL") && strstr(out, "tensors:"),
          "--info output: %s", out);
    CHECK(zt_sh(out, sizeof out, "%s/sample %s --tokenize 'Hello world'", zt_bin(), MODEL) == 0, "%s", out);
    CHECK(!strcmp(out, "9707 1879\n"), "--tokenize printed '%s'", out);
}
