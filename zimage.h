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
    float *dA, *dB;         /* training: gradients accumulate here; NULL otherwise */
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
/* One module of a LoRA file, named as the diffusers Linear it targets. */
typedef struct {
    char *name;
    int rank, in, out;
    float *A, *B;           /* [rank, in], [out, rank], float32 */
    float alpha;            /* NAN when the file gives none (scale 1) */
} zi_lora_module;

typedef struct zi_lora {
    char *path;
    int n;
    zi_lora_module *m;
    zi_dtype dtype;         /* of the file's matrices */
    int n_unknown;          /* keys that are no LoRA weight we know */
    char **unknown;
    int n_applied;          /* what zi_lora_apply changed, undone by zi_lora_remove */
    struct zi_lora_applied *applied;
} zi_lora;

/* Reads any of the formats listed in lora.c (a fused ComfyUI qkv becomes to_q/to_k/to_v). */
zi_lora *zi_lora_load(const char *path);
float zi_lora_scale(const zi_lora_module *m);   /* alpha/rank, or 1 without alpha */
/* Applies the LoRA with scale·strength to the Linear layers of the same names, either merged
 * into a copy of each weight (merge = 1, same dtype) or as run-time adapters. Shapes are
 * checked first; modules matching no layer are warnings (verbose), none matching is an error.
 * Returns the number of modules applied or -1. */
int zi_lora_apply(zi_lora *l, zi_lin *const *lins, int nlins, float strength, int merge, int verbose);
/* Undoes zi_lora_apply exactly (the original weights come back). With several LoRAs on the
 * same layers, remove them in the reverse order of applying. */
void zi_lora_remove(zi_lora *l);
void zi_lora_free(zi_lora *l);                  /* removes it first when applied */
/* Writes the modules as FORMAT: diffsynth (bare names, .lora_A.default.weight, no alpha),
 * diffusers (transformer. prefix, explicit .alpha), comfyui (diffusion_model. prefix, .alpha)
 * or kohya (lora_unet_ flattened names, lora_down/lora_up, .alpha); metadata rank, alpha,
 * targets, base_model. */
int zi_lora_save(const zi_lora *l, const char *path, const char *format, zi_dtype dtype, const char *base_model);


/* ================================================================ zimage.c */
#define ZI_MAX_TOKENS 512   /* the pipeline's max_sequence_length, after the chat template */

/* Everything a text-to-image run takes (the CLI's flags). */
typedef struct {
    const char *prompt, *negative;
    int width, height, steps;
    float cfg;              /* classic scale: neg + cfg·(pos − neg); 1 = off */
    float cfg_norm;         /* diffusers cfg_normalization; 0 = off */
    float cfg_trunc;        /* diffusers cfg_truncation; 1 = off */
    float shift;            /* <= 0: the scheduler config's */
    const char *sampler;    /* euler, heun, dpmpp_2m */
    uint64_t seed;
    int rng_cuda;           /* noise as torch.randn on a CUDA generator instead of the CPU one */
    int n_lora;
    const char *const *lora_files;
    const float *lora_strengths;
    const char *dump;       /* write every intermediate here, or NULL */
    int quiet;              /* no progress on stderr */
} zi_params;

zi_params zi_params_default(void);  /* the Turbo defaults: 1024², 8 steps, cfg 1, euler */
/* Runs the pipeline; returns the image [3, H, W] in [0, 1] (malloc'd) or NULL. */
float *zi_generate(const char *model_dir, const zi_params *p);
/* zi_generate, then a PNG at path with the settings in its "parameters" text chunk. */
int zi_generate_png(const char *model_dir, const zi_params *p, const char *path);


#endif
