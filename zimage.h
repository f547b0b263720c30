/* zimage.h: the public API of zimage.c and the model structures.
 *
 * Components (one file each): tokenizer.c (Qwen2 BPE), qwen3.c (text encoder), dit.c
 * (the diffusion transformer, forward and backward), vae.c (FLUX VAE), sampler.c
 * (flow-matching schedules, samplers, torch-compatible noise), image.c (PNG/JPEG,
 * inflate/deflate), lora.c (LoRA files), trainer.c (LoRA training without a model: data,
 * schedule, AdamW, state files), distill.c (trajectory-imitation distillation), zimage.c
 * (model directory and the text-to-image pipeline). Kernels live in tensor.c (tensor.h); file
 * formats in safetensors.c and json.c (safetensors.h). Every function that can fail on bad input returns -1 or NULL with a
 * one-line message in zi_err().
 */
#ifndef ZIMAGE_H
#define ZIMAGE_H

#include "tensor.h"
#include "safetensors.h"

#include <stdio.h>

/* ================================================================ Linear layers (lora.c)
 * Every Linear of the text encoder and the DiT is a zi_lin, named as in the diffusers /
 * transformers checkpoint (e.g. "layers.0.attention.to_q"). LoRA files find the DiT's by that
 * name; the text encoder takes no LoRA (its keys in a LoRA file are ignored).
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
/* Its backward for dy [M, out]: dx [M, in] = dy·W + Σ scale·(dy·B)·A (written; dx may be NULL),
 * and for every adapter with dA/dB: dB += scale·dyᵀ·(x·Aᵀ), dA += scale·(dy·B)ᵀ·x. */
void zi_lin_backward(const zi_lin *l, const float *x, const float *dy, int M, float *dx);
/* Appends a (not owned) to l's adapters: adapters apply in the order attached. Detach unlinks
 * it again (nothing when it is not attached). */
void zi_lin_attach(zi_lin *l, zi_lora_adapter *a);
void zi_lin_detach(zi_lin *l, zi_lora_adapter *a);

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
void zi_te_free(zi_te *te);


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
/* Outside training the feed-forward runs over at most `rows` tokens at a time (default
 * ZI_DIT_FFN_TILE; <= 0: all at once): its [rows, 8·dim/3] intermediates are the largest
 * activations at 1024². The results do not change. */
#define ZI_DIT_FFN_TILE 2048
void zi_dit_set_ffn_tile(zi_dit *m, int rows);
/* The model's Linear layers by diffusers module name ("layers.0.attention.to_q",
 * "noise_refiner.1.adaLN_modulation.0", "all_x_embedder.2-1", ...), for LoRA. */
int zi_dit_nlin(const zi_dit *m);
zi_lin *zi_dit_lin_at(zi_dit *m, int i);
zi_lin *const *zi_dit_lins(zi_dit *m, int *n);     /* all of them, [*n], owned by the DiT */
zi_lin *zi_dit_linear(zi_dit *m, const char *name);    /* NULL when absent */
/* Training (LoRA). With on = 1, each zi_dit_forward keeps what the backward needs (replacing
 * what an earlier one kept); with gradient_checkpointing only each block's input, and the
 * block's forward runs again during the backward. While on, zi_dit_forward takes B = 1 only
 * (turn it off to sample with CFG), and the forward writes that state although it takes a
 * const model: one zi_dit serves one thread of calls at a time. on = 0 frees the state. */
void zi_dit_set_training(zi_dit *m, int on, int gradient_checkpointing);
/* After a training forward: dout = dLoss/d(raw output) [C, 1, h, w] of that forward.
 * Accumulates into dA/dB of every adapter that has them (the others are frozen; the gradient
 * still flows through them and through every weight), then frees the kept activations.
 * Returns 0, or -1 when no training forward preceded it. */
int zi_dit_backward(zi_dit *m, const float *dout);


/* ================================================================ vae.c
 * The FLUX VAE (diffusers AutoencoderKL), float32, one image at a time. Latents of the
 * diffusion model relate to the decoder input by z = latents / scaling + shift (and
 * latents = (mean - shift) · scaling after encoding); the caller applies that. A zi_vae
 * serves one caller at a time (decode and encode reuse buffers it holds). */
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
/* Flow-matching schedules, samplers, classifier-free guidance and torch-compatible noise.
 * Everything reproduces the float32 arithmetic of diffusers (FlowMatchEulerDiscreteScheduler with
 * the Z-Image pipeline's sigmas, FlowMatchHeunDiscreteScheduler, DPMSolverMultistepScheduler)
 * and of torch.randn, operation by operation.
 *
 * Conventions: σ goes from 1 (pure noise) to 0 (clean). The DiT takes the time t = 1 − σ
 * (0 = noise), computed as diffusers does: T = σ·1000, t = (1000 − T)/1000 in float32. The
 * samplers integrate dx/dσ = v, where v is what diffusers hands to scheduler.step: for Z-Image
 * the negated DiT output (≈ noise − x0). */

/* torch.linspace(start, end, steps) in float32, into out[steps] */
void zi_linspace_f32(float start, float end, int steps, float *out);
/* sigmas[0..steps]: σ_i = shift·s_i / (1 + (shift − 1)·s_i) with s = linspace(1, 1/steps, steps)
 * (float32, torch's linspace), and the terminal σ_steps = 0. steps >= 1. */
void zi_flow_sigmas(int steps, double shift, float *sigmas);
float zi_flow_timestep(float sigma);            /* T = σ·1000, diffusers' "timesteps" */
float zi_flow_t(float sigma);                   /* the DiT time input (1000 − T)/1000 */

/* The model, as the samplers see it: v = dx/dσ at (x, σ). t = zi_flow_t(sigma). x and v hold
 * n floats (the latents). Returns 0, or -1 with an error set (the sampler stops). */
typedef int (*zi_velocity_fn)(void *ctx, const float *x, float sigma, float t, float *v);
/* Called after every model evaluation and update (diffusers' callback_on_step_end): x are the
 * latents after step `step` (0-based; zi_sampler_evals() steps in all). May be NULL. */
typedef void (*zi_step_fn)(void *ctx, int step, const float *x);

typedef enum {
    ZI_EULER,       /* FlowMatchEulerDiscreteScheduler: x += (σ_next − σ)·v; steps evaluations */
    ZI_HEUN,        /* FlowMatchHeunDiscreteScheduler: Heun's 2nd order, last step Euler; 2·steps − 1 */
    ZI_DPMPP_2M,    /* DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, flow sigmas,
                       flow_prediction, final sigma 0): first and last steps 1st order; steps */
} zi_sampler;

int zi_sampler_parse(const char *name, zi_sampler *out);   /* "euler", "heun", "dpmpp_2m"; -1 if unknown */
const char *zi_sampler_name(zi_sampler s);
int zi_sampler_evals(zi_sampler s, int steps);             /* model evaluations for `steps` sigmas */

/* Integrates x [n] in place along sigmas[0..steps] (sigmas[steps] is normally 0; a tail of a
 * longer schedule works too, e.g. for img2img). Returns 0, or -1 when the model failed. */
int zi_sample(zi_sampler s, const float *sigmas, int steps, float *x, int64_t n,
              zi_velocity_fn velocity, zi_step_fn on_step, void *ctx);

/* Classifier-free guidance as pipeline_z_image.py does it. guidance is diffusers'
 * guidance_scale G (the classic scale is S = G + 1). zi_cfg_scale() is the G in force at model
 * time t: G itself, or 0 when G <= 0 or when cfg_truncation <= 1 and t > cfg_truncation
 * (compared in double, as diffusers compares Python floats). When it is 0 the pipeline runs the
 * positive prompt alone. */
double zi_cfg_scale(double guidance, double cfg_truncation, float t);
/* pred = pos + G·(pos − neg) (float32); then, when cfg_normalization > 0 and
 * ‖pred‖ > cfg_normalization·‖pos‖ (2-norms over all n values), pred is scaled down to that
 * norm. pred may alias pos or neg. */
void zi_cfg_combine(float *pred, const float *pos, const float *neg, int64_t n, double guidance,
                    double cfg_normalization);

/* torch.randn(shape, generator=torch.Generator(dev).manual_seed(seed)) for a contiguous
 * float32 tensor of n elements, bit for bit (CUDA: up to the GPU's sin/cos, see sampler.c). */
typedef enum { ZI_RNG_CPU, ZI_RNG_CUDA } zi_rng;
int zi_rng_parse(const char *name, zi_rng *out);           /* "cpu", "cuda"; -1 if unknown */
void zi_randn(float *out, int64_t n, uint64_t seed, zi_rng dev);
/* The CUDA kernel's grid is capped at (SMs × max threads per SM / 256) blocks; beyond
 * 256·cap elements the numbers depend on the GPU. zi_randn uses an H100's cap (1056). */
void zi_randn_cuda(float *out, int64_t n, uint64_t seed, int64_t max_blocks);

/* ================================================================ image.c
 * Images are 8-bit, row-major, channels interleaved: px[(y·w + x)·c + k]. The loaders always
 * return RGB (c = 3), as PIL's Image.open(path).convert("RGB") in DiffSynth's data loader:
 * alpha is dropped without compositing, gray is replicated, EXIF orientation is ignored. */
typedef struct { int w, h, c; uint8_t *px; } zi_image;
void zi_image_free(zi_image *im);

uint32_t zi_crc32(uint32_t crc, const void *buf, size_t n);     /* start with crc = 0 */
uint32_t zi_adler32(uint32_t adler, const void *buf, size_t n); /* start with adler = 1 */
/* zlib streams (RFC 1950/1951). compress cannot fail; *out is malloc'd. decompress returns
 * -1 for a corrupt or truncated stream, or when the output would exceed max_out bytes. */
void zi_zlib_compress(const uint8_t *src, size_t n, uint8_t **out, size_t *out_n);
int zi_zlib_decompress(const uint8_t *src, size_t n, size_t max_out, uint8_t **out, size_t *out_n);

/* PNG writers: 8-bit RGB (or gray c = 1 / RGBA c = 4 for _image). text_kv holds n_kv
 * key/value pairs (key0, value0, key1, ...), written as tEXt (iTXt when the value is not
 * ASCII); the generation settings go under the key "parameters". The file is written under
 * a temporary name, fsync'd and renamed: a failure leaves no output file. */
int zi_png_write(const char *path, const uint8_t *rgb, int w, int h, const char *const *text_kv, int n_kv);
int zi_png_write_image(const char *path, const zi_image *im, const char *const *text_kv, int n_kv);

/* Decoders (from memory) and the loader (by content, PNG or JPEG): 0, or -1 with zi_err().
 * PNG: every colour type and bit depth, Adam7; 16-bit samples keep their high byte, except
 * 16-bit gray, which PIL clips to 255 (mode "I" to "RGB"): we do too.
 * JPEG: baseline and progressive Huffman, gray, YCbCr/RGB or Adobe CMYK, bit-exact with
 * PIL (libjpeg's default decoding: islow IDCT, fancy upsampling; PIL's CMYK to RGB). */
int zi_png_decode(const uint8_t *buf, size_t n, zi_image *out);
int zi_jpeg_decode(const uint8_t *buf, size_t n, zi_image *out);
int zi_image_decode(const uint8_t *buf, size_t n, zi_image *out);
int zi_image_load(const char *path, zi_image *out);

/* [3,H,W] float in [0,1] -> RGB: round-half-even(255·clamp(x, 0, 1)) (NaN -> 0). */
void zi_image_from_float(const float *chw, int w, int h, uint8_t *rgb);
/* RGB -> [3,H,W] float in [-1,1]: x·(2/255) − 1 in float32, or with bf16 = 1 each operation
 * rounded to bfloat16 (DiffSynth's preprocess_image on a bf16 tensor). */
void zi_image_to_float(const uint8_t *rgb, int w, int h, float *chw, int bf16);

/* DiffSynth's training image size (ImageCropAndResize.get_height_width): height and width
 * when both are > 0, else the image size scaled down to at most max_pixels (never up) and
 * floored to multiples of 16. */
void zi_train_size(int w, int h, int height, int width, int64_t max_pixels, int *tw, int *th);
/* DiffSynth's crop_and_resize: scale to cover tw x th keeping the aspect ratio (sizes
 * rounded half-even), resize with PIL's bilinear filter (antialiased when shrinking,
 * 8-bit intermediate after the horizontal pass, as Image.resize), then centre crop
 * (torchvision offsets). */
int zi_image_resize_crop(const zi_image *in, int tw, int th, zi_image *out);


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

/* "FILE[:STRENGTH]" as --lora takes it: the strength is what follows the last ':' when that
 * parses as a number (so paths containing ':' still work), else 1. Returns the file name
 * (malloc'd), or NULL (error set) when the strength is not finite. */
char *zi_lora_arg(const char *arg, float *strength);
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


/* ================================================================ trainer.c
 * LoRA training as DiffSynth-Studio's train.py does it, the parts that need
 * no model: dataset metadata, the training grid and loss weights of its FlowMatchScheduler
 * ("Z-Image" template), random numbers, the trainable LoRA with AdamW + ConstantLR, the loss,
 * and training-state files. The program train.c drives them with the DiT. */

/* Dataset metadata: rows with an image path and a prompt (other columns are ignored). The
 * format follows the file name: .json (an array of objects), .jsonl (one object per line),
 * anything else CSV (RFC 4180 with a header row: quoted fields may hold commas, "" and
 * newlines). A missing column or value is an error naming the file and row. */
typedef struct { char *image, *prompt; } zi_train_item;
typedef struct { int n; zi_train_item *items; } zi_train_meta;
int zi_train_meta_load(const char *path, zi_train_meta *out);
int zi_train_meta_parse(const char *text, size_t len, const char *path, zi_train_meta *out);
void zi_train_meta_free(zi_train_meta *m);

/* The training grid of n points (DiffSynth trains on n = 1000, shift 3): σ_i from
 * linspace(1, 0, n + 1)[:-1] shifted as shift·s/(1 + (shift − 1)·s) (σ_0 = 1), and the loss
 * weight of each point: a Gaussian bell over 1000σ, minus its minimum, normalised to mean 1. */
#define ZI_TRAIN_GRID 1000
void zi_train_grid(int n, float shift, float *sigmas, float *weights);

/* Random numbers are a hash of (seed, purpose, counter): nothing to carry but counters. */
enum { ZI_RNG_TIMESTEP = 1, ZI_RNG_NOISE, ZI_RNG_SHUFFLE, ZI_RNG_INIT };
int zi_train_timestep(uint64_t seed, int64_t sample, int n);    /* grid index of sample #k, uniform in [0, n) */
uint64_t zi_train_noise_seed(uint64_t seed, int64_t sample);    /* for zi_randn (CPU generator) */
void zi_train_perm(int *perm, int n, uint64_t seed, int epoch); /* the shuffled order of an epoch */

/* A trainable LoRA: float32 A [rank, in] and B [out, rank] per module, attached as adapters to
 * the model's layers (after any adapters already there). All parameters, their gradients
 * (the adapters' dA, dB) and the AdamW moments live in one flat buffer each, module by
 * module, A then B. lora is a zi_lora view for zi_lora_save (its A, B point into w). */
typedef struct {
    zi_lora lora;
    zi_lora_adapter *ad;    /* [lora.n] */
    zi_lin **lin;           /* [lora.n] the layers they are attached to */
    int64_t n_params;
    float *w, *g, *m, *v;   /* parameters, gradients, first and second moments */
    int64_t step;           /* optimizer steps taken */
} zi_train_lora;

/* Rank-`rank` modules (scale 1, alpha = rank) on every layer whose name equals one of the
 * comma-separated targets or ends with "." + target (peft's rule); A ~ U(−1/√in, 1/√in) drawn
 * from seed (peft's Kaiming-uniform), B = 0. NULL when nothing matches. */
zi_train_lora *zi_train_lora_new(zi_lin *const *lins, int nlins, const char *targets, int rank, uint64_t seed);
/* The modules of a LoRA file as they are (same ranks, scale alpha/rank × strength): for
 * evaluating gradients of an existing LoRA. */
zi_train_lora *zi_train_lora_of(const zi_lora *src, zi_lin *const *lins, int nlins, float strength);
/* --lora-checkpoint: copies the file's modules onto the same-named trained ones (alpha/rank
 * folded into B); a rank or shape mismatch is an error. Returns the number copied or -1. */
int zi_train_lora_load_weights(zi_train_lora *t, const zi_lora *src);
void zi_train_lora_zero_grad(zi_train_lora *t);
/* One AdamW step on the gradients in g (betas 0.9, 0.999, eps 1e-8; DiffSynth's weight decay
 * is 0.01) at the ConstantLR rate for step t->step + 1. g is left as it is. A NaN or an
 * infinity in g: -1 ("a gradient is NaN"), nothing changed. */
int zi_train_lora_step(zi_train_lora *t, double lr, double weight_decay);
void zi_train_lora_free(zi_train_lora *t);              /* detaches the adapters */

/* torch.optim.lr_scheduler.ConstantLR (factor 1/3, 5 iterations): the rate of optimizer step
 * `step` (1-based): lr/3 for steps 1..5, then lr. */
double zi_train_lr(double lr, int64_t step);
/* torch.optim.AdamW on n float32 parameters; step is 1-based (bias corrections). */
void zi_adamw(float *w, const float *g, float *m, float *v, int64_t n, int64_t step, double lr,
              double beta1, double beta2, double eps, double weight_decay);

/* x_t = (1 − σ)·x0 + σ·noise */
void zi_train_noisy(float *xt, const float *x0, const float *noise, float sigma, int64_t n);
/* DiffSynth's FlowMatchSFTLoss for the raw DiT output `out` (prediction −out, target
 * noise − x0): mean((−out − (noise − x0))²)·weight. When dout is not NULL it receives
 * d loss / d out times grad_scale (1/accumulation steps). */
float zi_train_loss(const float *out, const float *x0, const float *noise, int64_t n, float weight,
                    float grad_scale, float *dout);

/* Where a run stands, for --resume: samples consumed (micro-steps), the sum of their losses,
 * and whether g holds a partial accumulation. config is a string of the settings a resumed run
 * must share (checked on load). The file holds w, the moments and (when partial) g. */
typedef struct { int64_t sample; double loss_sum; int partial; } zi_train_pos;
int zi_train_state_save(const zi_train_lora *t, const zi_train_pos *pos, const char *config, const char *path);
int zi_train_state_load(zi_train_lora *t, zi_train_pos *pos, const char *config, const char *path);


/* ================================================================ distill.c
 * Scheme 3, trajectory-imitation distillation (DiffSynth's TrajectoryImitationLoss; the
 * top of distill.c tells what is kept of its arithmetic and what differs). The teacher is the
 * DiT with the SFT LoRA as frozen run-time adapters, the student the same DiT with the trained
 * LoRA: one copy of the model, adapters swapped between the two. */
typedef struct {
    int teacher_steps, student_steps;   /* 50, 8 */
    float teacher_cfg, student_cfg;     /* classic scales (neg + cfg·(pos − neg)): 2, 1 */
    float shift;                        /* 3 */
} zi_distill_cfg;
zi_distill_cfg zi_distill_default(void);

/* DiffSynth's schedules: the student's (σ, T = 1000σ, loss weight of its training grid) and the
 * teacher's, whose timesteps nearest to the student's are replaced by them (σ's unchanged). */
typedef struct {
    int nt, ns;             /* teacher and student steps */
    float *t_sigma;         /* [nt + 1], t_sigma[nt] = 0 */
    float *t_time;          /* [nt] */
    float *s_sigma;         /* [ns + 1], s_sigma[ns] = 0 */
    float *s_time, *s_weight;   /* [ns] */
    int *idx;               /* [ns + 1] teacher latent index of each student step; idx[ns] = nt */
} zi_distill_sched;
int zi_distill_sched_init(zi_distill_sched *s, const zi_distill_cfg *c);
void zi_distill_sched_free(zi_distill_sched *s);

/* One sample: latent size h, w; prompt features cap [L, D] and (for a cfg > 1) the negative
 * prompt's neg [Ln, D]. */
typedef struct {
    int h, w, L, Ln;
    const float *cap, *neg;
} zi_distill_input;

/* The teacher's Euler trajectory from x_T [C, 1, h, w] with the adapters now attached (training
 * off): traj [(ns + 1)·n] receives the latents at teacher indices idx[0..ns]. 0 or -1. */
int zi_distill_teacher(zi_dit *dit, const zi_distill_sched *s, float cfg, const zi_distill_input *in,
                       const float *xT, float *traj);
/* Target of student step i: (traj[i + 1] − traj[i]) / (σ^s_{i+1} − σ^s_i), |denominator| >= 1e-6. */
void zi_distill_target(const zi_distill_sched *s, int i, const float *traj, int64_t n, float *target);
/* The student's loss L1 = Σ_i w_i·mean((v_i − target_i)²) at the teacher's latents, with the
 * adapters now attached and training on; grad_scale·dL1/dLoRA accumulates into the adapters
 * that have gradients. terms [ns] and v_out [ns·n] (the velocities) may be NULL. NAN on error. */
float zi_distill_student(zi_dit *dit, const zi_distill_sched *s, float cfg, const zi_distill_input *in,
                         const float *traj, float grad_scale, int grad_ckpt, float *terms, float *v_out);
/* Both, for one sample of training: the student's adapters are detached and the teacher LoRA
 * (a zi_lora not applied elsewhere) attached at strength 1 for the teacher's trajectory, then
 * swapped back; the DiT is left in training mode (grad_ckpt). Returns L1 or NAN. */
float zi_distill_sample(zi_dit *dit, zi_train_lora *student, zi_lora *teacher, const zi_distill_sched *s,
                        const zi_distill_cfg *c, const zi_distill_input *in, const float *xT, float grad_scale,
                        int grad_ckpt);

/* ================================================================ convert.c
 * Safetensors written as a stream, for files larger than memory: the header first (names,
 * dtypes, shapes; the tensors' data follows in the order given, without gaps), then the caller
 * writes each tensor's bytes in that order. */
typedef struct {
    const char *name;
    zi_dtype dtype;
    int ndim;
    int64_t shape[ZI_MAXDIM];
} zi_st_entry;
int64_t zi_st_entry_bytes(const zi_st_entry *e);
/* 0, or -1 with an error naming path (used in messages only). */
int zi_st_write_header(FILE *f, const zi_st_entry *e, int n, const char *path);
/* `sample --convert`: copies the directory in_dir (a model directory, or one component) to
 * out_dir with every float32 tensor of its .safetensors files rounded to bfloat16; index files
 * get the new total_size, other files are copied. Tensor by tensor through the mmap, whose pages
 * are dropped once converted: the memory used stays small. 0 or -1. */
int zi_convert_bf16(const char *in_dir, const char *out_dir, int verbose);


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
    zi_rng rng;             /* the torch.randn generator the noise reproduces (ZI_RNG_CPU = 0) */
    int n_lora;
    const char *const *lora_files;
    const float *lora_strengths;
    int lora_merge;         /* merge LoRAs into (copies of) the weights instead of run-time adapters */
    const char *dump;       /* write every intermediate here, or NULL */
    int quiet;              /* no progress on stderr */
    const char *init_image; /* img2img: the starting image (PNG/JPEG, width x height), or NULL */
    double strength;        /* img2img: how much of the schedule to run, (0, 1] (0.6) */
} zi_params;

zi_params zi_params_default(void);  /* the Turbo defaults: 1024², 8 steps, cfg 1, euler */
/* Runs the pipeline; returns the image [3, H, W] in [0, 1] (malloc'd) or NULL.
 * With p->init_image, img2img as diffusers' ZImageImg2ImgPipeline: the image (exactly
 * width x height, 8-bit RGB) is encoded by the VAE and noised to the first of the last
 * steps·strength steps, and those steps are run (only the CPU generator). */
float *zi_generate(const char *model_dir, const zi_params *p);
/* The stages of zi_generate, for programs that keep a DiT loaded (train's previews): */
/* Checks that width x height is a multiple of the VAE factor times the DiT patch (from the
 * configs); *vae_factor receives the VAE's factor. 0 or -1. */
int zi_check_size(const char *model_dir, int width, int height, int *vae_factor);
/* The scheduler config's shift (3 without a scheduler directory); -1 (error set) when the
 * config is there but broken. */
double zi_model_shift(const char *model_dir);
/* img2img: the step to start from, int(max(steps − min(steps·strength, steps), 0)) */
int zi_img2img_start(int steps, double strength);
/* The sampler loop on a loaded DiT (training off): latent size h x w, prompt features pos
 * [Lp, D] and, when p->cfg > 1, the negative prompt's neg [Ln, D]; p gives steps, cfg, sampler,
 * seed and shift (> 0; see zi_model_shift). From the seed's noise, or, when z0 (the init
 * image's latents [C, h, w], zi_encode_image) is given, img2img at p->strength. Returns the
 * final latents [C, h, w] (malloc'd) or NULL. */
float *zi_denoise(zi_dit *dit, const float *pos, int Lp, const float *neg, int Ln, int h, int w, const float *z0,
                  const zi_params *p);
/* img2img: the VAE posterior sample of an RGB image (sizes multiples of the VAE factor) with the
 * CPU generator's first normals of seed, as (z − shift)·scale [C, H/f, W/f]; loads and frees
 * MODEL_DIR/vae. NULL on error. */
float *zi_encode_image(const char *model_dir, const zi_image *im, uint64_t seed);
/* Latents [C, h, w] -> image [3, f·h, f·w] in [0, 1] (malloc'd); loads and frees MODEL_DIR/vae. */
float *zi_decode(const char *model_dir, const float *latents, int h, int w);
/* MODEL_DIR/transformer with p's LoRAs applied (loras[p->n_lora] receives them;
 * free them with zi_lora_free, last first, before zi_dit_free). NULL on error. */
zi_dit *zi_dit_load_with_loras(const char *model_dir, const zi_params *p, zi_lora **loras);
/* zi_generate, then a PNG at path with the settings in its "parameters" text chunk. */
int zi_generate_png(const char *model_dir, const zi_params *p, const char *path);


#endif
