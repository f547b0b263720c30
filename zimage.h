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

/* ================================================================ tokenizer.c
 * The Qwen2 byte-level BPE tokenizer, read from a Hugging Face tokenizer.json; ids are exactly
 * those of HF `tokenizers` (AutoTokenizer(...)(text).input_ids: no BOS/EOS added).
 * Text is UTF-8; invalid UTF-8 is an error (-1), never replaced. Ids come back in a malloc'd
 * array (*ids; NULL when there are none) that the caller frees. */
typedef struct zi_tokenizer zi_tokenizer;
/* path: tokenizer.json, or a directory holding it directly or in tokenizer/ (a model dir). */
zi_tokenizer *zi_tok_load(const char *path);
void zi_tok_free(zi_tokenizer *t);
/* Encodes text[0..len): returns the number of ids or -1 (invalid UTF-8). */
int zi_tok_encode(const zi_tokenizer *t, const char *text, size_t len, int32_t **ids);
/* The Z-Image prompt: the Qwen3 chat template for one user message with the generation prompt
 * (thinking enabled, so no empty <think> block), malloc'd:
 * "<|im_start|>user\n" PROMPT "<|im_end|>\n<|im_start|>assistant\n". */
char *zi_tok_chat_text(const char *prompt);
/* Its ids, truncated to at most max_len (the pipeline uses 512); the count or -1. */
int zi_tok_chat(const zi_tokenizer *t, const char *prompt, int max_len, int32_t **ids);
/* Text of ids (added tokens as their text; invalid UTF-8 becomes U+FFFD, as HF does), malloc'd
 * and NUL-terminated, its length in *len (may be NULL; the text may hold U+0000); NULL for an
 * id that is not in the vocabulary. */
char *zi_tok_decode(const zi_tokenizer *t, const int32_t *ids, int n, size_t *len);
int zi_tok_n_ids(const zi_tokenizer *t);        /* 1 + the largest id */


/* ================================================================ qwen3.c */


/* ================================================================ dit.c */


/* ================================================================ vae.c */


/* ================================================================ sampler.c */


/* ================================================================ image.c */


/* ================================================================ lora.c */


/* ================================================================ zimage.c */


#endif
