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


/* ================================================================ zimage.c */


#endif
