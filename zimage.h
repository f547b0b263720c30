/* zimage.h: the public API of zimage.c and the model structures.
 *
 * Components (one file each): tokenizer.c (Qwen2 BPE), qwen3.c (text encoder), dit.c
 * (the diffusion transformer, forward and backward), vae.c (FLUX VAE), sampler.c
 * (flow-matching schedules, samplers, torch-compatible noise), image.c (PNG/JPEG,
 * inflate/deflate), lora.c (LoRA files), zimage.c (model directory and the text-to-image
 * pipeline). Kernels live in tensor.c (tensor.h); file formats in safetensors.c
 * (safetensors.h). Every function that can fail on bad input returns -1 or NULL with a
 * one-line message in zi_err().
 */
#ifndef ZIMAGE_H
#define ZIMAGE_H

#include "tensor.h"
#include "safetensors.h"

/* ================================================================ Linear layers (lora.c)
 * Every Linear of the text encoder and the DiT is a zi_lin, named as in the diffusers /
 * transformers checkpoint (e.g. "layers.0.attention.to_q"), so LoRA files can find it.
 * Adapters attached at run time add y += scale · B(A x) (A: [rank, in], B: [out, rank],
 * float32). */
typedef struct zi_lora_adapter {
    const float *A, *B;
    int rank;
    float scale;
    struct zi_lora_adapter *next;
} zi_lora_adapter;

typedef struct {
    const char *name;       /* module name without the ".weight" suffix */
    zi_mat W;               /* [out, in], usually a view into the mmap'd checkpoint */
    const float *bias;      /* [out] or NULL */
    zi_lora_adapter *lora;  /* run-time adapters, NULL when none */
} zi_lin;

/* y[M, out] = x[M, in] · Wᵀ + bias + Σ adapters */
void zi_lin_forward(const zi_lin *l, const float *x, int M, float *y);

/* ================================================================ tokenizer.c */


/* ================================================================ qwen3.c */


/* ================================================================ dit.c */


/* ================================================================ vae.c
 * The FLUX VAE (diffusers AutoencoderKL), float32, one image at a time. Latents of the
 * diffusion model relate to the decoder input by z = latents / scaling + shift (and
 * latents = (mean - shift) · scaling after encoding); the caller applies that. */
typedef struct zi_vae zi_vae;
/* vae_dir holds config.json and the safetensors weights (diffusers layout). */
zi_vae *zi_vae_load(const char *vae_dir);
void zi_vae_free(zi_vae *v);
/* z [latent_channels, h, w] -> malloc'd image [out_channels (3), f·h, f·w] (f = zi_vae_factor),
 * the raw decoder output (about [-1, 1], not clamped). NULL on a bad size. */
float *zi_vae_decode(zi_vae *v, const float *z, int h, int w);
/* img [in_channels (3), H, W] in [-1, 1] (H, W multiples of f) -> malloc'd mean and logvar
 * [latent_channels, H/f, W/f] of the posterior (logvar clamped to [-30, 20]). 0 or -1. */
int zi_vae_encode(zi_vae *v, const float *img, int H, int W, float **mean, float **logvar);
float zi_vae_scaling(const zi_vae *v);      /* scaling_factor (0.3611 for FLUX) */
float zi_vae_shift(const zi_vae *v);        /* shift_factor (0.1159; 0 when null) */
int zi_vae_latent_channels(const zi_vae *v);
int zi_vae_factor(const zi_vae *v);         /* spatial down-sampling factor, 2^(blocks-1) = 8 */


/* ================================================================ sampler.c */


/* ================================================================ image.c */


/* ================================================================ lora.c */


/* ================================================================ zimage.c */


#endif
