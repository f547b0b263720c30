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


/* ================================================================ vae.c */


/* ================================================================ sampler.c */


/* ================================================================ image.c */


/* ================================================================ lora.c */


/* ================================================================ zimage.c */


#endif
