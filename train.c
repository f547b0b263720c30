/* train.c: LoRA training of the Z-Image DiT on the CPU, scheme 1 of DiffSynth-Studio
 * (standard SFT, examples/z_image/model_training/train.py), with its flags in kebab-case.
 *
 *   ./train MODEL_DIR --dataset-base-path DIR --dataset-metadata-path FILE [options]
 *   ./train MODEL_DIR --eval IN --eval-out OUT --lora FILE[:STRENGTH]
 *
 * A run: read the metadata; encode every image (VAE posterior mean, (mean − shift)·scale) and
 * prompt (text encoder, hidden_states[−2]) once, cached on disk under OUTPUT/cache; release
 * the encoders; then train the LoRA on the DiT alone. Each sample: a grid index i uniform in
 * [0, 1000), σ = grid σ_i, noise n ~ N(0, 1), x_t = (1 − σ)x0 + σn, loss = mean((−DiT(x_t,
 * 1 − σ) − (n − x0))²)·w_i, gradients accumulated over --gradient-accumulation-steps samples
 * (the last step of an epoch takes what is left), AdamW + ConstantLR. Checkpoints:
 * OUTPUT/epoch-K.safetensors after every epoch, OUTPUT/step-N.safetensors every --save-steps
 * samples (N counts samples, as DiffSynth's logger does) and at the end; each save also
 * rewrites OUTPUT/training-state.safetensors, from which --resume continues bit for bit.
 * A run killed at any moment loses nothing saved (save_due), and a NaN or infinite loss or
 * gradient stops it before anything more is written (diverged).
 *
 * Scheme 2 (differential LoRA): --preset-lora FILE[:STRENGTH] merges a LoRA (ostris' training
 * adapter) into the frozen weights before training; it is never saved.
 * Scheme 3 (--task trajectory-imitation, distill.c): each example supplies only its prompt and
 * size; from fresh noise the teacher (the DiT + the --lora-checkpoint LoRA, frozen) runs
 * --teacher-steps Euler steps at --teacher-cfg against the negative prompt "", and the trained
 * LoRA (started from the same checkpoint) learns to follow its path in --student-steps steps at
 * --student-cfg.
 *
 * Previews (--sample-every N): every N optimizer steps the DiT, with the LoRA being trained
 * and without the preset, renders --sample-prompt through zimage.c's sampler and VAE into
 * OUTPUT/sample-STEP.png. */
#include "zimage.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define STATE_FILE "training-state.safetensors"

typedef struct {
    const char *model_dir;
    const char *base_path, *metadata;
    int repeat, epochs, accum, rank, height, width, threads, quiet, grad_ckpt, fast;
    int64_t max_pixels, save_steps;
    double lr, weight_decay;
    const char *targets, *lora_checkpoint, *preset_lora, *output, *resume, *lora_format;
    zi_dtype save_dtype;
    uint64_t seed;
    const char *eval_in, *eval_out, *eval_lora;
    int distill;            /* --task trajectory-imitation (scheme 3) */
    zi_distill_cfg dcfg;
    /* previews: every sample_every optimizer steps (0 = none); steps 0 and cfg < 0 mean the
     * defaults of the scheme, width 0 the default size */
    int64_t sample_every;
    const char *sample_prompt;
    int sample_steps, sample_w, sample_h;
    double sample_cfg;
    uint64_t sample_seed;
} options;

/* One training example, encoded: latents x0 [C, h, w] and prompt features cap [L, D]. */
typedef struct {
    int h, w, L;
    float *x0, *cap;
} sample;

static void usage(void) {
    fprintf(stderr,
        "usage: train MODEL_DIR --dataset-base-path DIR --dataset-metadata-path FILE [options]\n"
        "       train MODEL_DIR --eval IN.safetensors --eval-out OUT.safetensors --lora FILE[:STRENGTH]\n"
        "  --dataset-repeat N             passes over the data per epoch (1)\n"
        "  --num-epochs N                 epochs (1)\n"
        "  --max-pixels N                 largest image area; larger images are scaled down (1048576)\n"
        "  --height N --width N           train at this fixed size instead (multiples of 16)\n"
        "  --learning-rate F              AdamW learning rate (1e-4; lr/3 for the first 5 steps)\n"
        "  --weight-decay F               AdamW weight decay (0.01)\n"
        "  --gradient-accumulation-steps N  samples per optimizer step (1)\n"
        "  --lora-target-modules LIST     Linear layers by name suffix (to_q,to_k,to_v,to_out.0,w1,w2,w3)\n"
        "  --lora-rank N                  (32; alpha = rank)\n"
        "  --lora-checkpoint FILE         start from this LoRA\n"
        "  --preset-lora FILE[:STRENGTH]  merge this LoRA into the DiT first; not trained, not saved\n"
        "                                 (scheme 2; --preset-lora-path is the same)\n"
        "  --task sft|trajectory-imitation  plain SFT (scheme 1) or distillation (scheme 3, needs\n"
        "                                 --lora-checkpoint: the teacher and the starting point)\n"
        "  --teacher-steps N --teacher-cfg F  scheme 3's teacher: Euler steps, classic cfg (50, 2)\n"
        "  --student-steps N --student-cfg F  scheme 3's student (8, 1)\n"
        "  --use-gradient-checkpointing   recompute block activations in the backward (less memory)\n"
        "  --output-path DIR              checkpoints and the encoding cache (./models)\n"
        "  --save-steps N                 also save step-N.safetensors every N samples\n"
        "  --lora-format FORMAT           checkpoint layout: diffsynth, diffusers, comfyui or kohya\n"
        "                                 (diffsynth; --save-format is the same)\n"
        "  --save-dtype bf16|f16|f32      checkpoint dtype (bf16, as DiffSynth)\n"
        "  --resume DIR|FILE              continue from OUTPUT's training-state.safetensors\n"
        "  --seed N                       noise, timesteps, shuffling, LoRA init (0)\n"
        "  --sample-every N               preview OUTPUT/sample-STEP.png every N optimizer steps with\n"
        "                                 the LoRA being trained (without the --preset-lora)\n"
        "  --sample-prompt TEXT           the previews' prompt (required with --sample-every)\n"
        "  --sample-steps N --sample-cfg F  Euler steps and classic cfg (against \"\"): what the LoRA\n"
        "                                 is for: 30 and 2 for plain SFT; 8 and 1 with --preset-lora;\n"
        "                                 --student-steps/--student-cfg for trajectory imitation\n"
        "  --sample-seed N                the previews' noise (0, the same for every preview)\n"
        "  --sample-size WxH              (--width x --height when given, else 512x512)\n"
        "  -t, --threads N                worker threads (all cores)\n"
        "  --fast                         bf16 matrix products (fp32 sums; AMX / AVX512-BF16 where the\n"
        "                                 CPU has them): faster there, no faster elsewhere, not the\n"
        "                                 golden numbers (also ZIMAGE_FAST=1)\n"
        "  -q                             no progress output\n");
}

/* ================================================================ options */

static int parse_int64(const char *flag, const char *s, int64_t lo, int64_t *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < lo) {
        zi_seterr("%s: '%s' is not an integer >= %lld", flag, s, (long long)lo);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_int(const char *flag, const char *s, int lo, int *out) {
    int64_t v;
    if (parse_int64(flag, s, lo, &v)) return -1;
    if (v > INT_MAX) { zi_seterr("%s: '%s' is too large", flag, s); return -1; }
    *out = (int)v;
    return 0;
}

static int parse_double(const char *flag, const char *s, double *out) {
    char *end;
    *out = strtod(s, &end);
    if (*end || end == s || !isfinite(*out) || *out < 0) {
        zi_seterr("%s: '%s' is not a non-negative number", flag, s);
        return -1;
    }
    return 0;
}

/* DiffSynth flags that name things we take from MODEL_DIR or do not need; accepted with their
 * value so that DiffSynth command lines keep working. */
static const char *const ignored_flags[] = {
    "--model-paths", "--model-id-with-origin-paths", "--dataset-num-workers", "--data-file-keys",
    "--remove-prefix-in-ckpt", "--extra-inputs", "--tokenizer-path",
};

static int parse_args(int argc, char **argv, options *o) {
    *o = (options){ .repeat = 1, .epochs = 1, .accum = 1, .rank = 32, .max_pixels = 1024 * 1024, .lr = 1e-4,
                    .weight_decay = 0.01, .targets = "to_q,to_k,to_v,to_out.0,w1,w2,w3", .output = "./models",
                    .lora_format = "diffsynth", .save_dtype = ZI_BF16, .dcfg = zi_distill_default(), .sample_cfg = -1 };
    double cfg;
    for (int i = 1; i < argc; i++) {
        char *a = argv[i], *val = NULL;
        if (a[0] != '-' || !a[1]) {
            if (o->model_dir) { zi_seterr("unexpected argument '%s'", a); return -1; }
            o->model_dir = a;
            continue;
        }
        /* --flag=value or --flag value; DiffSynth's snake_case spelling is accepted too */
        char flag[128];
        snprintf(flag, sizeof flag, "%s", a);
        char *eq = strchr(flag, '=');
        if (eq && flag[1] == '-') { *eq = 0; val = a + (eq - flag) + 1; }
        for (char *p = flag + 2; *p; p++)
            if (*p == '_') *p = '-';
        static const char *const switches[] = {"-q", "--use-gradient-checkpointing", "--fast", "-h", "--help"};
        int is_switch = 0;
        for (size_t k = 0; k < sizeof switches / sizeof switches[0]; k++) is_switch |= !strcmp(flag, switches[k]);
        if (!is_switch && !val) {
            if (i + 1 >= argc) { zi_seterr("%s: missing value", flag); return -1; }
            val = argv[++i];
        }
        int64_t v64;
        int rc = 0;
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help")) { usage(); exit(0); }
        else if (!strcmp(flag, "-q")) o->quiet = 1;
        else if (!strcmp(flag, "--fast")) o->fast = 1;
        else if (!strcmp(flag, "--use-gradient-checkpointing")) o->grad_ckpt = 1;
        else if (!strcmp(flag, "--dataset-base-path")) o->base_path = val;
        else if (!strcmp(flag, "--dataset-metadata-path")) o->metadata = val;
        else if (!strcmp(flag, "--dataset-repeat")) rc = parse_int(flag, val, 1, &o->repeat);
        else if (!strcmp(flag, "--num-epochs")) rc = parse_int(flag, val, 1, &o->epochs);
        else if (!strcmp(flag, "--gradient-accumulation-steps")) rc = parse_int(flag, val, 1, &o->accum);
        else if (!strcmp(flag, "--lora-rank")) rc = parse_int(flag, val, 1, &o->rank);
        else if (!strcmp(flag, "--height")) rc = parse_int(flag, val, 16, &o->height);
        else if (!strcmp(flag, "--width")) rc = parse_int(flag, val, 16, &o->width);
        else if (!strcmp(flag, "-t") || !strcmp(flag, "--threads")) rc = parse_int(flag, val, 1, &o->threads);
        else if (!strcmp(flag, "--max-pixels")) rc = parse_int64(flag, val, 256, &o->max_pixels);
        else if (!strcmp(flag, "--save-steps")) rc = parse_int64(flag, val, 1, &o->save_steps);
        else if (!strcmp(flag, "--seed")) { rc = parse_int64(flag, val, 0, &v64); o->seed = (uint64_t)v64; }
        else if (!strcmp(flag, "--learning-rate")) rc = parse_double(flag, val, &o->lr);
        else if (!strcmp(flag, "--weight-decay")) rc = parse_double(flag, val, &o->weight_decay);
        else if (!strcmp(flag, "--lora-target-modules")) o->targets = val;
        else if (!strcmp(flag, "--lora-checkpoint")) o->lora_checkpoint = val;
        else if (!strcmp(flag, "--preset-lora-path") || !strcmp(flag, "--preset-lora")) o->preset_lora = val;
        else if (!strcmp(flag, "--teacher-steps")) rc = parse_int(flag, val, 1, &o->dcfg.teacher_steps);
        else if (!strcmp(flag, "--student-steps")) rc = parse_int(flag, val, 1, &o->dcfg.student_steps);
        else if (!strcmp(flag, "--teacher-cfg")) { rc = parse_double(flag, val, &cfg); o->dcfg.teacher_cfg = (float)cfg; }
        else if (!strcmp(flag, "--student-cfg")) { rc = parse_double(flag, val, &cfg); o->dcfg.student_cfg = (float)cfg; }
        else if (!strcmp(flag, "--output-path")) o->output = val;
        else if (!strcmp(flag, "--resume")) o->resume = val;
        else if (!strcmp(flag, "--lora-format") || !strcmp(flag, "--save-format")) o->lora_format = val;
        else if (!strcmp(flag, "--sample-every")) rc = parse_int64(flag, val, 1, &o->sample_every);
        else if (!strcmp(flag, "--sample-prompt")) o->sample_prompt = val;
        else if (!strcmp(flag, "--sample-steps")) rc = parse_int(flag, val, 1, &o->sample_steps);
        else if (!strcmp(flag, "--sample-cfg")) rc = parse_double(flag, val, &o->sample_cfg);
        else if (!strcmp(flag, "--sample-seed")) { rc = parse_int64(flag, val, 0, &v64); o->sample_seed = (uint64_t)v64; }
        else if (!strcmp(flag, "--sample-size")) {
            char end;
            if (sscanf(val, "%dx%d%c", &o->sample_w, &o->sample_h, &end) != 2 || o->sample_w < 16 || o->sample_h < 16) {
                zi_seterr("--sample-size: '%s' is not WIDTHxHEIGHT", val);
                rc = -1;
            }
        }
        else if (!strcmp(flag, "--eval")) o->eval_in = val;
        else if (!strcmp(flag, "--eval-out")) o->eval_out = val;
        else if (!strcmp(flag, "--lora")) o->eval_lora = val;
        else if (!strcmp(flag, "--save-dtype")) {
            char up[8] = "";    /* zi_dtype_parse takes the safetensors spelling: BF16 */
            for (size_t i = 0; val[i] && i + 1 < sizeof up; i++) up[i] = (char)toupper((unsigned char)val[i]);
            zi_dtype t;
            if (strlen(val) >= sizeof up || zi_dtype_parse(up, &t) || (t != ZI_BF16 && t != ZI_F16 && t != ZI_F32)) {
                zi_seterr("--save-dtype: '%s' is not bf16, f16 or f32", val);
                rc = -1;
            } else o->save_dtype = t;
        } else if (!strcmp(flag, "--lora-base-model") || !strcmp(flag, "--preset-lora-model")) {
            if (strcmp(val, "dit")) { zi_seterr("%s: only 'dit' is supported (got '%s')", flag, val); rc = -1; }
        } else if (!strcmp(flag, "--task")) {
            o->distill = !strcmp(val, "trajectory-imitation") || !strcmp(val, "trajectory_imitation");
            if (!o->distill && strcmp(val, "sft")) {
                zi_seterr("--task: '%s' is not sft or trajectory-imitation", val);
                rc = -1;
            }
        } else {
            int known = 0;
            for (size_t k = 0; k < sizeof ignored_flags / sizeof ignored_flags[0]; k++) known |= !strcmp(flag, ignored_flags[k]);
            if (!known) { zi_seterr("unknown option '%s' (see train --help)", a); return -1; }
        }
        if (rc) return -1;
    }
    if (!o->model_dir) { zi_seterr("no MODEL_DIR given (see train --help)"); return -1; }
    if ((o->height > 0) != (o->width > 0)) { zi_seterr("--height and --width go together"); return -1; }
    if (o->height % 16 || o->width % 16) { zi_seterr("--height/--width: %dx%d is not a multiple of 16", o->width, o->height); return -1; }
    static const char *const formats[] = {"diffsynth", "diffusers", "comfyui", "kohya"};
    int format_ok = 0;
    for (int k = 0; k < 4; k++) format_ok |= !strcmp(o->lora_format, formats[k]);
    if (!format_ok) {
        zi_seterr("--lora-format: '%s' is not diffsynth, diffusers, comfyui or kohya", o->lora_format);
        return -1;
    }
    if (o->sample_every && !o->sample_prompt) { zi_seterr("--sample-every needs --sample-prompt"); return -1; }
    if (o->distill && !o->lora_checkpoint) {
        zi_seterr("--task trajectory-imitation: --lora-checkpoint (the SFT LoRA: teacher and start) is required");
        return -1;
    }
    if (!o->eval_in && (!o->base_path || !o->metadata)) {
        zi_seterr("--dataset-base-path and --dataset-metadata-path are required");
        return -1;
    }
    return 0;
}

/* "FILE[:STRENGTH]" -> FILE (malloc'd) and the strength (1 without one). */

/* ================================================================ files */

/* mkdir -p; each directory made is fsync'd into its parent ("DIR/.." is the parent of a real
 * directory), so that a power cut does not take it and the checkpoints in it away */
static int mkdirs(const char *path) {
    char *p = zi_strdup(path);
    for (char *s = p + 1;; s++) {
        if (*s != '/' && *s) continue;
        char c = *s;
        *s = 0;
        if (mkdir(p, 0777) == 0) {
            char *parent = zi_path("%s/..", p);
            int fd = open(parent, O_RDONLY | O_DIRECTORY);
            if (fd >= 0) {
                (void)fsync(fd);    /* best effort, as the directory exists either way */
                close(fd);
            }
            free(parent);
        } else if (errno != EEXIST) {
            zi_seterr("%s: cannot create directory: %s", p, strerror(errno));
            free(p);
            return -1;
        }
        if (!c) break;
        *s = c;
    }
    free(p);
    return 0;
}

/* os.path.join(base, rel): an absolute rel stands alone */
static char *join(const char *base, const char *rel) {
    if (rel[0] == '/' || !base[0]) return zi_strdup(rel);
    size_t n = strlen(base);
    return zi_path("%s%s%s", base, base[n - 1] == '/' ? "" : "/", rel);
}

/* FNV-1a over a field with its NUL (the NUL separates fields) */
static uint64_t fnv_str(uint64_t h, const char *s) { return zi_fnv1a(h, s, strlen(s) + 1); }

/* Puts "META: row N: " before the current error (zi_err()'s buffer is reused by zi_seterr). */
static void row_error(const char *meta, int row) {
    char *e = zi_strdup(zi_err());
    zi_seterr("%s: row %d: %s", meta, row, e);
    free(e);
}

/* ================================================================ encoding the dataset */

typedef struct {
    const options *o;
    char *model;            /* realpath of MODEL_DIR, part of every cache key */
    zi_tokenizer *tok;
    zi_te *te;
    zi_vae *vae;
} encoders;

/* The cache key of one example: what its latents and features depend on. The image file is
 * identified by its real path, size and modification time. */
static uint64_t cache_key(const encoders *e, const char *image, const struct stat *st, const char *prompt) {
    char *real = realpath(image, NULL), num[160];
    uint64_t h = fnv_str(ZI_FNV1A_BASIS, "zimage.c train cache v1");
    h = fnv_str(h, e->model);
    h = fnv_str(h, real ? real : image);
    snprintf(num, sizeof num, "%lld %lld.%09ld %d %d %lld", (long long)st->st_size, (long long)st->st_mtim.tv_sec,
             st->st_mtim.tv_nsec, e->o->height, e->o->width, (long long)e->o->max_pixels);
    h = fnv_str(h, num);
    free(real);
    return fnv_str(h, prompt);
}

static int load_text_encoder(encoders *e) {
    if (e->te) return 0;
    char *te_dir = zi_path("%s/text_encoder", e->o->model_dir);
    e->tok = zi_tok_load(e->o->model_dir);
    e->te = e->tok ? zi_te_load(te_dir) : NULL;
    free(te_dir);
    return e->te ? 0 : -1;
}

static int load_encoders(encoders *e) {
    if (e->vae) return 0;
    char *vae_dir = zi_path("%s/vae", e->o->model_dir);
    if (!e->o->quiet) fprintf(stderr, "loading the text encoder and the VAE to encode the dataset\n");
    e->vae = load_text_encoder(e) == 0 ? zi_vae_load(vae_dir) : NULL;
    free(vae_dir);
    return e->vae ? 0 : -1;
}

static void free_encoders(encoders *e) {
    zi_vae_free(e->vae);
    zi_te_free(e->te);
    zi_tok_free(e->tok);
    e->vae = NULL; e->te = NULL; e->tok = NULL;
}

/* Features of a prompt that is not an example's: scheme 3's negative prompt, the previews'. */
typedef struct {
    const char *text;
    float *f;               /* [L, D] */
    int L;
} features;

/* The chat-templated prompt through the text encoder (loaded), D wide as the DiT takes it. */
static int encode_text(encoders *e, int D, features *t) {
    int32_t *ids = NULL;
    t->L = zi_tok_chat(e->tok, t->text, ZI_MAX_TOKENS, &ids);
    if (t->L < 0) zi_seterr("prompt is not valid UTF-8");
    else if (zi_te_dim(e->te) != D)
        zi_seterr("%s: text features are %d wide, the DiT takes %d", e->o->model_dir, zi_te_dim(e->te), D);
    else t->f = zi_te_encode(e->te, ids, t->L);
    free(ids);
    return t->f ? 0 : -1;
}

/* DiffSynth's data pipeline for one row: image -> RGB -> training size -> [-1, 1] -> VAE
 * posterior mean -> (mean − shift)·scale; prompt -> chat template -> text encoder. */
static int encode(encoders *e, const char *image, const char *prompt, int D, int row, sample *s) {
    const char *meta = e->o->metadata;
    zi_image im = {0}, crop = {0};
    if (zi_image_load(image, &im)) { row_error(meta, row); return -1; }
    int tw, th;
    zi_train_size(im.w, im.h, e->o->height, e->o->width, e->o->max_pixels, &tw, &th);
    if (tw < 16 || th < 16) {
        zi_seterr("%s: row %d: %s: %dx%d is too small to train on", meta, row, image, im.w, im.h);
        zi_image_free(&im);
        return -1;
    }
    int rc = zi_image_resize_crop(&im, tw, th, &crop);
    zi_image_free(&im);
    if (rc) { row_error(meta, row); return -1; }
    float *px = zi_malloc((size_t)3 * tw * th * sizeof(float)), *mean = NULL, *logvar = NULL;
    zi_image_to_float(crop.px, tw, th, px, 0);
    zi_image_free(&crop);
    rc = zi_vae_encode(e->vae, px, th, tw, &mean, &logvar);
    free(px);
    free(logvar);
    if (rc) { row_error(meta, row); return -1; }
    int f = zi_vae_factor(e->vae), C = zi_vae_latent_channels(e->vae);
    float shift = zi_vae_shift(e->vae), scale = zi_vae_scaling(e->vae);
    s->h = th / f;
    s->w = tw / f;
    for (int64_t i = 0; i < (int64_t)C * s->h * s->w; i++) mean[i] = (mean[i] - shift) * scale;
    s->x0 = mean;

    features t = { .text = prompt };
    if (encode_text(e, D, &t)) { row_error(meta, row); return -1; }
    s->cap = t.f;
    s->L = t.L;
    return 0;
}

static int cache_read(const char *path, int C, int D, sample *s) {
    zi_st *st = zi_st_open(path);
    if (!st) return -1;
    const zi_tensor *x = zi_st_get(st, "latents"), *c = zi_st_get(st, "prompt_embeds");
    int ok = x && c && x->dtype == ZI_F32 && c->dtype == ZI_F32 && x->ndim == 3 && x->shape[0] == C && c->ndim == 2 &&
             c->shape[1] == D && c->shape[0] >= 1 && c->shape[0] <= ZI_MAX_TOKENS;
    if (ok) {
        s->h = (int)x->shape[1];
        s->w = (int)x->shape[2];
        s->L = (int)c->shape[0];
        s->x0 = zi_tensor_f32(x);
        s->cap = zi_tensor_f32(c);
    }
    zi_st_close(st);
    return ok ? 0 : -1;
}

static int cache_write(const char *path, int C, const sample *s, int D, const char *image, const char *prompt) {
    zi_stw *w = zi_stw_new();
    zi_stw_add_f32(w, "latents", 3, (int64_t[]){C, s->h, s->w}, s->x0);
    zi_stw_add_f32(w, "prompt_embeds", 2, (int64_t[]){s->L, D}, s->cap);
    zi_stw_meta(w, "image", image);
    zi_stw_meta(w, "prompt", prompt);
    int rc = zi_stw_write(w, path);
    zi_stw_free(w);
    return rc;
}

/* Every row encoded (from the cache where possible), and the n_extra prompts of extra; the
 * encoders are loaded only when something is missing (the VAE only for images) and freed
 * before returning, so that training holds the DiT alone. */
static sample *encode_dataset(const options *o, const zi_train_meta *meta, int C, int D, features *extra, int n_extra) {
    encoders e = { .o = o, .model = realpath(o->model_dir, NULL) };
    if (!e.model) { zi_seterr("%s: %s", o->model_dir, strerror(errno)); return NULL; }
    char *cache_dir = zi_path("%s/cache", o->output);
    sample *s = zi_calloc((size_t)meta->n, sizeof *s);
    int ok = mkdirs(cache_dir) == 0, cached = 0;
    for (int i = 0; ok && i < meta->n; i++) {
        char *image = join(o->base_path, meta->items[i].image);
        struct stat st;
        if (stat(image, &st)) {
            zi_seterr("%s: row %d: %s: %s", o->metadata, i + 1, image, strerror(errno));
            ok = 0;
        } else {
            char *path = zi_path("%s/%016llx.safetensors", cache_dir,
                                 (unsigned long long)cache_key(&e, image, &st, meta->items[i].prompt));
            if (cache_read(path, C, D, &s[i]) == 0) cached++;
            else {
                ok = load_encoders(&e) == 0 && encode(&e, image, meta->items[i].prompt, D, i + 1, &s[i]) == 0;
                ok = ok && cache_write(path, C, &s[i], D, image, meta->items[i].prompt) == 0;
                if (ok && !o->quiet) zi_progress("encoded %d/%d", i + 1, meta->n);
            }
            free(path);
        }
        free(image);
    }
    zi_progress_end();
    if (ok && !o->quiet)
        fprintf(stderr, "dataset: %d examples (%d from the cache in %s)\n", meta->n, cached, cache_dir);
    for (int i = 0; ok && i < n_extra; i++) ok = load_text_encoder(&e) == 0 && encode_text(&e, D, &extra[i]) == 0;
    free_encoders(&e);
    free(e.model);
    free(cache_dir);
    if (!ok) {
        for (int i = 0; i < meta->n; i++) { free(s[i].x0); free(s[i].cap); }
        free(s);
        return NULL;
    }
    return s;
}

/* ================================================================ one training step */

typedef struct {
    zi_dit *dit;
    int C;
    float *xt, *noise, *out, *dout;     /* [C, h, w] of the largest example */
    /* scheme 3: the teacher LoRA (NULL for SFT), the schedules, the negative prompt's features */
    zi_lora *teacher;
    const zi_distill_cfg *dcfg;
    zi_distill_sched sched;
    const float *neg;
    int Ln, grad_ckpt;
} worker;

/* Forward and backward of one example at grid point (σ, weight): accumulates the gradients
 * (scaled by grad_scale) into the LoRA's g and sets *loss. Returns 0 or -1 (error set). */
static int train_sample(worker *wk, const sample *s, float sigma, float weight, float grad_scale, uint64_t noise_seed,
                        float *loss) {
    int64_t n = (int64_t)wk->C * s->h * s->w;
    zi_randn(wk->noise, n, noise_seed, ZI_RNG_CPU);
    zi_train_noisy(wk->xt, s->x0, wk->noise, sigma, n);
    float t = zi_flow_t(sigma);
    const float *x = wk->xt, *cap = s->cap;
    float *out = wk->out;
    if (zi_dit_forward(wk->dit, 1, &x, &s->h, &s->w, &t, &cap, &s->L, &out)) return -1;
    *loss = zi_train_loss(wk->out, s->x0, wk->noise, n, weight, grad_scale, wk->dout);
    return zi_dit_backward(wk->dit, wk->dout);
}

/* Scheme 3: the example gives its prompt and size; x_T is fresh noise (distill.c). Sets *loss;
 * returns 0 or -1 (error set). zi_distill_sample answers NAN both for an error and for a loss
 * that diverged; an error is the one that leaves a message in place of the one set here. */
static int distill_sample(worker *wk, zi_train_lora *lora, const sample *s, float grad_scale, uint64_t noise_seed,
                          float *loss) {
    static const char *const no_error = "distill: no error";
    zi_randn(wk->noise, (int64_t)wk->C * s->h * s->w, noise_seed, ZI_RNG_CPU);
    zi_distill_input in = { .h = s->h, .w = s->w, .L = s->L, .Ln = wk->Ln, .cap = s->cap, .neg = wk->neg };
    zi_seterr("%s", no_error);
    *loss = zi_distill_sample(wk->dit, lora, wk->teacher, &wk->sched, wk->dcfg, &in, wk->noise, grad_scale,
                              wk->grad_ckpt);
    return isnan(*loss) && strcmp(zi_err(), no_error) ? -1 : 0;
}

/* ================================================================ checkpoints */

typedef struct {
    const options *o;
    zi_train_lora *lora;
    const char *config;
    int64_t per_epoch, total;   /* samples */
} saver;

/* The checkpoints due once pos->sample samples are done: step-N every --save-steps samples and
 * at the end, epoch-K at the end of epoch K. All of them are written before the state that
 * records the position (which holds the LoRA weights itself), so that a state never stands past
 * a checkpoint that is missing: a run killed anywhere in between resumes from the previous
 * state, redoes the samples since, and writes the same files again, the same bytes. Every file
 * is written to a temporary, fsync'd and renamed (zi_stw_write). */
static int save_due(const saver *sv, const zi_train_pos *pos) {
    const options *o = sv->o;
    int64_t s = pos->sample;
    char *names[2];
    int n = 0;
    if (o->save_steps && (s % o->save_steps == 0 || s == sv->total))
        names[n++] = zi_path("%s/step-%lld.safetensors", o->output, (long long)s);
    if (s % sv->per_epoch == 0) names[n++] = zi_path("%s/epoch-%lld.safetensors", o->output, (long long)(s / sv->per_epoch - 1));
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) {
        rc = zi_lora_save(&sv->lora->lora, names[i], o->lora_format, o->save_dtype, "Tongyi-MAI/Z-Image-Turbo");
        if (!rc && !o->quiet) fprintf(stderr, "saved %s\n", names[i]);
    }
    if (n && !rc) {
        char *state = zi_path("%s/" STATE_FILE, o->output);
        rc = zi_train_state_save(sv->lora, pos, sv->config, state);
        free(state);
    }
    for (int i = 0; i < n; i++) free(names[i]);
    return rc;
}

static char *fmt_time(double s, char *buf, size_t n) {
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
    return buf;
}

/* ================================================================ previews */

/* --sample-every: the DiT with the LoRA being trained (its run-time adapters) renders the
 * preview prompt through zimage.c's sampler (zi_denoise) and VAE (zi_decode). What a LoRA is
 * judged by is the model it is meant for: scheme 2's preset (the training adapter) is lifted
 * out of the weights for the preview and merged again after (zi_lora_remove restores the
 * original weights, and merging again gives the same bits). Training is off meanwhile (a
 * CFG pair is a batch of two, which the training forward refuses), between optimizer steps,
 * where nothing is kept; the training's random numbers are hashes of counters, untouched. */
typedef struct {
    const options *o;
    zi_dit *dit;
    zi_lora *preset;        /* merged scheme 2 LoRA, or NULL */
    float preset_strength;
    zi_lin *const *lins;
    int nlin;
    const features *pos, *neg;  /* neg: "" when cfg > 1, else NULL */
    int h, w, factor;       /* latent size, VAE factor */
    zi_params p;
} previewer;

/* Fills pv's settings (the scheme's defaults where not given) and checks the size. */
static int preview_setup(const options *o, previewer *pv) {
    int W = o->sample_w ? o->sample_w : o->width ? o->width : 512;
    int H = o->sample_w ? o->sample_h : o->height ? o->height : 512;
    if (zi_check_size(o->model_dir, W, H, &pv->factor)) return -1;
    pv->h = H / pv->factor;
    pv->w = W / pv->factor;
    zi_params *p = &pv->p;
    *p = zi_params_default();
    p->prompt = o->sample_prompt;
    p->width = W;
    p->height = H;
    p->steps = o->sample_steps ? o->sample_steps : o->distill ? o->dcfg.student_steps : o->preset_lora ? 8 : 30;
    p->cfg = o->sample_cfg >= 0 ? (float)o->sample_cfg : o->distill ? o->dcfg.student_cfg : o->preset_lora ? 1.0f : 2.0f;
    p->seed = o->sample_seed;
    if ((p->shift = (float)zi_model_shift(o->model_dir)) < 0) return -1;
    p->quiet = 1;
    if (!o->quiet)
        fprintf(stderr, "previews every %lld steps: %dx%d, %d steps, cfg %g, seed %llu\n", (long long)o->sample_every, W, H,
                p->steps, p->cfg, (unsigned long long)p->seed);
    return 0;
}

static int preview(const previewer *pv, int64_t step) {
    const options *o = pv->o;
    zi_dit_set_training(pv->dit, 0, 0);
    if (pv->preset) zi_lora_remove(pv->preset);
    float *lat = zi_denoise(pv->dit, pv->pos->f, pv->pos->L, pv->neg ? pv->neg->f : NULL, pv->neg ? pv->neg->L : 0,
                            pv->h, pv->w, NULL, &pv->p);
    int rc = lat ? 0 : -1;
    if (pv->preset && zi_lora_apply(pv->preset, pv->lins, pv->nlin, pv->preset_strength, 1, 0) < 0) rc = -1;
    zi_dit_set_training(pv->dit, 1, o->grad_ckpt);
    float *img = rc ? NULL : zi_decode(o->model_dir, lat, pv->h, pv->w);   /* loaded and freed: memory */
    free(lat);
    if (!img) return -1;
    int W = pv->p.width, H = pv->p.height;
    uint8_t *rgb = zi_malloc((size_t)3 * W * H);
    zi_image_from_float(img, W, H, rgb);
    free(img);
    char *path = zi_path("%s/sample-%lld.png", o->output, (long long)step);
    char *text = zi_path("%s\nSteps: %d, Sampler: euler, CFG scale: %g, Seed: %llu, Size: %dx%d, LoRA training step: %lld",
                         pv->p.prompt, pv->p.steps, pv->p.cfg, (unsigned long long)pv->p.seed, W, H, (long long)step);
    const char *kv[2] = {"parameters", text};
    rc = zi_png_write(path, rgb, W, H, kv, 1);      /* atomic: a temporary file renamed */
    if (!rc && !o->quiet) fprintf(stderr, "preview %s\n", path);
    free(text);
    free(path);
    free(rgb);
    return rc;
}

/* ================================================================ training */

/* --lora-checkpoint, then --resume (which overrides the weights and sets the position). */
static int start_from(const options *o, zi_train_lora *lora, const char *config, int64_t total, zi_train_pos *pos) {
    if (o->lora_checkpoint) {
        zi_lora *l = zi_lora_load(o->lora_checkpoint);
        int k = l ? zi_train_lora_load_weights(lora, l) : -1;
        zi_lora_free(l);
        if (k < 0) return -1;
        if (!o->quiet) fprintf(stderr, "started from %s (%d of %d modules)\n", o->lora_checkpoint, k, lora->lora.n);
    }
    if (!o->resume) return 0;
    struct stat st;
    char *state = stat(o->resume, &st) == 0 && S_ISDIR(st.st_mode) ? zi_path("%s/" STATE_FILE, o->resume)
                                                                     : zi_strdup(o->resume);
    int rc = zi_train_state_load(lora, pos, config, state);
    if (!rc && pos->sample > total) {
        zi_seterr("--resume: %s is past the end (%lld samples of %lld)", state, (long long)pos->sample, (long long)total);
        rc = -1;
    }
    if (!rc && !o->quiet)
        fprintf(stderr, "resumed from %s: %lld samples, %lld steps done\n", state, (long long)pos->sample,
                (long long)lora->step);
    free(state);
    return rc;
}

static void progress(const options *o, const zi_train_lora *lora, const zi_train_pos *pos, int epoch, double step_loss,
                     int64_t total_steps, int64_t steps_at_start, double t0) {
    double el = zi_now() - t0, per = el / (double)(lora->step - steps_at_start);
    char b1[32], b2[32];
    fprintf(stderr, "step %lld/%lld  epoch %d  loss %.5f (mean %.5f)  lr %.3g  %.2f s/step  elapsed %s  ETA %s\n",
            (long long)lora->step, (long long)total_steps, epoch, step_loss, pos->loss_sum / (double)pos->sample,
            zi_train_lr(o->lr, lora->step), per, fmt_time(el, b1, sizeof b1),
            fmt_time(per * (double)(total_steps - lora->step), b2, sizeof b2));
}

/* A NaN or an infinity in the loss or the gradients stops the run before the optimizer step
 * and before any save: the checkpoints and the state on disk stay those of the last good step.
 * Puts "step N (sample S): " before the current error. */
static int diverged(const zi_train_lora *lora, int64_t sample) {
    char *why = zi_strdup(zi_err());
    zi_seterr("step %lld (sample %lld): %s; stopped, the checkpoints saved before it are kept",
              (long long)lora->step + 1, (long long)sample, why);
    free(why);
    return -1;
}

/* The epochs from pos on: shuffled passes over rows × repeat examples, an optimizer step
 * every --gradient-accumulation-steps samples and at the end of each epoch, saves. */
static int train_loop(const options *o, worker *wk, const saver *sv, const previewer *pv, const sample *data, int rows,
                      zi_train_pos *pos) {
    zi_train_lora *lora = sv->lora;
    static float sigmas[ZI_TRAIN_GRID], weights[ZI_TRAIN_GRID];
    zi_train_grid(ZI_TRAIN_GRID, 3.0f, sigmas, weights);
    int64_t per_epoch = sv->per_epoch;
    int64_t total_steps = (per_epoch + o->accum - 1) / o->accum * o->epochs, steps_at_start = lora->step;
    int *perm = zi_malloc((size_t)per_epoch * sizeof *perm);
    double t0 = zi_now(), step_loss = 0;
    int rc = 0;
    if (!o->quiet)
        fprintf(stderr, "training %d LoRA modules (%lld parameters) on %d examples x %d, %d epochs: %lld steps\n",
                lora->lora.n, (long long)lora->n_params, rows, o->repeat, o->epochs, (long long)total_steps);
    for (int epoch = (int)(pos->sample / per_epoch); !rc && epoch < o->epochs; epoch++) {
        zi_train_perm(perm, (int)per_epoch, o->seed, epoch);
        for (int64_t j = pos->sample - epoch * per_epoch; !rc && j < per_epoch; j++) {
            int gi = zi_train_timestep(o->seed, pos->sample, ZI_TRAIN_GRID);
            /* accelerate divides every loss by the accumulation steps, also in the shorter
             * last step of an epoch */
            const sample *s = &data[perm[j] % rows];
            uint64_t noise_seed = zi_train_noise_seed(o->seed, pos->sample);
            float loss;
            rc = wk->teacher ? distill_sample(wk, lora, s, 1.0f / (float)o->accum, noise_seed, &loss)
                             : train_sample(wk, s, sigmas[gi], weights[gi], 1.0f / (float)o->accum, noise_seed, &loss);
            if (!rc && !isfinite(loss)) {
                zi_seterr("the loss is %s", isnan(loss) ? "NaN" : "infinite");
                rc = diverged(lora, pos->sample + 1);
            }
            if (rc) break;
            pos->sample++;
            pos->loss_sum += loss;
            pos->partial = 1;
            step_loss += loss;
            if ((j + 1) % o->accum == 0 || j + 1 == per_epoch) {
                if (zi_train_lora_step(lora, o->lr, o->weight_decay)) { rc = diverged(lora, pos->sample); break; }
                zi_train_lora_zero_grad(lora);
                pos->partial = 0;
                if (!o->quiet)
                    progress(o, lora, pos, epoch, step_loss / (double)(j % o->accum + 1), total_steps, steps_at_start, t0);
                step_loss = 0;
                if (pv && lora->step % o->sample_every == 0) {
                    double t1 = zi_now();
                    rc = preview(pv, lora->step);
                    t0 += zi_now() - t1;    /* the rates and ETA are the training's */
                    if (rc) break;
                }
            }
            rc = save_due(sv, pos);
        }
    }
    free(perm);
    return rc;
}

/* Scheme 3: the teacher (the --lora-checkpoint file, attached only for its trajectories),
 * the schedules and, when either side is guided, the negative prompt's features. */
static int distill_setup(const options *o, worker *wk, const features *neg) {
    const zi_distill_cfg *c = &o->dcfg;
    wk->dcfg = c;
    wk->grad_ckpt = o->grad_ckpt;
    if (zi_distill_sched_init(&wk->sched, c) || !(wk->teacher = zi_lora_load(o->lora_checkpoint))) return -1;
    if (c->teacher_cfg != 1.0f || c->student_cfg != 1.0f) {
        wk->neg = neg->f;
        wk->Ln = neg->L;
    }
    if (!o->quiet)
        fprintf(stderr, "trajectory imitation: teacher %s, %d steps at cfg %g; student %d steps at cfg %g\n",
                o->lora_checkpoint, c->teacher_steps, c->teacher_cfg, c->student_steps, c->student_cfg);
    return 0;
}

static int train(const options *o) {
    zi_train_meta meta;
    if (zi_train_meta_load(o->metadata, &meta)) return -1;
    if ((int64_t)meta.n * o->repeat > INT_MAX) {
        zi_seterr("--dataset-repeat: %d rows x %d is too many examples per epoch", meta.n, o->repeat);
        zi_train_meta_free(&meta);
        return -1;
    }
    previewer pv = { .o = o };
    char *dit_dir = zi_path("%s/transformer", o->model_dir);
    zi_dit *dit = mkdirs(o->output) || (o->sample_every && preview_setup(o, &pv)) ? NULL : zi_dit_load(dit_dir);
    free(dit_dir);
    if (!dit) { zi_train_meta_free(&meta); return -1; }
    const zi_dit_cfg *cfg = zi_dit_config(dit);
    int C = cfg->in_channels, nlin, rc = -1;
    zi_lin *const *lins = zi_dit_lins(dit, &nlin);
    /* prompts encoded beside the dataset: the negative "" (scheme 3's guidance, guided
     * previews) and the preview prompt */
    features extra[2] = {{.text = ""}, {.text = o->sample_prompt}};
    int need_neg = (o->distill && (o->dcfg.teacher_cfg != 1.0f || o->dcfg.student_cfg != 1.0f)) ||
                   (o->sample_every && pv.p.cfg > 1);
    features *todo = need_neg ? extra : extra + 1;
    sample *data = encode_dataset(o, &meta, C, cfg->cap_feat_dim, todo, need_neg + (o->sample_every ? 1 : 0));
    /* DiffSynth's --preset_lora_path (scheme 2): fused into the frozen weights at strength 1
     * (in their dtype), before the trained LoRA is attached */
    float preset_strength = 1.0f;
    char *preset_file = o->preset_lora ? zi_lora_arg(o->preset_lora, &preset_strength) : NULL;
    zi_lora *preset = data && preset_file ? zi_lora_load(preset_file) : NULL;
    free(preset_file);
    int preset_ok = !o->preset_lora ||
                    (preset && zi_lora_apply(preset, lins, nlin, preset_strength, 1, !o->quiet) > 0);
    zi_train_lora *lora = data && preset_ok ? zi_train_lora_new(lins, nlin, o->targets, o->rank, o->seed) : NULL;

    /* everything a resumed run must share with the run that wrote the state */
    char *config = zi_path(
             "rank=%d targets=%s lr=%.17g weight_decay=%.17g accum=%d repeat=%d seed=%llu rows=%d max_pixels=%lld "
             "size=%dx%d checkpoint=%s preset=%s task=%s teacher=%d,%.9g student=%d,%.9g", o->rank, o->targets, o->lr,
             o->weight_decay, o->accum, o->repeat, (unsigned long long)o->seed, meta.n, (long long)o->max_pixels,
             o->width, o->height, o->lora_checkpoint ? o->lora_checkpoint : "none",
             o->preset_lora ? o->preset_lora : "none", o->distill ? "trajectory-imitation" : "sft",
             o->dcfg.teacher_steps, o->dcfg.teacher_cfg, o->dcfg.student_steps, o->dcfg.student_cfg);
    zi_train_pos pos = {0};
    if (lora && start_from(o, lora, config, (int64_t)meta.n * o->repeat * o->epochs, &pos) == 0) {
        zi_dit_set_training(dit, 1, o->grad_ckpt);
        int64_t maxn = 0;
        for (int i = 0; i < meta.n; i++)
            if ((int64_t)C * data[i].h * data[i].w > maxn) maxn = (int64_t)C * data[i].h * data[i].w;
        worker wk = { .dit = dit, .C = C, .xt = zi_malloc(maxn * sizeof(float)), .noise = zi_malloc(maxn * sizeof(float)),
                      .out = zi_malloc(maxn * sizeof(float)), .dout = zi_malloc(maxn * sizeof(float)) };
        saver sv = { o, lora, config, (int64_t)meta.n * o->repeat, (int64_t)meta.n * o->repeat * o->epochs };
        pv.dit = dit; pv.preset = preset; pv.preset_strength = preset_strength; pv.lins = lins; pv.nlin = nlin;
        pv.pos = &extra[1]; pv.neg = pv.p.cfg > 1 ? &extra[0] : NULL;
        if (!o->distill || distill_setup(o, &wk, &extra[0]) == 0)
            rc = train_loop(o, &wk, &sv, o->sample_every ? &pv : NULL, data, meta.n, &pos);
        free(wk.xt); free(wk.noise); free(wk.out); free(wk.dout);
        zi_lora_free(wk.teacher);
        zi_distill_sched_free(&wk.sched);
    }
    zi_train_lora_free(lora);
    zi_lora_free(preset);
    free(config);
    for (int i = 0; i < 2; i++) free(extra[i].f);
    for (int i = 0; data && i < meta.n; i++) { free(data[i].x0); free(data[i].cap); }
    free(data);
    zi_dit_free(dit);
    zi_train_meta_free(&meta);
    return rc;
}

/* ================================================================ --eval */

/* One training step's loss and gradients for the LoRA of --lora, nothing updated: inputs
 * train.x0, train.noise [C,1,h,w], train.sigma [1], train.cap [L,D]; outputs train.loss (plain
 * mean squared error) and grad.<module>.lora_A / lora_B. */
static int eval(const options *o) {
    if (!o->eval_out || !o->eval_lora) { zi_seterr("--eval needs --eval-out and --lora"); return -1; }
    float strength;
    char *file = zi_lora_arg(o->eval_lora, &strength);
    char *dit_dir = zi_path("%s/transformer", o->model_dir);
    zi_st *in = file ? zi_st_open(o->eval_in) : NULL;
    zi_dit *dit = in ? zi_dit_load(dit_dir) : NULL;
    zi_lora *l = dit ? zi_lora_load(file) : NULL;
    free(dit_dir);
    free(file);
    zi_train_lora *t = NULL;
    float *x0 = NULL, *noise = NULL, *sig = NULL, *cap = NULL, *xt = NULL, *out = NULL, *dout = NULL;
    int rc = -1;
    if (!l) goto done;
    const zi_dit_cfg *cfg = zi_dit_config(dit);
    const zi_tensor *tx = zi_st_get(in, "train.x0"), *tn = zi_st_get(in, "train.noise"),
                    *ts = zi_st_get(in, "train.sigma"), *tc = zi_st_get(in, "train.cap");
    if (!tx || !tn || !ts || !tc) { zi_seterr("%s: needs train.x0, train.noise, train.sigma, train.cap", o->eval_in); goto done; }
    int C = cfg->in_channels;
    if (tx->ndim != 4 || tx->shape[0] != C || tx->shape[1] != 1 || !zi_st_need(in, "train.noise", 4, tx->shape) ||
        ts->numel != 1 || tc->ndim != 2 || tc->shape[1] != cfg->cap_feat_dim || tc->shape[0] < 1) {
        if (!strstr(zi_err(), "train.noise"))
            zi_seterr("%s: shapes: train.x0 [%d,1,h,w], train.noise the same, train.sigma [1], train.cap [L,%d]",
                      o->eval_in, C, cfg->cap_feat_dim);
        goto done;
    }
    int h = (int)tx->shape[2], w = (int)tx->shape[3], L = (int)tc->shape[0];
    int64_t n = tx->numel;
    x0 = zi_tensor_f32(tx); noise = zi_tensor_f32(tn); sig = zi_tensor_f32(ts); cap = zi_tensor_f32(tc);
    if (!x0 || !noise || !sig || !cap) { zi_seterr("%s: train.* inputs must be float tensors", o->eval_in); goto done; }
    xt = zi_malloc(n * sizeof(float)); out = zi_malloc(n * sizeof(float)); dout = zi_malloc(n * sizeof(float));
    int nlin;
    zi_lin *const *lins = zi_dit_lins(dit, &nlin);
    t = zi_train_lora_of(l, lins, nlin, strength);
    if (!t) goto done;
    zi_dit_set_training(dit, 1, 0);
    /* as the reference computes it: (1 − σ) and t = 1 − σ from the Python double σ */
    float sigma = sig[0], t_in = (float)(1.0 - (double)sigma);
    zi_train_noisy(xt, x0, noise, sigma, n);
    const float *xp = xt, *cp = cap;
    if (zi_dit_forward(dit, 1, &xp, &h, &w, &t_in, &cp, &L, &out)) goto done;
    float loss = zi_train_loss(out, x0, noise, n, 1.0f, 1.0f, dout);
    if (zi_dit_backward(dit, dout)) goto done;
    zi_stw *wr = zi_stw_new();
    zi_stw_add_f32(wr, "train.loss", 1, (int64_t[]){1}, &loss);
    for (int i = 0; i < t->lora.n; i++) {
        const zi_lora_module *m = &t->lora.m[i];
        char *ka = zi_path("grad.%s.lora_A", m->name), *kb = zi_path("grad.%s.lora_B", m->name);
        zi_stw_add_f32(wr, ka, 2, (int64_t[]){m->rank, m->in}, t->ad[i].dA);
        zi_stw_add_f32(wr, kb, 2, (int64_t[]){m->out, m->rank}, t->ad[i].dB);
        free(ka);
        free(kb);
    }
    rc = zi_stw_write(wr, o->eval_out);
    zi_stw_free(wr);
done:
    zi_train_lora_free(t);
    zi_lora_free(l);
    zi_dit_free(dit);
    zi_st_close(in);
    free(x0); free(noise); free(sig); free(cap); free(xt); free(out); free(dout);
    return rc;
}

int main(int argc, char **argv) {
    options o;
    if (parse_args(argc, argv, &o)) {
        fprintf(stderr, "error: %s\n", zi_err());
        return 2;
    }
    zi_threads_init(o.threads);
    if (o.fast) zi_set_fast(1);
    int rc = o.eval_in ? eval(&o) : train(&o);
    if (rc) {
        zi_progress_end();
        fprintf(stderr, "error: %s\n", zi_err());
    }
    return rc ? 1 : 0;
}
