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


/* ================================================================ dit.c
 * The diffusion transformer (diffusers' ZImageTransformer2DModel, single-stream S3-DiT):
 * patchify -> x / caption embedders -> noise refiners (image tokens, modulated) and context
 * refiners (caption tokens, not modulated) -> main layers over [image ; caption] -> final
 * layer -> unpatchify. Every dimension comes from transformer/config.json and the tensor
 * shapes; weights stay in the mmap. */
typedef struct {
    int in_channels;        /* latent channels C */
    int patch, f_patch;     /* spatial / temporal patch (2, 1) */
    int dim, n_heads, head_dim;
    int n_layers, n_refiner_layers;
    int cap_feat_dim;       /* width of the text features */
    int adaln_dim;          /* width of the timestep embedding (min(dim, 256)) */
    int axes_dims[3], axes_lens[3];
    int qk_norm;            /* RMSNorm of each head of q and k */
    float norm_eps, t_scale;
    double rope_theta;
} zi_dit_cfg;

typedef struct zi_dit zi_dit;
/* Loads transformer_dir/config.json and its safetensors (one file, an index, or a
 * directory holding one of them). NULL on error. */
zi_dit *zi_dit_load(const char *transformer_dir);
void zi_dit_free(zi_dit *m);
const zi_dit_cfg *zi_dit_config(const zi_dit *m);
/* One forward of B items, each with its own size (a CFG pair is one call with B = 2):
 *   x[b]:   latent [C, 1, h[b], w[b]] (h, w multiples of the patch)
 *   t[b]:   model time 1 − σ (0 = noise, 1 = clean)
 *   cap[b]: text features [L[b], cap_feat_dim], L[b] >= 1
 *   out[b]: [C, 1, h[b], w[b]], the velocity x0 − ε.
 * Each item's result equals its single-item run bit for bit. Returns 0, or -1 (error set)
 * on bad sizes or position ids past axes_lens. */
int zi_dit_forward(const zi_dit *m, int B, const float *const *x, const int *h, const int *w,
                   const float *t, const float *const *cap, const int *L, float *const *out);
/* The model's Linear layers by diffusers module name ("layers.0.attention.to_q",
 * "noise_refiner.1.adaLN_modulation.0", "all_x_embedder.2-1", ...), for LoRA. */
int zi_dit_nlin(const zi_dit *m);
zi_lin *zi_dit_lin_at(zi_dit *m, int i);
zi_lin *zi_dit_linear(zi_dit *m, const char *name);    /* NULL when absent */


/* ================================================================ vae.c */


/* ================================================================ sampler.c */


/* ================================================================ image.c */


/* ================================================================ lora.c */


/* ================================================================ zimage.c */


#endif
