/* test_bad_inputs.c: a catalogue of bad inputs through the command-line programs.
 *
 * Each case edits a private copy of the tiny model (test/golden/tiny-zimage: directories are
 * copied, files symlinked, and only the files a case changes become real copies), runs the
 * program and expects
 *   - a nonzero exit,
 *   - exactly one line of output (the error on stderr; stdout stays empty with -q),
 *     containing `expect`: the file or the flag at fault,
 *   - no file left behind in the case's scratch directory (no out.png, no out.png.tmp).
 *
 * Adding a case is one line of `cases`: the program ("sample"; "train" once it exists), its
 * arguments and up to two edits. In arguments, edits and `expect`, @M stands for the model
 * copy and @T for the case's scratch directory; edit paths are relative to @M unless they
 * start with @T. Every program gets "-q -o @T/out.png" first (a later -o wins).
 *
 * Not here: corrupt PNG/JPEG and CSV files (no command reads them yet: they belong to ./train;
 * their parsers are fuzzed, see fuzz/), and the full disk, which needs a mount (its own test
 * below). */
#include "test.h"
#include "../zimage.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

typedef enum {
    NOP,
    TRUNC,      /* keep the first n bytes of file */
    SUB,        /* replace the first a by b: in a .safetensors file inside its JSON header
                   (the length prefix follows), elsewhere in the whole text */
    HDRLEN,     /* set a .safetensors file's 8-byte header length to n */
    HEADER,     /* replace a .safetensors file's whole header by a */
    FILL,       /* fill the data of tensor a with the 2-byte little-endian value n */
    RM,         /* remove file */
    WRITE,      /* write a as the content of file */
    LORA,       /* write a LoRA for module a with input width n (B omitted when b is "noB") */
    TENSORS,    /* write float32 tensors of value 0.5 to file: a = "NAME=D0,D1,... NAME=..." */
} edit_op;

typedef struct { edit_op op; const char *file, *a, *b; long long n; } edit;
#define E_TRUNC(f, n)       {TRUNC, f, NULL, NULL, n}
#define E_SUB(f, a, b)      {SUB, f, a, b, 0}
#define E_HDRLEN(f, n)      {HDRLEN, f, NULL, NULL, n}
#define E_HEADER(f, a)      {HEADER, f, a, NULL, 0}
#define E_FILL(f, t, v)     {FILL, f, t, NULL, v}
#define E_RM(f)             {RM, f, NULL, NULL, 0}
#define E_WRITE(f, a)       {WRITE, f, a, NULL, 0}
#define E_LORA(f, m, in, b) {LORA, f, m, b, in}
#define E_TENSORS(f, a)    {TENSORS, f, a, NULL, 0}
#define NO_EDIT             {{NOP, NULL, NULL, NULL, 0}}

typedef struct {
    const char *prog, *args;
    edit e[2];
    const char *expect;
} bad_case;

#define GEN "@M 'a dog' -W 64 -H 64 --steps 1"
#define TSH "transformer/diffusion_pytorch_model-00003-of-00005.safetensors"
#define TSH1 "transformer/diffusion_pytorch_model-00001-of-00005.safetensors"
#define TIDX "transformer/diffusion_pytorch_model.safetensors.index.json"
#define TESH "text_encoder/model-00002-of-00002.safetensors"
#define VAEF "vae/diffusion_pytorch_model.safetensors"
#define TOK "tokenizer/tokenizer.json"
#define TO_K "\"context_refiner.0.attention.to_k.weight\":{\"dtype\":\"BF16\",\"shape\":[64,64],\"data_offsets\":[0,8192]}"
#define BAD_UTF8 "\"$(printf 'a\\377b')\""

static const bad_case cases[] = {
    /* ---- flags */
    {"sample", GEN " -W 60", NO_EDIT, "--width"},
    {"sample", GEN " -H abc", NO_EDIT, "-H"},
    {"sample", GEN " -W 0", NO_EDIT, "-W"},
    {"sample", GEN " -W 99999999999999999999", NO_EDIT, "-W"},
    {"sample", GEN " -W 16384 -H 16384", NO_EDIT, "--width"},
    {"sample", GEN " -W 8208 -H 8192", NO_EDIT, "--width"},
    {"sample", GEN " --steps 0", NO_EDIT, "--steps"},
    {"sample", GEN " --steps", NO_EDIT, "--steps"},
    {"sample", GEN " --sampler nope", NO_EDIT, "--sampler"},
    {"sample", GEN " --sampler ''", NO_EDIT, "--sampler"},
    {"sample", GEN " --rng tpu", NO_EDIT, "--rng"},
    {"sample", GEN " --cfg -1", NO_EDIT, "--cfg"},
    {"sample", GEN " --cfg nan", NO_EDIT, "--cfg"},
    {"sample", GEN " --cfg-trunc 2", NO_EDIT, "--cfg-trunc"},
    {"sample", GEN " --shift 0", NO_EDIT, "--shift"},
    {"sample", GEN " --seed -1", NO_EDIT, "--seed"},
    {"sample", GEN " -t 0", NO_EDIT, "-t"},
    {"sample", GEN " --bogus", NO_EDIT, "--bogus"},
    {"sample", "@M", NO_EDIT, "PROMPT"},
    {"sample", GEN " extra", NO_EDIT, "extra"},
    {"sample", "@M --eval @T/in.safetensors", NO_EDIT, "--eval-out"},
    {"sample", "@M --eval /nonexistent.safetensors --eval-out @T/o.safetensors", NO_EDIT, "/nonexistent.safetensors"},
    {"sample", "--convert-lora test/golden/lora-a-diffsynth.safetensors @T/x.safetensors --to onnx", NO_EDIT, "onnx"},
    {"sample", "--convert-lora test/golden/lora-a-diffsynth.safetensors @T/x.safetensors", NO_EDIT, "--to"},
    {"sample", "--convert-lora @M/" VAEF " @T/x.safetensors --to kohya", NO_EDIT, VAEF},
    {"sample", "--info /nonexistent", NO_EDIT, "/nonexistent"},
    /* ---- --eval inputs of the wrong shape (they were read out of bounds) */
#define EVAL "@M --eval @T/in.safetensors --eval-out @T/o.safetensors"
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=1,16,8,8 dit.t=1 dit.cap=3,32")}, "dit.x"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=16,1,8,8 dit.t=1 dit.cap=3,5")}, "dit.cap"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=16,1,8,8 dit.t=0 dit.cap=3,32")}, "dit.t"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=16,1,8,8 dit.t=1 dit.cap=0,32")}, "dit.cap"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=16,1,7,8 dit.t=1 dit.cap=3,32")}, "@T/in.safetensors"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=16,1,8,8 dit.cap=3,32")}, "dit.t"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "vae.z=1,3,4,4")}, "vae.z"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "vae.img_in=1,1,16,16")}, "vae.img_in"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "vae.img_in=1,3,12,16")}, "@T/in.safetensors"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "te.ids=3")}, "te.ids"},
    /* ---- prompts (an empty prompt is valid, as in diffusers: see bad_inputs_empty_prompt) */
    {"sample", "@M " BAD_UTF8 " -W 64 -H 64 --steps 1", NO_EDIT, "prompt"},
    {"sample", GEN " --cfg 2 -n " BAD_UTF8, NO_EDIT, "--negative"},
    /* ---- output */
    {"sample", GEN " -o /nonexistent-dir/x.png", NO_EDIT, "/nonexistent-dir/x.png"},
    {"sample", GEN " -o @T", NO_EDIT, "@T"},
    {"sample", GEN " -o /proc/x.png", NO_EDIT, "/proc/x.png"},
    /* ---- model directory */
    {"sample", "/nonexistent-model 'a dog' -W 64 -H 64", NO_EDIT, "/nonexistent-model"},
    {"sample", "test/golden/scheduler.json 'a dog' -W 64 -H 64", NO_EDIT, "test/golden/scheduler.json"},
    {"sample", GEN, {E_RM("transformer/config.json")}, "transformer"},
    {"sample", GEN, {E_TRUNC("transformer/config.json", 100)}, "transformer/config.json"},
    {"sample", GEN, {E_SUB("transformer/config.json", "\"n_heads\": 2,", "")}, "n_heads"},
    {"sample", GEN, {E_SUB("transformer/config.json", "\"all_patch_size\": [\n    2", "\"all_patch_size\": [\n    0")}, "all_patch_size"},
    {"sample", GEN, {E_SUB("transformer/config.json", "\"dim\": 64", "\"dim\": 32")}, "transformer/config.json"},
    {"sample", GEN, {E_SUB("transformer/config.json", "\"cap_feat_dim\": 32", "\"cap_feat_dim\": 48")}, "cap_embedder"},
    {"sample", GEN, {E_SUB("transformer/config.json", "\"dim\": 64", "\"dim\": 128"),
                     E_SUB("transformer/config.json", "\"n_heads\": 2", "\"n_heads\": 4")}, TIDX},
    {"sample", GEN, {E_SUB("text_encoder/config.json", "\"num_hidden_layers\": 3,", "")}, "num_hidden_layers"},
    {"sample", GEN, {E_SUB("text_encoder/config.json", "\"hidden_size\": 32", "\"hidden_size\": 48")}, "text_encoder"},
    {"sample", GEN, {E_SUB("vae/config.json", "\"block_out_channels\"", "\"block_out_channel\"")}, "block_out_channels"},
    {"sample", GEN, {E_SUB("vae/config.json", "\"latent_channels\": 16", "\"latent_channels\": 8")}, VAEF},
    {"sample", GEN, {E_TRUNC("scheduler/scheduler_config.json", 20)}, "scheduler_config.json"},
    {"sample", GEN, {E_RM(TOK)}, "tokenizer"},
    {"sample", GEN, {E_TRUNC(TOK, 1000)}, TOK},
    /* ---- safetensors: sizes and headers */
    {"sample", GEN, {E_TRUNC(TSH, 4)}, TSH},
    {"sample", GEN, {E_TRUNC(TSH, 100)}, TSH},
    {"sample", GEN, {E_TRUNC(TSH, 100000)}, TSH},
    {"sample", GEN, {E_HDRLEN(TSH, 1ll << 40)}, TSH},
    {"sample", GEN, {E_HDRLEN(TSH, 0)}, TSH},
    {"sample", GEN, {E_HEADER(TSH, "[1, 2, 3]")}, TSH},
    {"sample", GEN, {E_HEADER(TSH, "{\"a\": {\"dtype\": \"F32\"")}, TSH},
    {"sample", GEN, {E_HEADER(TSH, "{\"__metadata__\": {\"format\": 1}}")}, TSH},
    {"sample", GEN, {E_SUB(TSH, "[64,64],\"data_offsets\":[0,8192]", "[4294967296,4294967296,4294967296],\"data_offsets\":[0,8192]")}, TSH},
    {"sample", GEN, {E_SUB(TSH, "[64,64],\"data_offsets\":[0,8192]", "[64,-64],\"data_offsets\":[0,8192]")}, TSH},
    {"sample", GEN, {E_SUB(TSH, "[64,64],\"data_offsets\":[0,8192]", "[64,64,1,1,1,1,1,1,1],\"data_offsets\":[0,8192]")}, TSH},
    {"sample", GEN, {E_SUB(TSH, "\"data_offsets\":[0,8192]", "\"data_offsets\":[0,819200000]")}, TSH},
    {"sample", GEN, {E_SUB(TSH, "\"data_offsets\":[0,8192]", "\"data_offsets\":[8192,0]")}, TSH},
    {"sample", GEN, {E_SUB(TSH, "\"data_offsets\":[0,8192]", "\"data_offsets\":[0,8192.5]")}, TSH},
    {"sample", GEN, {E_SUB(TSH, "\"data_offsets\":[8192,16384]", "\"data_offsets\":[0,8192]")}, TSH},
    {"sample", GEN, {E_SUB(TSH, "\"data_offsets\":[0,8192]", "\"data_offsets\":[1,8193]")}, TSH},
    {"sample", GEN, {E_SUB(TSH, "\"dtype\":\"BF16\"", "\"dtype\":\"BF17\"")}, TSH},
    {"sample", GEN, {E_SUB(TSH, "\"dtype\":\"BF16\"", "\"dtype\":\"F32\"")}, TSH},
    {"sample", GEN, {E_SUB(TSH, "\"dtype\":\"BF16\"", "\"dtype\":\"I16\"")}, "context_refiner.0.attention.to_k.weight"},
    {"sample", GEN, {E_SUB(TSH, TO_K, "\"context_refiner.0.attention.to_k.weight\":{\"dtype\":\"BF16\",\"shape\":[32,128],\"data_offsets\":[0,8192]}")}, "context_refiner.0.attention.to_k.weight"},
    {"sample", GEN, {E_SUB(TSH, "context_refiner.0.attention.to_k.weight\"", "context_refiner.0.attention.to_k.weigh\"")}, "context_refiner.0.attention.to_k.weight"},
    {"sample", GEN, {E_TRUNC(TESH, 1000)}, TESH},
    {"sample", GEN, {E_TRUNC(VAEF, 5000)}, VAEF},
    {"sample", GEN, {E_SUB(VAEF, "\"decoder.conv_in.bias\"", "\"decoder.conv_in.bia\"")}, "decoder.conv_in.bias"},
    /* ---- sharded checkpoints */
    {"sample", GEN, {E_RM(TSH)}, "diffusion_pytorch_model-00003-of-00005.safetensors"},
    {"sample", GEN, {E_RM(TIDX)}, "transformer"},
    {"sample", GEN, {E_SUB(TIDX, "\"weight_map\"", "\"weight_mop\"")}, TIDX},
    {"sample", GEN, {E_SUB(TIDX, "00003-of-00005", "00003-of-00006")}, "00003-of-00006"},
    {"sample", GEN, {E_SUB(TIDX, "\"context_refiner.0.attention.to_k.weight\": \"diffusion_pytorch_model-00003",
                      "\"context_refiner.0.attention.to_k.weight\": \"diffusion_pytorch_model-00001")}, TIDX},
    {"sample", GEN, {E_SUB(TIDX, "\"context_refiner.0.attention.to_k.weight\": \"", "\"context_refiner.0.attention.to_k.weight\": \"../")}, TIDX},
    {"sample", GEN, {E_SUB(TIDX, "{", "[")}, TIDX},
    /* ---- NaN / Inf weights: caught in what the models produce, not by scanning the weights */
    {"sample", GEN, {E_FILL(TSH1, "all_final_layer.2-1.linear.weight", 0x7fc0)}, "NaN"},
    {"sample", GEN, {E_FILL(TSH1, "all_final_layer.2-1.linear.bias", 0x7f80)}, "Inf"},
    {"sample", GEN, {E_FILL(TESH, "model.layers.0.input_layernorm.weight", 0xffc0)}, "NaN"},
    {"sample", GEN, {E_FILL(VAEF, "decoder.conv_out.bias", 0x7fc0)}, "vae"},
    /* ---- LoRAs */
    {"sample", GEN " --lora /nonexistent.safetensors", NO_EDIT, "/nonexistent.safetensors"},
    {"sample", GEN " --lora @T/l.safetensors:abc", {E_LORA("@T/l.safetensors", "layers.0.attention.to_q", 64, NULL)}, "@T/l.safetensors:abc"},
    {"sample", GEN " --lora @T/l.safetensors", {E_LORA("@T/l.safetensors", "layers.0.attention.to_q", 48, NULL)}, "@T/l.safetensors"},
    {"sample", GEN " --lora @T/l.safetensors", {E_LORA("@T/l.safetensors", "layers.0.attention.to_q", 64, "noB")}, "@T/l.safetensors"},
    {"sample", GEN " --lora @T/l.safetensors", {E_LORA("@T/l.safetensors", "blocks.0.attn.qkv", 64, NULL)}, "@T/l.safetensors"},
    {"sample", GEN " --lora @T/l.safetensors", {E_WRITE("@T/l.safetensors", "not a safetensors file")}, "@T/l.safetensors"},
    {"sample", GEN " --lora @M/" VAEF, NO_EDIT, VAEF},
    {"sample", GEN " --lora @T", NO_EDIT, "@T"},
    {"sample", GEN " --lora /dev/null", NO_EDIT, "/dev/null"},
    {"sample", GEN " --lora @T/l.safetensors", {E_LORA("@T/l.safetensors", "layers.0.attention.to_q", 0, NULL)}, "@T/l.safetensors"},
};

/* "@M" -> model, "@T" -> tmp, into dst[cap]. */
static void expand(char *dst, size_t cap, const char *src, const char *model, const char *tmp) {
    size_t n = 0;
    while (*src && n + 1 < cap) {
        if (src[0] == '@' && (src[1] == 'M' || src[1] == 'T')) {
            n += (size_t)snprintf(dst + n, cap - n, "%s", src[1] == 'M' ? model : tmp);
            if (n >= cap) n = cap - 1;
            src += 2;
        } else {
            dst[n++] = *src++;
        }
    }
    dst[n] = 0;
}

static char *read_file(const char *path, size_t *n, size_t max) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = zi_malloc(max + 1);
    *n = fread(buf, 1, max, f);
    fclose(f);
    buf[*n] = 0;
    return buf;
}

static int write_file(const char *path, const void *data, size_t n) {
    unlink(path);       /* a symlink into test/golden must stay untouched */
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int bad = n && fwrite(data, 1, n, f) != n;
    return fclose(f) || bad ? -1 : 0;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

/* A safetensors file rebuilt from a new header and the old data area. */
static int st_rebuild(const char *path, const char *buf, size_t n, const char *header, size_t hlen) {
    uint64_t old = 0;
    for (int i = 7; i >= 0; i--) old = old << 8 | (unsigned char)buf[i];
    if (n < 8 || old > n - 8) return -1;
    size_t dlen = n - 8 - (size_t)old, total = 8 + hlen + dlen;
    char *out = zi_malloc(total);
    for (int i = 0; i < 8; i++) out[i] = (char)((uint64_t)hlen >> (8 * i));
    memcpy(out + 8, header, hlen);
    memcpy(out + 8 + hlen, buf + 8 + old, dlen);
    int rc = write_file(path, out, total);
    free(out);
    return rc;
}

/* Applies one edit; 0 or -1 (with a message). */
static int apply_edit(const edit *e, const char *model, const char *tmp) {
    if (e->op == NOP) return 0;
    char path[1024], a[1024];
    if (!strncmp(e->file, "@T", 2)) expand(path, sizeof path, e->file, model, tmp);
    else snprintf(path, sizeof path, "%s/%s", model, e->file);
    expand(a, sizeof a, e->a ? e->a : "", model, tmp);
    size_t n = 0;
    char *buf = NULL;
    int rc = -1;
    switch (e->op) {
    case NOP: return 0;
    case RM: rc = unlink(path); break;
    case WRITE: rc = write_file(path, a, strlen(a)); break;
    case TRUNC:
        if ((buf = read_file(path, &n, (size_t)e->n))) rc = write_file(path, buf, n);
        break;
    case HDRLEN:
        if ((buf = read_file(path, &n, 64 << 20)) && n >= 8) {
            for (int i = 0; i < 8; i++) buf[i] = (char)((uint64_t)e->n >> (8 * i));
            rc = write_file(path, buf, n);
        }
        break;
    case HEADER:
        if ((buf = read_file(path, &n, 64 << 20))) rc = st_rebuild(path, buf, n, a, strlen(a));
        break;
    case SUB: {
        if (!(buf = read_file(path, &n, 64 << 20))) break;
        int st = ends_with(path, ".safetensors");
        size_t hoff = st ? 8 : 0, hlen = n - hoff;
        if (st) {
            uint64_t h = 0;
            for (int i = 7; i >= 0; i--) h = h << 8 | (unsigned char)buf[i];
            hlen = (size_t)h;
        }
        char *text = zi_malloc(hlen + 1);
        memcpy(text, buf + hoff, hlen);
        text[hlen] = 0;
        char *at = strstr(text, e->a);
        if (at) {
            size_t la = strlen(e->a), lb = strlen(e->b), nl = hlen - la + lb;
            char *res = zi_malloc(nl + 1);
            memcpy(res, text, (size_t)(at - text));
            memcpy(res + (at - text), e->b, lb);
            memcpy(res + (at - text) + lb, at + la, hlen - (size_t)(at - text) - la);
            rc = st ? st_rebuild(path, buf, n, res, nl) : write_file(path, res, nl);
            free(res);
        } else {
            fprintf(stderr, "    %s: '%s' not found\n", path, e->a);
        }
        free(text);
        break;
    }
    case FILL: {
        if (!(buf = read_file(path, &n, 64 << 20)) || n < 8) break;
        uint64_t h = 0;
        for (int i = 7; i >= 0; i--) h = h << 8 | (unsigned char)buf[i];
        zj *hdr = h <= n - 8 ? zj_parse(buf + 8, (size_t)h, path) : NULL;
        const zj *offs = zj_get(zj_get(hdr, e->a), "data_offsets");
        if (offs && offs->n == 2) {
            size_t b = 8 + (size_t)h + (size_t)zj_at(offs, 0)->num, end = 8 + (size_t)h + (size_t)zj_at(offs, 1)->num;
            for (size_t k = b; k + 1 < end && end <= n; k += 2) {
                buf[k] = (char)(e->n & 0xff);
                buf[k + 1] = (char)(e->n >> 8);
            }
            rc = write_file(path, buf, n);
        }
        zj_free(hdr);
        break;
    }
    case TENSORS: {
        zi_stw *w = zi_stw_new();
        char *spec = zi_strdup(a), *save = NULL;
        for (char *tok = strtok_r(spec, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
            char *eq = strchr(tok, '=');
            int64_t shape[8], numel = 1;
            int nd = 0;
            if (!eq) continue;
            *eq = 0;
            for (char *d = eq + 1; *d && nd < 8; d += strspn(d, ",")) numel *= shape[nd++] = strtoll(d, &d, 10);
            float *v = zi_malloc((size_t)(numel ? numel : 1) * sizeof *v);
            for (int64_t k = 0; k < numel; k++) v[k] = 0.5f;
            zi_stw_add_f32(w, tok, nd, shape, v);
            free(v);
        }
        rc = zi_stw_write(w, path);
        zi_stw_free(w);
        free(spec);
        break;
    }
    case LORA: {
        int in = (int)e->n, rank = 2, out = 64;
        float *A = zi_calloc((size_t)rank * in, sizeof *A), *B = zi_calloc((size_t)out * rank, sizeof *B);
        char name[1100];
        zi_stw *w = zi_stw_new();
        snprintf(name, sizeof name, "%s.lora_A.weight", a);
        zi_stw_add_f32(w, name, 2, (int64_t[]){rank, in}, A);
        if (!e->b || strcmp(e->b, "noB")) {
            snprintf(name, sizeof name, "%s.lora_B.weight", a);
            zi_stw_add_f32(w, name, 2, (int64_t[]){out, rank}, B);
        }
        rc = zi_stw_write(w, path);
        zi_stw_free(w);
        free(A); free(B);
        break;
    }
    }
    free(buf);
    if (rc) fprintf(stderr, "    edit %d of %s failed\n", (int)e->op, path);
    return rc;
}

/* Entries under dir, recursively (find | wc -l). */
static int count_files(const char *dir) {
    char out[64];
    zt_sh(out, sizeof out, "find '%s' | wc -l", dir);
    return atoi(out);
}

/* Runs case i in ROOT/caseI: @T = ROOT/caseI/t, the model copy @T/m. Returns 1 when it behaved. */
static int run_case(int i, const bad_case *c) {
    char root[300], tmp[320], model[340], cmd[8192], args[4096], expect[1024], out[8192];
    char cwd[512];
    if (!getcwd(cwd, sizeof cwd)) return 0;
    snprintf(root, sizeof root, "%s/bad%02d", zt_tmpdir(), i);
    snprintf(tmp, sizeof tmp, "%s/t", root);
    snprintf(model, sizeof model, "%s/m", tmp);
    if (zt_sh(out, sizeof out, "mkdir -p '%s' && cp -rs '%s/test/golden/tiny-zimage' '%s'", tmp, cwd, model)) {
        fprintf(stderr, "    case %d: cannot copy the model: %s", i, out);
        return 0;
    }
    for (int k = 0; k < 2; k++)
        if (apply_edit(&c->e[k], model, tmp)) return 0;
    int before = count_files(root);
    expand(args, sizeof args, c->args, model, tmp);
    expand(expect, sizeof expect, c->expect, model, tmp);
    snprintf(cmd, sizeof cmd, "%s/%s -q -o %s/out.png %s", zt_bin(), c->prog, tmp, args);
    int rc = zt_sh(out, sizeof out, "%s", cmd);
    int lines = 0;
    for (char *p = out; *p; p++) lines += *p == '\n';
    int after = count_files(root);
    int ok = rc > 0 && lines == 1 && strstr(out, expect) && after == before;
    if (!ok)
        fprintf(stderr, "    case %d: %s\n      -> exit %d, %d lines, %d files left behind, expected '%s' in:\n%s", i,
                cmd, rc, lines, after - before, expect, out);
    zt_sh(NULL, 0, "rm -rf '%s'", root);
    return ok;
}

/* The cases run in child processes, four at a time (most of their time is spent starting
 * ./sample and reading the tokenizer). */
TEST(bad_inputs) {
    int n = (int)(sizeof cases / sizeof cases[0]), bad = 0, running = 0;
    (void)zt_tmpdir();      /* created once, before the children need it */
    fflush(NULL);
    for (int i = 0; i < n || running; ) {
        if (i < n && running < 4) {
            pid_t pid = fork();
            if (pid == 0) _exit(run_case(i, &cases[i]) ? 0 : 1);
            if (pid < 0) { bad += !run_case(i, &cases[i]); i++; continue; }
            running++;
            i++;
            continue;
        }
        int st;
        if (wait(&st) < 0) break;
        running--;
        bad += !WIFEXITED(st) || WEXITSTATUS(st) != 0;
    }
    fprintf(stderr, "    %d bad inputs, %d handled as expected\n", n, n - bad);
    CHECK(n >= 50 && bad == 0, "%d of %d bad inputs not handled as expected", bad, n);
}

/* An empty prompt is no error: diffusers accepts it (the chat template still makes tokens). */
TEST(bad_inputs_empty_prompt) {
    char out[4096];
    int rc = zt_sh(out, sizeof out, "%s/sample test/golden/tiny-zimage '' -W 64 -H 64 --steps 1 --seed 1 -q -o %s/empty.png",
                   zt_bin(), zt_tmpdir());
    CHECK(rc == 0 && !out[0], "empty prompt: exit %d: %s", rc, out);
    zi_image im;
    char path[512];
    snprintf(path, sizeof path, "%s/empty.png", zt_tmpdir());
    CHECK(zi_image_load(path, &im) == 0 && im.w == 64 && im.h == 64, "empty prompt: no 64x64 PNG: %s", zi_err());
    zi_image_free(&im);
}

/* A full disk: a 64 KiB tmpfs, filled up; the PNG cannot be written, and neither it nor its
 * temporary file may stay. Needs root (mount); skipped with a message where that fails. */
TEST(bad_inputs_full_disk) {
    char dir[512], out[4096];
    snprintf(dir, sizeof dir, "%s/full", zt_tmpdir());
    if (zt_sh(out, sizeof out, "mkdir -p '%s' && mount -t tmpfs -o size=64k tmpfs '%s'", dir, dir)) {
        fprintf(stderr, "    skipped: cannot mount a tmpfs here (%.*s)\n", (int)strcspn(out, "\n"), out);
        return;
    }
    zt_sh(NULL, 0, "dd if=/dev/zero of='%s/fill' bs=1k 2>/dev/null; sync", dir);
    int before = count_files(dir);
    int rc = zt_sh(out, sizeof out, "%s/sample test/golden/tiny-zimage 'a dog' -W 64 -H 64 --steps 1 -q -o %s/out.png",
                   zt_bin(), dir);
    int after = count_files(dir), lines = 0;
    for (char *p = out; *p; p++) lines += *p == '\n';
    zt_sh(NULL, 0, "umount '%s'", dir);
    CHECK(rc > 0 && lines == 1 && strstr(out, "out.png") && after == before,
          "full disk: exit %d, %d lines, %d files left: %s", rc, lines, after - before, out);
}
