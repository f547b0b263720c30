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


/* ================================================================ qwen3.c
 * The Qwen3 text encoder as Z-Image uses it: token embeddings, then the first
 * num_hidden_layers - 1 decoder layers; the result is HF's hidden_states[-2] (no final norm).
 * te_dir: the text_encoder directory (config.json + safetensors, sharded or not). Weights stay
 * in the mmap'd checkpoint; zi_te_free() unmaps them so the DiT can use the memory. */
typedef struct zi_te zi_te;
zi_te *zi_te_load(const char *te_dir);
/* ids [L] -> malloc'd [L, zi_te_dim(te)] float32; NULL (error set) on an id out of range.
 * While a dump is active, records te.hidden.K (K = 0: embeddings, K = layers run). */
float *zi_te_encode(zi_te *te, const int32_t *ids, int L);
int zi_te_dim(const zi_te *te);
/* The Linear layers, for LoRA: i = 0 .. count-1 (names as "layers.N.self_attn.q_proj"),
 * NULL past the end. */
zi_lin *zi_te_lin(zi_te *te, int i);
void zi_te_free(zi_te *te);


/* ================================================================ dit.c */


/* ================================================================ vae.c */


/* ================================================================ sampler.c */


/* ================================================================ image.c */


/* ================================================================ lora.c */


/* ================================================================ zimage.c */


#endif
