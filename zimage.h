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

/* ================================================================ tokenizer.c */


/* ================================================================ qwen3.c */


/* ================================================================ dit.c */


/* ================================================================ vae.c */


/* ================================================================ sampler.c */


/* ================================================================ image.c */


/* ================================================================ lora.c */


/* ================================================================ zimage.c */


#endif
