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

zi_params zi_params_default(void) {
    return (zi_params){
        .negative = "", .width = 1024, .height = 1024, .steps = 8, .cfg = 1.0f,
        .cfg_norm = 0.0f, .cfg_trunc = 1.0f, .shift = 0.0f, .sampler = "euler",
    };
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
    *Lp = zi_tok_chat(tok, prompt, ZI_MAX_TOKENS, &ids);
    if (*Lp < 0) goto out;
    if (neg_out && (*Ln = zi_tok_chat(tok, negative, ZI_MAX_TOKENS, &nids)) < 0) goto out;
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
