/* zimage.c: the text-to-image pipeline over a model directory (the Hugging Face snapshot
 * layout: tokenizer/, text_encoder/, transformer/, vae/, scheduler/).
 *
 * Order and memory: the text encoder is loaded, encodes the prompt (and the negative prompt
 * when guidance is on) and is unmapped before the DiT is loaded; the DiT is unmapped before
 * the VAE decodes. Only one large component is resident at a time.
 */
#include "zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

zi_params zi_params_default(void) {
    return (zi_params){
        .negative = "", .width = 1024, .height = 1024, .steps = 8, .cfg = 1.0f,
        .cfg_norm = 0.0f, .cfg_trunc = 1.0f, .shift = 0.0f, .sampler = "euler",
    };
}

/* Puts WHAT: in front of the current error message. */
static void prefix_err(const char *what) {
    char msg[512];
    snprintf(msg, sizeof msg, "%s", zi_err());
    zi_seterr("%s: %s", what, msg);
}

/* First non-finite value of x[0..n), or -1. A NaN or Inf weight anywhere in a checkpoint (or
 * a LoRA) ends up in every value after a few layers; scanning 20 GB of weights at load time
 * to find it would cost more than the whole run, so the pipeline checks what it produces:
 * each model output and the decoded image, stopping with a message instead of writing a
 * black or garbage PNG. */
static int64_t non_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return i;
    return -1;
}

/* ---------------------------------------------------------------- prompt -> embeddings */
/* Encodes the chat-templated prompt (and the negative one when neg_out is not NULL).
 * Returns 0 or -1; embeddings are [L, D] malloc'd. */
static int encode_prompts(const char *dir, const char *prompt, const char *negative, float **pos_out, int *Lp,
                          float **neg_out, int *Ln) {
    char *tokdir = zi_path("%s/tokenizer", dir), *tedir = zi_path("%s/text_encoder", dir);
    zi_tokenizer *tok = zi_tok_load(tokdir);
    int32_t *ids = NULL, *nids = NULL;
    int rc = -1;
    zi_te *te = NULL;
    if (!tok) goto out;
    /* an empty prompt is fine (the chat template still gives tokens), as in diffusers */
    if ((*Lp = zi_tok_chat(tok, prompt, ZI_MAX_TOKENS, &ids)) < 0) { prefix_err("prompt"); goto out; }
    if (neg_out && (*Ln = zi_tok_chat(tok, negative, ZI_MAX_TOKENS, &nids)) < 0) { prefix_err("--negative"); goto out; }
    if (!(te = zi_te_load(tedir))) goto out;
    if (zi_dump_active()) {
        int64_t *w = zi_malloc((size_t)*Lp * sizeof *w);
        for (int i = 0; i < *Lp; i++) w[i] = ids[i];
        zi_dump_i64("ids", *Lp, w);
        free(w);
    }
    int D = zi_te_dim(te);
    if (!(*pos_out = zi_te_encode(te, ids, *Lp))) goto out;
    zi_dump("prompt_embeds", 2, (int64_t[]){*Lp, D}, *pos_out);
    if (neg_out) {
        if (!(*neg_out = zi_te_encode(te, nids, *Ln))) goto out;
        zi_dump("negative_embeds", 2, (int64_t[]){*Ln, D}, *neg_out);
    }
    rc = 0;
out:
    zi_te_free(te);       /* unmapped here: the DiT gets the memory */
    zi_tok_free(tok);
    free(ids); free(nids); free(tokdir); free(tedir);
    return rc;
}

/* ---------------------------------------------------------------- latents -> image */
/* Decodes latents [C, h, w] to an image [3, H, W] in [0, 1] (before 8-bit rounding). */
static float *decode_latents(const char *dir, const float *latents, int h, int w) {
    char *vaedir = zi_path("%s/vae", dir);
    zi_vae *vae = zi_vae_load(vaedir);
    free(vaedir);
    if (!vae) return NULL;
    int C = zi_vae_latent_channels(vae), f = zi_vae_factor(vae);
    size_t n = (size_t)C * h * w;
    float *z = zi_malloc(n * sizeof *z), scale = zi_vae_scaling(vae), shift = zi_vae_shift(vae);
    for (size_t i = 0; i < n; i++) z[i] = latents[i] / scale + shift;
    float *img = zi_vae_decode(vae, z, h, w);
    free(z);
    zi_vae_free(vae);
    if (!img) return NULL;
    size_t npx = (size_t)3 * h * f * w * f;
    if (non_finite(img, (int64_t)npx) >= 0) {
        zi_seterr("%s/vae: the decoded image holds NaN or Inf values (bad VAE weights?)", dir);
        free(img);
        return NULL;
    }
    for (size_t i = 0; i < npx; i++) {
        float v = img[i] / 2 + 0.5f;
        img[i] = v < 0 ? 0 : v > 1 ? 1 : v;
    }
    zi_dump("image", 3, (int64_t[]){3, (int64_t)h * f, (int64_t)w * f}, img);
    return img;
}

/* ---------------------------------------------------------------- denoising */
typedef struct {
    zi_dit *dit;
    const float *pos, *neg;     /* caption features [Lp, D], [Ln, D] */
    int Lp, Ln, h, w;
    double guidance;            /* diffusers' G = cfg − 1 */
    double cfg_norm, cfg_trunc;
    int64_t n;                  /* latent elements */
    float *out2;                /* [2, n] scratch for the positive and negative outputs */
    int steps_done, evals;
    double t0;
    int quiet;
    const char *dir;            /* the model directory, for messages */
} denoiser;

/* v = dx/dσ = −(DiT output, guided): one DiT call, a batch of two when guidance is on. */
static int velocity(void *ctx, const float *x, float sigma, float t, float *v) {
    denoiser *d = ctx;
    (void)sigma;
    double g = zi_cfg_scale(d->guidance, d->cfg_trunc, t);
    int B = g > 0 ? 2 : 1;
    const float *xs[2] = {x, x}, *caps[2] = {d->pos, d->neg}, ts[2] = {t, t};
    int hs[2] = {d->h, d->h}, ws[2] = {d->w, d->w}, Ls[2] = {d->Lp, d->Ln};
    float *outs[2] = {d->out2, d->out2 + d->n};
    if (zi_dit_forward(d->dit, B, xs, hs, ws, ts, caps, Ls, outs)) return -1;
    if (non_finite(d->out2, B * d->n) >= 0) {
        zi_seterr("%s/transformer: the model output holds NaN or Inf values at step %d (NaN/Inf "
                  "weights in the checkpoint or a LoRA?)", d->dir, d->steps_done + 1);
        return -1;
    }
    if (B == 2) zi_cfg_combine(d->out2, d->out2, d->out2 + d->n, d->n, g, d->cfg_norm);
    for (int64_t i = 0; i < d->n; i++) v[i] = -d->out2[i];
    return 0;
}

static void on_step(void *ctx, int step, const float *x) {
    denoiser *d = ctx;
    char name[32];
    snprintf(name, sizeof name, "latents.step%d", step);
    zi_dump(name, 4, (int64_t[]){1, d->n / ((int64_t)d->h * d->w), d->h, d->w}, x);
    d->steps_done = step + 1;
    if (!d->quiet) {
        double el = zi_now() - d->t0, rate = d->steps_done / el;
        fprintf(stderr, "\rstep %d/%d  %.2f it/s  %.1fs/it  ETA %.0fs   ", d->steps_done, d->evals, rate, 1 / rate,
                (d->evals - d->steps_done) / rate);
        if (d->steps_done == d->evals) fputc('\n', stderr);
    }
}

/* ---------------------------------------------------------------- the pipeline */
/* Image sizes must be multiples of the VAE's factor times the DiT's patch (16), within the
 * DiT's position table (axes_lens) and within memory; all checked from the configs before
 * anything large is loaded, so that -W 16384 fails at once instead of after minutes. */
static int check_size(const char *dir, const zi_params *p, int *vae_factor) {
    zj *vcfg = zi_config_load(dir, "vae"), *tcfg = zi_config_load(dir, "transformer");
    int rc = -1, blocks[16], patch[4], lens[3];
    if (!vcfg || !tcfg) goto out;
    int nb = zi_cfg_ints(vcfg, "block_out_channels", blocks, 16), np = zi_cfg_ints(tcfg, "all_patch_size", patch, 4);
    if (nb < 1 || np < 1 || patch[0] < 1 || blocks[0] < 1 || zi_cfg_ints(tcfg, "axes_lens", lens, 3) != 3) {
        zi_seterr("%s: vae or transformer config lacks block_out_channels/all_patch_size/axes_lens", dir);
        goto out;
    }
    *vae_factor = 1 << (nb - 1);
    int mult = *vae_factor * patch[0];
    if (p->width % mult || p->height % mult || p->width <= 0 || p->height <= 0) {
        zi_seterr("--width/--height: %dx%d is not a multiple of %d", p->width, p->height, mult);
        goto out;
    }
    if (p->height / mult > lens[1] || p->width / mult > lens[2]) {
        zi_seterr("--width/--height: %dx%d is too large for this model (at most %dx%d: transformer axes_lens)",
                  p->width, p->height, lens[2] * mult, lens[1] * mult);
        goto out;
    }
    /* the VAE decoder's last stage holds about three activations of block_out_channels[0]
     * channels at full resolution: a lower bound of what the run needs */
    double need = 3.0 * blocks[0] * p->width * p->height * sizeof(float);
    double have = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (have > 0 && need > have) {
        zi_seterr("--width/--height: %dx%d needs more than %.0f GB for the VAE decoder; this machine has %.0f GB",
                  p->width, p->height, need / 1e9, have / 1e9);
        goto out;
    }
    rc = 0;
out:
    zj_free(vcfg);
    zj_free(tcfg);
    return rc;
}

/* The flow-matching shift: p->shift, else the scheduler config's (3 when the model has no
 * scheduler directory). A config that is there but broken is an error (-1), not a silent 3. */
static double flow_shift(const char *dir, const zi_params *p) {
    if (p->shift > 0) return p->shift;
    char *sdir = zi_path("%s/scheduler", dir);
    int present = access(sdir, F_OK) == 0;
    free(sdir);
    if (!present) return 3.0;
    zj *s = zi_config_load(dir, "scheduler");
    if (!s) return -1;
    double shift = zi_cfg_num(s, "shift", 3.0);
    zj_free(s);
    if (shift > 0 && shift < 1e6) return shift;
    zi_seterr("%s/scheduler: shift %g is not a positive number", dir, shift);
    return -1;
}

/* Loads the DiT with the LoRAs applied. The default is run-time adapters: exact (the golden
 * path) and the base weights stay mmap'd; merging saves the adapters' ~2·rank/in extra
 * FLOPs but rounds W + ΔW to the checkpoint's dtype (as DiffSynth and ComfyUI do) and needs
 * a private copy of every merged weight. */
zi_dit *zi_load_dit(const char *dir, const zi_params *p, zi_lora **loras) {
    char *tdir = zi_path("%s/transformer", dir);
    zi_dit *dit = zi_dit_load(tdir);
    free(tdir);
    if (!dit) return NULL;
    int n = zi_dit_nlin(dit);
    zi_lin **lins = zi_malloc((size_t)n * sizeof *lins);
    for (int i = 0; i < n; i++) lins[i] = zi_dit_lin_at(dit, i);
    int i = 0;
    for (; i < p->n_lora; i++)
        if (!(loras[i] = zi_lora_load(p->lora_files[i])) ||
            zi_lora_apply(loras[i], lins, n, p->lora_strengths[i], p->lora_merge, !p->quiet) < 0) break;
    free(lins);
    if (i == p->n_lora) return dit;
    for (; i >= 0; i--) { zi_lora_free(loras[i]); loras[i] = NULL; }
    zi_dit_free(dit);
    return NULL;
}

float *zi_generate(const char *dir, const zi_params *p) {
    zi_sampler sampler;
    if (zi_sampler_parse(p->sampler, &sampler)) {
        zi_seterr("--sampler: unknown sampler '%s' (euler, heun, dpmpp_2m)", p->sampler);
        return NULL;
    }
    if (p->steps < 1) { zi_seterr("--steps: must be at least 1"); return NULL; }
    int factor;
    if (check_size(dir, p, &factor)) return NULL;
    double shift = flow_shift(dir, p);
    if (shift < 0) return NULL;
    if (p->dump) zi_dump_begin();

    denoiser d = { .guidance = p->cfg > 1 ? p->cfg - 1.0 : 0.0, .cfg_norm = p->cfg_norm,
                   .cfg_trunc = p->cfg_trunc, .quiet = p->quiet };
    float *pos = NULL, *neg = NULL, *latents = NULL, *img = NULL;
    zi_lora **loras = zi_calloc((size_t)p->n_lora + 1, sizeof *loras);
    zi_dit *dit = NULL;
    if (encode_prompts(dir, p->prompt, p->negative, &pos, &d.Lp, d.guidance > 0 ? &neg : NULL, &d.Ln)) goto out;

    if (!(dit = zi_load_dit(dir, p, loras))) goto out;
    const zi_dit_cfg *cfg = zi_dit_config(dit);
    d.dit = dit; d.pos = pos; d.neg = neg; d.dir = dir;
    d.h = p->height / factor; d.w = p->width / factor;
    d.n = (int64_t)cfg->in_channels * d.h * d.w;
    latents = zi_malloc((size_t)d.n * sizeof *latents);
    zi_randn(latents, d.n, p->seed, p->rng_cuda ? ZI_RNG_CUDA : ZI_RNG_CPU);
    zi_dump("latents.init", 4, (int64_t[]){1, cfg->in_channels, d.h, d.w}, latents);

    float *sigmas = zi_malloc(((size_t)p->steps + 1) * sizeof *sigmas);
    zi_flow_sigmas(p->steps, shift, sigmas);
    d.out2 = zi_malloc(2 * (size_t)d.n * sizeof(float));
    d.evals = zi_sampler_evals(sampler, p->steps);
    d.t0 = zi_now();
    int rc = zi_sample(sampler, sigmas, p->steps, latents, d.n, velocity, on_step, &d);
    free(sigmas);
    free(d.out2);
    for (int i = p->n_lora - 1; i >= 0; i--) zi_lora_free(loras[i]);
    zi_dit_free(dit);       /* unmapped before the VAE runs */
    dit = NULL;
    if (rc) goto out;
    img = decode_latents(dir, latents, d.h, d.w);
out:
    if (dit) {
        for (int i = p->n_lora - 1; i >= 0; i--) zi_lora_free(loras[i]);
        zi_dit_free(dit);
    }
    free(loras); free(pos); free(neg); free(latents);
    if (p->dump && zi_dump_end(img ? p->dump : NULL) && img) { free(img); img = NULL; }
    return img;
}

int zi_generate_png(const char *dir, const zi_params *p, const char *path) {
    float *img = zi_generate(dir, p);
    if (!img) return -1;
    uint8_t *rgb = zi_malloc((size_t)3 * p->width * p->height);
    zi_image_from_float(img, p->width, p->height, rgb);
    free(img);
    /* the settings, in the "parameters" format that common image tools display */
    size_t cap = strlen(p->prompt) + strlen(p->negative) + 512;
    for (int i = 0; i < p->n_lora; i++) cap += strlen(p->lora_files[i]) + 32;
    char *text = zi_malloc(cap);
    int n = snprintf(text, cap, "%s\n", p->prompt);
    if (p->cfg > 1) n += snprintf(text + n, cap - n, "Negative prompt: %s\n", p->negative);
    n += snprintf(text + n, cap - n, "Steps: %d, Sampler: %s, CFG scale: %g, Seed: %llu, Size: %dx%d, Model: Z-Image-Turbo",
                  p->steps, p->sampler, p->cfg, (unsigned long long)p->seed, p->width, p->height);
    if (p->cfg_norm > 0) n += snprintf(text + n, cap - n, ", CFG norm: %g", p->cfg_norm);
    if (p->cfg_trunc < 1) n += snprintf(text + n, cap - n, ", CFG truncation: %g", p->cfg_trunc);
    for (int i = 0; i < p->n_lora; i++)
        n += snprintf(text + n, cap - n, "%s%s:%g", i ? " " : ", Lora: ", p->lora_files[i], p->lora_strengths[i]);
    const char *kv[2] = {"parameters", text};
    int rc = zi_png_write(path, rgb, p->width, p->height, kv, 1);
    free(text);
    free(rgb);
    return rc;
}
