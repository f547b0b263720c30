/* zimage.c: the text-to-image pipeline over a model directory (the Hugging Face snapshot
 * layout: tokenizer/, text_encoder/, transformer/, vae/, scheduler/).
 *
 * Order and memory: the text encoder is loaded, encodes the prompt (and the negative prompt
 * when guidance is on) and is unmapped before the DiT is loaded; the DiT is unmapped before
 * the VAE decodes. Only one large component is resident at a time. img2img (diffusers'
 * ZImageImg2ImgPipeline) encodes the init image with the VAE between the text encoder and
 * the DiT.
 *
 * The stages are public so that a program holding a DiT (train's previews) samples through
 * the same code: zi_denoise (the sampler loop on a loaded DiT and precomputed features) and
 * zi_decode (the VAE); zi_generate is encode_prompts + zi_dit_load_with_loras + zi_denoise +
 * zi_decode.
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
        .strength = 0.6,
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
    /* the negative first: the encoder's te.hidden.K dumps then hold the prompt's layers */
    if (neg_out) {
        if (!(*neg_out = zi_te_encode(te, nids, *Ln))) goto out;
        zi_dump("negative_embeds", 2, (int64_t[]){*Ln, D}, *neg_out);
    }
    if (!(*pos_out = zi_te_encode(te, ids, *Lp))) goto out;
    zi_dump("prompt_embeds", 2, (int64_t[]){*Lp, D}, *pos_out);
    rc = 0;
out:
    zi_te_free(te);       /* unmapped here: the DiT gets the memory */
    zi_tok_free(tok);
    free(ids); free(nids); free(tokdir); free(tedir);
    return rc;
}

/* ---------------------------------------------------------------- image -> latents (img2img) */
float *zi_encode_image(const char *dir, const zi_image *im, uint64_t seed) {
    char *vaedir = zi_path("%s/vae", dir);
    zi_vae *vae = zi_vae_load(vaedir);
    free(vaedir);
    if (!vae) return NULL;
    int C = zi_vae_latent_channels(vae), f = zi_vae_factor(vae), h = im->h / f, w = im->w / f;
    float *px = zi_malloc((size_t)3 * im->w * im->h * sizeof *px), *mean = NULL, *logvar = NULL;
    zi_image_to_float(im->px, im->w, im->h, px, 0);
    int rc = zi_vae_encode(vae, px, im->h, im->w, &mean, &logvar);
    free(px);
    if (rc) { zi_vae_free(vae); return NULL; }
    /* latent_dist.sample(generator): mean + exp(logvar/2)·ε with ε the generator's first
     * C·h·w normals; then (z − shift)·scale */
    int64_t n = (int64_t)C * h * w;
    float *eps = zi_malloc((size_t)n * sizeof *eps), scale = zi_vae_scaling(vae), shift = zi_vae_shift(vae);
    zi_randn(eps, n, seed, ZI_RNG_CPU);
    for (int64_t i = 0; i < n; i++) mean[i] = (mean[i] + expf(0.5f * logvar[i]) * eps[i] - shift) * scale;
    free(eps); free(logvar);
    zi_vae_free(vae);
    zi_dump("image_latents", 4, (int64_t[]){1, C, h, w}, mean);
    return mean;
}

/* ---------------------------------------------------------------- latents -> image */
float *zi_decode(const char *dir, const float *latents, int h, int w) {
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
        zi_seterr("transformer: the model output holds NaN or Inf values at step %d (NaN/Inf weights in the "
                  "checkpoint or a LoRA?)", d->steps_done + 1);
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
        zi_progress("step %d/%d  %.2f it/s  %.1fs/it  ETA %.0fs   ", d->steps_done, d->evals, rate, 1 / rate,
                    (d->evals - d->steps_done) / rate);
        if (d->steps_done == d->evals) zi_progress_end();
    }
}

/* ---------------------------------------------------------------- the pipeline */
int zi_check_size(const char *dir, int width, int height, int *vae_factor) {
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
    if (width % mult || height % mult || width <= 0 || height <= 0) {
        zi_seterr("--width/--height: %dx%d is not a multiple of %d", width, height, mult);
        goto out;
    }
    if (height / mult > lens[1] || width / mult > lens[2]) {
        zi_seterr("--width/--height: %dx%d is too large for this model (at most %dx%d: transformer axes_lens)",
                  width, height, lens[2] * mult, lens[1] * mult);
        goto out;
    }
    /* the VAE decoder's last stage holds about three activations of block_out_channels[0]
     * channels at full resolution: a lower bound of what the run needs */
    double need = 3.0 * blocks[0] * width * height * sizeof(float);
    double have = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (have > 0 && need > have) {
        zi_seterr("--width/--height: %dx%d needs more than %.0f GB for the VAE decoder; this machine has %.0f GB",
                  width, height, need / 1e9, have / 1e9);
        goto out;
    }
    rc = 0;
out:
    zj_free(vcfg);
    zj_free(tcfg);
    return rc;
}

double zi_model_shift(const char *dir) {
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
zi_dit *zi_dit_load_with_loras(const char *dir, const zi_params *p, zi_lora **loras) {
    char *tdir = zi_path("%s/transformer", dir);
    zi_dit *dit = zi_dit_load(tdir);
    free(tdir);
    if (!dit) return NULL;
    int n;
    zi_lin *const *lins = zi_dit_lins(dit, &n);
    int i = 0;
    for (; i < p->n_lora; i++)
        if (!(loras[i] = zi_lora_load(p->lora_files[i])) ||
            zi_lora_apply(loras[i], lins, n, p->lora_strengths[i], p->lora_merge, !p->quiet) < 0) break;
    if (i == p->n_lora) return dit;
    for (; i >= 0; i--) { zi_lora_free(loras[i]); loras[i] = NULL; }
    zi_dit_free(dit);
    return NULL;
}

/* img2img's first step (diffusers' get_timesteps, in Python floats): about strength·steps of
 * the schedule's last steps are run. */
int zi_img2img_start(int steps, double strength) {
    double init = fmin(steps * strength, steps);
    return (int)fmax(steps - init, 0.0);
}

float *zi_denoise(zi_dit *dit, const float *pos, int Lp, const float *neg, int Ln, int h, int w,
                  const float *z0, const zi_params *p) {
    zi_sampler sampler;
    if (zi_sampler_parse(p->sampler, &sampler)) return NULL;
    if (p->steps < 1 || p->shift <= 0) { zi_seterr("zi_denoise: steps %d, shift %g", p->steps, p->shift); return NULL; }
    int start = z0 ? zi_img2img_start(p->steps, p->strength) : 0;
    if (start >= p->steps) {
        zi_seterr("--strength %g leaves none of the %d steps to run", p->strength, p->steps);
        return NULL;
    }
    const zi_dit_cfg *cfg = zi_dit_config(dit);
    denoiser d = { .dit = dit, .pos = pos, .neg = neg, .Lp = Lp, .Ln = Ln, .h = h, .w = w,
                   .guidance = p->cfg > 1 ? p->cfg - 1.0 : 0.0, .cfg_norm = p->cfg_norm, .cfg_trunc = p->cfg_trunc,
                   .n = (int64_t)cfg->in_channels * h * w, .quiet = p->quiet };
    if (d.guidance > 0 && !neg) { zi_seterr("zi_denoise: cfg %g needs the negative prompt's features", p->cfg); return NULL; }
    if (z0 && d.n % 16) {   /* see below */
        zi_seterr("img2img: %lld latent values, not a multiple of 16 (torch's generator is not modelled)", (long long)d.n);
        return NULL;
    }
    float *sigmas = zi_malloc(((size_t)p->steps + 1) * sizeof *sigmas);
    zi_flow_sigmas(p->steps, p->shift, sigmas);
    float *x = zi_malloc((size_t)d.n * sizeof *x);
    if (!z0) {
        zi_randn(x, d.n, p->seed, p->rng);
    } else {
        /* the generator's first n normals were the posterior sample's (zi_encode_image), the
         * next n are the noise; n being a multiple of 16, torch's randn(n) consumed exactly n
         * uniforms (no redrawn tail, sampler.c), so they are the second half of 2n normals.
         * scheduler.scale_noise: x = σ·noise + (1 − σ)·z0 at the first step's σ. */
        float *r = zi_malloc(2 * (size_t)d.n * sizeof *r), s = sigmas[start];
        zi_randn(r, 2 * d.n, p->seed, ZI_RNG_CPU);
        for (int64_t i = 0; i < d.n; i++) x[i] = s * r[d.n + i] + (1.0f - s) * z0[i];
        free(r);
    }
    zi_dump("latents.init", 4, (int64_t[]){1, cfg->in_channels, h, w}, x);
    d.out2 = zi_malloc(2 * (size_t)d.n * sizeof(float));
    d.evals = zi_sampler_evals(sampler, p->steps - start);
    d.t0 = zi_now();
    int rc = zi_sample(sampler, sigmas + start, p->steps - start, x, d.n, velocity, on_step, &d);
    free(sigmas);
    free(d.out2);
    if (rc) { free(x); return NULL; }
    return x;
}

/* --init-image: 8-bit RGB of exactly the requested size. diffusers' image processor would
 * resize to the image's own size floored to a multiple of 16 (a no-op at such sizes) and then
 * fails unless that equals the requested size; we ask for the sizes to be equal instead. */
static int load_init_image(const zi_params *p, zi_image *im) {
    if (zi_image_load(p->init_image, im)) return -1;
    if (im->w != p->width || im->h != p->height) {
        zi_seterr("--init-image: %s is %dx%d, the image to make is %dx%d (they must be equal)", p->init_image, im->w,
                  im->h, p->width, p->height);
        zi_image_free(im);
        return -1;
    }
    if (!(p->strength > 0 && p->strength <= 1)) {
        zi_seterr("--strength: %g is not in (0, 1]", p->strength);
        zi_image_free(im);
        return -1;
    }
    if (p->rng != ZI_RNG_CPU) {
        zi_seterr("--init-image: only the CPU generator (--rng cpu) is supported");
        zi_image_free(im);
        return -1;
    }
    return 0;
}

float *zi_generate(const char *dir, const zi_params *p) {
    zi_sampler sampler;
    if (zi_sampler_parse(p->sampler, &sampler)) return NULL;
    if (p->steps < 1) { zi_seterr("--steps: must be at least 1"); return NULL; }
    int factor;
    if (zi_check_size(dir, p->width, p->height, &factor)) return NULL;
    zi_image init = {0};
    if (p->init_image && load_init_image(p, &init)) return NULL;
    zi_params q = *p;
    if (q.shift <= 0 && (q.shift = (float)zi_model_shift(dir)) < 0) { zi_image_free(&init); return NULL; }
    if (p->dump) zi_dump_begin();

    int h = p->height / factor, w = p->width / factor, Lp, Ln = 0;
    float *pos = NULL, *neg = NULL, *z0 = NULL, *latents = NULL, *img = NULL;
    zi_lora **loras = zi_calloc((size_t)p->n_lora + 1, sizeof *loras);
    zi_dit *dit = NULL;
    if (encode_prompts(dir, p->prompt, p->negative, &pos, &Lp, p->cfg > 1 ? &neg : NULL, &Ln)) goto out;
    if (p->init_image && !(z0 = zi_encode_image(dir, &init, p->seed))) goto out;
    if (!(dit = zi_dit_load_with_loras(dir, p, loras))) goto out;
    latents = zi_denoise(dit, pos, Lp, neg, Ln, h, w, z0, &q);
    for (int i = p->n_lora - 1; i >= 0; i--) zi_lora_free(loras[i]);
    zi_dit_free(dit);       /* unmapped before the VAE runs */
    if (latents) img = zi_decode(dir, latents, h, w);
out:
    zi_image_free(&init);
    free(loras); free(pos); free(neg); free(z0); free(latents);
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
    size_t cap = strlen(p->prompt) + strlen(p->negative) + (p->init_image ? strlen(p->init_image) : 0) + 600;
    for (int i = 0; i < p->n_lora; i++) cap += strlen(p->lora_files[i]) + 32;
    char *text = zi_malloc(cap);
    int n = snprintf(text, cap, "%s\n", p->prompt);
    if (p->cfg > 1) n += snprintf(text + n, cap - n, "Negative prompt: %s\n", p->negative);
    n += snprintf(text + n, cap - n, "Steps: %d, Sampler: %s, CFG scale: %g, Seed: %llu, Size: %dx%d, Model: Z-Image-Turbo",
                  p->steps, p->sampler, p->cfg, (unsigned long long)p->seed, p->width, p->height);
    if (p->cfg_norm > 0) n += snprintf(text + n, cap - n, ", CFG norm: %g", p->cfg_norm);
    if (p->cfg_trunc < 1) n += snprintf(text + n, cap - n, ", CFG truncation: %g", p->cfg_trunc);
    if (p->init_image) n += snprintf(text + n, cap - n, ", Init image: %s, Denoising strength: %g", p->init_image, p->strength);
    for (int i = 0; i < p->n_lora; i++)
        n += snprintf(text + n, cap - n, "%s%s:%g", i ? " " : ", Lora: ", p->lora_files[i], p->lora_strengths[i]);
    const char *kv[2] = {"parameters", text};
    int rc = zi_png_write(path, rgb, p->width, p->height, kv, 1);
    free(text);
    free(rgb);
    return rc;
}
