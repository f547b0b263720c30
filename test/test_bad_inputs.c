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
 * The cases hold for any tiny model of the golden set (its sizes, shard count and shard names
 * vary): config edits derive the wrong value from the real one, and what a case needs to know
 * of the model (which shard holds a tensor, where its bytes lie) is learnt from it first
 * (learn_model) and written @{NAME} in the strings (see `facts`).
 *
 * Not here: corrupt PNG/JPEG and CSV files (no command reads them yet: they belong to ./train;
 * their parsers are fuzzed, see fuzz/), and the full disk, which needs a mount (its own test
 * below). */
#include "test.h"
#include "../zimage.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

typedef enum {
    NOP,
    TRUNC,      /* keep the first n bytes of file (n < 0: all but the last -n) */
    SUB,        /* replace the first a by b: in a .safetensors file inside its JSON header
                   (the length prefix follows), elsewhere in the whole text */
    CFG,        /* config file: set the number after "a": (the first one, in a list) to
                   mul * its value + add (mul and add in b, "MUL ADD"); b NULL: remove the key */
    HDRLEN,     /* set a .safetensors file's 8-byte header length to n */
    HEADER,     /* replace a .safetensors file's whole header by a */
    FILL,       /* fill the data of tensor a with the 2-byte little-endian value n (file: a
                   checkpoint directory: the shard holding a, through its index) */
    RM,         /* remove file */
    WRITE,      /* write a as the content of file */
    LORA,       /* write a LoRA for module a with input width b (B omitted when n is 1) */
    TENSORS,    /* write float32 tensors of value 0.5 to file: a = "NAME=D0,D1,... NAME=..." */
} edit_op;

typedef struct { edit_op op; const char *file, *a, *b; long long n; } edit;
#define E_TRUNC(f, n)       {TRUNC, f, NULL, NULL, n}
#define E_SUB(f, a, b)      {SUB, f, a, b, 0}
#define E_CFG(f, key, mul_add) {CFG, f, key, mul_add, 0}
#define E_CFG_RM(f, key)    {CFG, f, key, NULL, 0}
#define E_HDRLEN(f, n)      {HDRLEN, f, NULL, NULL, n}
#define E_HEADER(f, a)      {HEADER, f, a, NULL, 0}
#define E_FILL(f, t, v)     {FILL, f, t, NULL, v}
#define E_RM(f)             {RM, f, NULL, NULL, 0}
#define E_WRITE(f, a)       {WRITE, f, a, NULL, 0}
#define E_LORA(f, m, in)    {LORA, f, m, in, 0}
#define E_LORA_NO_B(f, m, in) {LORA, f, m, in, 1}
#define E_TENSORS(f, a)    {TENSORS, f, a, NULL, 0}
#define NO_EDIT             {{NOP, NULL, NULL, NULL, 0}}

typedef struct {
    const char *prog, *args;
    edit e[2];
    const char *expect;
} bad_case;

/* What the cases need to know of the golden model, filled in by learn_model: @{NAME} in a
 * case's strings stands for the value. K is a tensor every Z-Image checkpoint has, a BF16
 * matrix [rows, cols]; the safetensors cases damage its entry in the header of its shard. */
#define K "context_refiner.0.attention.to_k.weight"
static struct { const char *name; char value[256]; } facts[] = {
    {"shard", ""},          /* "transformer/FILE": the transformer shard holding K */
    {"shard.file", ""},     /* its FILE alone */
    {"shard.other", ""},    /* the FILE of another transformer shard */
    {"te.shard", ""},       /* "text_encoder/FILE": a text encoder shard (the one with model.norm.weight) */
    {"K.shape", ""},        /* K's shape as written, "[rows,cols]" */
    {"K.rows", ""}, {"K.cols", ""}, {"K.numel", ""},
    {"K.offsets", ""},      /* K's data_offsets as written, "[begin,end]" */
    {"K.begin", ""}, {"K.end", ""},
    {"K.begin+1", ""}, {"K.end+1", ""},   /* a range off the 2-byte alignment of BF16 */
    {"K.overlap", ""},      /* a range of K's size over its neighbour's bytes: [0, size) when K does
                           not start there, else the next [size, 2 size) */
    {"dim", ""},            /* the transformer's width */
    {"dim+1", ""},          /* a wrong input width for its LoRAs */
    {"cap_feat_dim", ""},   /* its caption feature width */
    {"cap_feat_dim+1", ""}, /* a wrong one */
};
#define N_FACTS (int)(sizeof facts / sizeof facts[0])

/* K's header entry with this dtype, shape and offsets text. */
#define K_ENTRY(dtype, shape, offsets) \
    "\"" K "\":{\"dtype\":\"" dtype "\",\"shape\":" shape ",\"data_offsets\":" offsets "}"
#define K_AS_IS K_ENTRY("BF16", "@{K.shape}", "@{K.offsets}")

#define GEN "@M 'a dog' -W 64 -H 64 --steps 1"
#define TSH "@{shard}"
#define TIDX "transformer/diffusion_pytorch_model.safetensors.index.json"
#define TCFG "transformer/config.json"
#define TECFG "text_encoder/config.json"
#define VAEF "vae/diffusion_pytorch_model.safetensors"
#define TOK "tokenizer/tokenizer.json"
#define BAD_UTF8 "\"$(printf 'a\\377b')\""
#define FINAL "all_final_layer.2-1.linear"      /* the final layer of patch size 2, f_patch 1 */

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
    /* ---- --eval inputs of the wrong shape (they were read out of bounds); the caption has the
     * model's width except where that width is the fault */
#define EVAL "@M --eval @T/in.safetensors --eval-out @T/o.safetensors"
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=1,16,8,8 dit.t=1 dit.cap=3,@{cap_feat_dim}")}, "dit.x"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=16,1,8,8 dit.t=1 dit.cap=3,@{cap_feat_dim+1}")}, "dit.cap"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=16,1,8,8 dit.t=0 dit.cap=3,@{cap_feat_dim}")}, "dit.t"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=16,1,8,8 dit.t=1 dit.cap=0,@{cap_feat_dim}")}, "dit.cap"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=16,1,7,8 dit.t=1 dit.cap=3,@{cap_feat_dim}")}, "@T/in.safetensors"},
    {"sample", EVAL, {E_TENSORS("@T/in.safetensors", "dit.x=16,1,8,8 dit.cap=3,@{cap_feat_dim}")}, "dit.t"},
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
    /* ---- model directory; wrong sizes in a config derived from the real ones */
    {"sample", "/nonexistent-model 'a dog' -W 64 -H 64", NO_EDIT, "/nonexistent-model"},
    {"sample", "test/golden/scheduler.json 'a dog' -W 64 -H 64", NO_EDIT, "test/golden/scheduler.json"},
    {"sample", GEN, {E_RM(TCFG)}, "transformer"},
    {"sample", GEN, {E_TRUNC(TCFG, 100)}, TCFG},
    {"sample", GEN, {E_CFG_RM(TCFG, "n_heads")}, "n_heads"},
    {"sample", GEN, {E_CFG(TCFG, "all_patch_size", "0 0")}, "all_patch_size"},
    /* half the width: the heads' width no longer matches axes_dims (or does not divide) */
    {"sample", GEN, {E_CFG(TCFG, "dim", "0.5 0")}, TCFG},
    {"sample", GEN, {E_CFG(TCFG, "cap_feat_dim", "2 0")}, "cap_embedder"},
    /* twice the width and the heads: a consistent config that the weights contradict */
    {"sample", GEN, {E_CFG(TCFG, "dim", "2 0"), E_CFG(TCFG, "n_heads", "2 0")}, TIDX},
    {"sample", GEN, {E_CFG_RM(TECFG, "num_hidden_layers")}, "num_hidden_layers"},
    {"sample", GEN, {E_CFG(TECFG, "hidden_size", "2 0")}, "text_encoder"},
    {"sample", GEN, {E_SUB("vae/config.json", "\"block_out_channels\"", "\"block_out_channel\"")}, "block_out_channels"},
    {"sample", GEN, {E_CFG("vae/config.json", "latent_channels", "0.5 0")}, VAEF},
    {"sample", GEN, {E_TRUNC("scheduler/scheduler_config.json", 20)}, "scheduler_config.json"},
    {"sample", GEN, {E_RM(TOK)}, "tokenizer"},
    {"sample", GEN, {E_TRUNC(TOK, 1000)}, TOK},
    /* ---- safetensors: sizes and headers (of K's shard; K's own entry where one is damaged) */
    {"sample", GEN, {E_TRUNC(TSH, 4)}, TSH},
    {"sample", GEN, {E_TRUNC(TSH, 100)}, TSH},
    {"sample", GEN, {E_TRUNC(TSH, -1)}, TSH},
    {"sample", GEN, {E_HDRLEN(TSH, 1ll << 40)}, TSH},
    {"sample", GEN, {E_HDRLEN(TSH, 0)}, TSH},
    {"sample", GEN, {E_HEADER(TSH, "[1, 2, 3]")}, TSH},
    {"sample", GEN, {E_HEADER(TSH, "{\"a\": {\"dtype\": \"F32\"")}, TSH},
    {"sample", GEN, {E_HEADER(TSH, "{\"__metadata__\": {\"format\": 1}}")}, TSH},
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("BF16", "[4294967296,4294967296,4294967296]", "@{K.offsets}"))}, TSH},
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("BF16", "[@{K.rows},-@{K.cols}]", "@{K.offsets}"))}, TSH},
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("BF16", "[@{K.rows},@{K.cols},1,1,1,1,1,1,1]", "@{K.offsets}"))}, TSH},
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("BF16", "@{K.shape}", "[@{K.begin},819200000]"))}, TSH},
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("BF16", "@{K.shape}", "[@{K.end},@{K.begin}]"))}, TSH},
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("BF16", "@{K.shape}", "[@{K.begin},@{K.end}.5]"))}, TSH},
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("BF16", "@{K.shape}", "@{K.overlap}"))}, TSH},
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("BF16", "@{K.shape}", "[@{K.begin+1},@{K.end+1}]"))}, TSH},
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("BF17", "@{K.shape}", "@{K.offsets}"))}, TSH},
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("F32", "@{K.shape}", "@{K.offsets}"))}, TSH},
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("I16", "@{K.shape}", "@{K.offsets}"))}, K},
    /* the same bytes as another shape */
    {"sample", GEN, {E_SUB(TSH, K_AS_IS, K_ENTRY("BF16", "[1,@{K.numel}]", "@{K.offsets}"))}, K},
    {"sample", GEN, {E_SUB(TSH, "\"" K "\"", "\"context_refiner.0.attention.to_k.weigh\"")}, K},
    {"sample", GEN, {E_TRUNC("@{te.shard}", 1000)}, "@{te.shard}"},
    {"sample", GEN, {E_TRUNC(VAEF, 5000)}, VAEF},
    {"sample", GEN, {E_SUB(VAEF, "\"decoder.conv_in.bias\"", "\"decoder.conv_in.bia\"")}, "decoder.conv_in.bias"},
    /* ---- sharded checkpoints */
    {"sample", GEN, {E_RM(TSH)}, "@{shard.file}"},
    {"sample", GEN, {E_RM(TIDX)}, "transformer"},
    {"sample", GEN, {E_SUB(TIDX, "\"weight_map\"", "\"weight_mop\"")}, TIDX},
    /* the index names a shard file that is not there */
    {"sample", GEN, {E_SUB(TIDX, "\"@{shard.file}\"", "\"missing-@{shard.file}\"")}, "missing-@{shard.file}"},
    /* the index puts K into a shard that does not hold it */
    {"sample", GEN, {E_SUB(TIDX, "\"" K "\": \"@{shard.file}\"", "\"" K "\": \"@{shard.other}\"")}, TIDX},
    {"sample", GEN, {E_SUB(TIDX, "\"" K "\": \"", "\"" K "\": \"../")}, TIDX},
    {"sample", GEN, {E_SUB(TIDX, "{", "[")}, TIDX},
    /* ---- NaN / Inf weights: caught in what the models produce, not by scanning the weights */
    {"sample", GEN, {E_FILL("transformer", FINAL ".weight", 0x7fc0)}, "NaN"},
    {"sample", GEN, {E_FILL("transformer", FINAL ".bias", 0x7f80)}, "Inf"},
    {"sample", GEN, {E_FILL("text_encoder", "model.layers.0.input_layernorm.weight", 0xffc0)}, "NaN"},
    {"sample", GEN, {E_FILL("vae", "decoder.conv_out.bias", 0x7fc0)}, "vae"},
    /* ---- LoRAs (of the transformer's width except where the width is the fault) */
    {"sample", GEN " --lora /nonexistent.safetensors", NO_EDIT, "/nonexistent.safetensors"},
    {"sample", GEN " --lora @T/l.safetensors:abc", {E_LORA("@T/l.safetensors", "layers.0.attention.to_q", "@{dim}")}, "@T/l.safetensors:abc"},
    {"sample", GEN " --lora @T/l.safetensors", {E_LORA("@T/l.safetensors", "layers.0.attention.to_q", "@{dim+1}")}, "@T/l.safetensors"},
    {"sample", GEN " --lora @T/l.safetensors", {E_LORA_NO_B("@T/l.safetensors", "layers.0.attention.to_q", "@{dim}")}, "@T/l.safetensors"},
    {"sample", GEN " --lora @T/l.safetensors", {E_LORA("@T/l.safetensors", "blocks.0.attn.qkv", "@{dim}")}, "@T/l.safetensors"},
    {"sample", GEN " --lora @T/l.safetensors", {E_WRITE("@T/l.safetensors", "not a safetensors file")}, "@T/l.safetensors"},
    {"sample", GEN " --lora @M/" VAEF, NO_EDIT, VAEF},
    {"sample", GEN " --lora @T", NO_EDIT, "@T"},
    {"sample", GEN " --lora /dev/null", NO_EDIT, "/dev/null"},
    {"sample", GEN " --lora @T/l.safetensors", {E_LORA("@T/l.safetensors", "layers.0.attention.to_q", "0")}, "@T/l.safetensors"},
};

/* The value of fact NAME (name[0..len)), NULL when there is none. */
static const char *fact_n(const char *name, size_t len) {
    for (int i = 0; i < N_FACTS; i++)
        if (strlen(facts[i].name) == len && !strncmp(facts[i].name, name, len)) return facts[i].value;
    return NULL;
}
static const char *fact(const char *name) { return fact_n(name, strlen(name)); }

/* "@M" -> model, "@T" -> tmp, "@{NAME}" -> fact NAME, into dst[cap]. */
static void expand(char *dst, size_t cap, const char *src, const char *model, const char *tmp) {
    size_t n = 0;
    while (*src && n + 1 < cap) {
        const char *end = src[0] == '@' && src[1] == '{' ? strchr(src, '}') : NULL;
        const char *val = end ? fact_n(src + 2, (size_t)(end - src - 2)) : NULL;
        if (end && !val) fprintf(stderr, "    no fact %.*s\n", (int)(end - src + 1), src);
        if (val || (src[0] == '@' && (src[1] == 'M' || src[1] == 'T'))) {
            n += (size_t)snprintf(dst + n, cap - n, "%s", val ? val : src[1] == 'M' ? model : tmp);
            if (n >= cap) n = cap - 1;
            src = val ? end + 1 : src + 2;
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

/* The header length of a safetensors file's bytes buf[0..n) (0 when n < 8). */
static uint64_t st_hlen(const char *buf, size_t n) {
    uint64_t h = 0;
    for (int i = 7; i >= 0 && n >= 8; i--) h = h << 8 | (unsigned char)buf[i];
    return h;
}

/* The parsed header of a safetensors file's bytes (NULL when it is no valid one). */
static zj *st_header(const char *buf, size_t n, const char *path) {
    uint64_t h = st_hlen(buf, n);
    return n >= 8 && h <= n - 8 ? zj_parse(buf + 8, (size_t)h, path) : NULL;
}

/* A safetensors file rebuilt from a new header and the old data area. */
static int st_rebuild(const char *path, const char *buf, size_t n, const char *header, size_t hlen) {
    uint64_t old = st_hlen(buf, n);
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

/* path with the first a replaced by b: in a .safetensors file inside its JSON header, elsewhere
 * in the whole text. 0 or -1 (with a message). */
static int sub_file(const char *path, const char *a, const char *b) {
    size_t n = 0;
    char *buf = read_file(path, &n, 64 << 20);
    if (!buf) return -1;
    int st = ends_with(path, ".safetensors"), rc = -1;
    size_t hoff = st && n >= 8 ? 8 : 0, hlen = st ? (size_t)st_hlen(buf, n) : n;
    if (hlen > n - hoff) hlen = n - hoff;
    char *text = zi_malloc(hlen + 1);
    memcpy(text, buf + hoff, hlen);
    text[hlen] = 0;
    char *at = strstr(text, a);
    if (at) {
        size_t la = strlen(a), lb = strlen(b), nl = hlen - la + lb;
        char *res = zi_malloc(nl + 1);
        memcpy(res, text, (size_t)(at - text));
        memcpy(res + (at - text), b, lb);
        memcpy(res + (at - text) + lb, at + la, hlen - (size_t)(at - text) - la);
        rc = st ? st_rebuild(path, buf, n, res, nl) : write_file(path, res, nl);
        free(res);
    } else {
        fprintf(stderr, "    %s: '%s' not found\n", path, a);
    }
    free(text);
    free(buf);
    return rc;
}

/* Sets key of a pretty-printed config file to mul * value + add (mul_add = "MUL ADD"; the
 * number after "key":, or the first of its list), or removes the key with its value and comma
 * (mul_add NULL). 0 or -1 (with a message). */
static int cfg_edit(const char *path, const char *key, const char *mul_add) {
    size_t n = 0;
    char pat[128], old[256] = "", new[256] = "", *end = NULL;
    char *text = read_file(path, &n, 1 << 20);
    int fits = snprintf(pat, sizeof pat, "\"%s\":", key) < (int)sizeof pat;
    char *at = text && fits ? strstr(text, pat) : NULL;
    if (at) {
        char *num = at + strlen(pat) + strspn(at + strlen(pat), " \n[");
        double v = strtod(num, &end);
        if (end > num && mul_add) {             /* "key": [ NUMBER  ->  "key": [ NEW */
            char *rest;
            double mul = strtod(mul_add, &rest), add = strtod(rest, NULL);
            snprintf(old, sizeof old, "%.*s", (int)(end - at), at);
            snprintf(new, sizeof new, "%.*s%.17g", (int)(num - at), at, mul * v + add);
        } else if (end > num) {                 /* "key": NUMBER,  ->  nothing */
            end += strspn(end, " ");
            if (*end == ',') snprintf(old, sizeof old, "%.*s", (int)(end + 1 - at), at);
        }
    }
    int rc = old[0] ? sub_file(path, old, new) : -1;
    if (rc) fprintf(stderr, "    %s: cannot edit %s\n", path, key);
    free(text);
    return rc;
}

/* Sets fact name to a printf-formatted value. */
static void set_fact(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_fact(const char *name, const char *fmt, ...) {
    for (int i = 0; i < N_FACTS; i++)
        if (!strcmp(facts[i].name, name)) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(facts[i].value, sizeof facts[i].value, fmt, ap);
            va_end(ap);
        }
}

/* Fills in `facts` from the golden model (before the cases fork). 0, or -1 with a message. */
static int learn_model(void) {
    const char *dir = "test/golden/tiny-zimage";
    char path[1100];
    zj *cfg = zi_config_load(dir, "transformer");
    int dim = 0, cap = 0;
    if (!cfg || zi_cfg_need_int(cfg, "dim", &dim) || zi_cfg_need_int(cfg, "cap_feat_dim", &cap)) {
        zj_free(cfg);
        fprintf(stderr, "    %s\n", zi_err());
        return -1;
    }
    zj_free(cfg);
    set_fact("dim", "%d", dim);
    set_fact("dim+1", "%d", dim + 1);
    set_fact("cap_feat_dim", "%d", cap);
    set_fact("cap_feat_dim+1", "%d", cap + 1);

    snprintf(path, sizeof path, "%s/text_encoder", dir);
    zt_tensor_file(path, sizeof path, path, "model.norm.weight");
    set_fact("te.shard", "text_encoder/%s", strrchr(path, '/') + 1);

    /* K's shard, and another shard: the first other file the index names */
    snprintf(path, sizeof path, "%s/" TIDX, dir);
    zj *ix = zj_load(path);
    const zj *wm = zj_get(ix, "weight_map");
    const char *shard = zj_str(wm, K, NULL);
    for (int i = 0; shard && wm && i < wm->n; i++)
        if (wm->kids[i].type == ZJ_STR && strcmp(wm->kids[i].str, shard)) {
            set_fact("shard.other", "%s", wm->kids[i].str);
            break;
        }
    set_fact("shard", "transformer/%s", shard ? shard : "");
    set_fact("shard.file", "%s", shard ? shard : "");
    zj_free(ix);
    if (!shard || !fact("shard.other")[0]) {
        fprintf(stderr, "    %s: no shard holds %s, or it is the only one\n", path, K);
        return -1;
    }

    /* K's entry in its shard's header */
    size_t n = 0;
    snprintf(path, sizeof path, "%s/%s", dir, fact("shard"));
    char *buf = read_file(path, &n, 64 << 20);
    zj *hdr = buf ? st_header(buf, n, path) : NULL;
    const zj *e = zj_get(hdr, K), *shape = zj_get(e, "shape"), *offs = zj_get(e, "data_offsets");
    int ok = shape && shape->n == 2 && offs && offs->n == 2 && !strcmp(zj_str(e, "dtype", ""), "BF16");
    if (ok) {
        long long rows = (long long)zj_at(shape, 0)->num, cols = (long long)zj_at(shape, 1)->num;
        long long a = (long long)zj_at(offs, 0)->num, b = (long long)zj_at(offs, 1)->num;
        set_fact("K.shape", "[%lld,%lld]", rows, cols);
        set_fact("K.rows", "%lld", rows);
        set_fact("K.cols", "%lld", cols);
        set_fact("K.numel", "%lld", rows * cols);
        set_fact("K.offsets", "[%lld,%lld]", a, b);
        set_fact("K.begin", "%lld", a);
        set_fact("K.end", "%lld", b);
        set_fact("K.begin+1", "%lld", a + 1);
        set_fact("K.end+1", "%lld", b + 1);
        set_fact("K.overlap", "[%lld,%lld]", a > 0 ? 0 : b, a > 0 ? b - a : 2 * b);
    } else {
        fprintf(stderr, "    %s: no BF16 matrix %s in the header\n", path, K);
    }
    zj_free(hdr);
    free(buf);
    return ok ? 0 : -1;
}

/* Applies one edit; 0 or -1 (with a message). */
static int apply_edit(const edit *e, const char *model, const char *tmp) {
    if (e->op == NOP) return 0;
    char path[1400], file[1024], a[1024], b[1024];
    expand(file, sizeof file, e->file, model, tmp);
    if (file[0] == '/') snprintf(path, sizeof path, "%s", file);
    else snprintf(path, sizeof path, "%s/%s", model, file);
    expand(a, sizeof a, e->a ? e->a : "", model, tmp);
    expand(b, sizeof b, e->b ? e->b : "", model, tmp);
    size_t n = 0;
    char *buf = NULL;
    int rc = -1;
    switch (e->op) {
    case NOP: return 0;
    case RM: rc = unlink(path); break;
    case WRITE: rc = write_file(path, a, strlen(a)); break;
    case TRUNC:
        if ((buf = read_file(path, &n, 64 << 20))) {
            size_t keep = e->n >= 0 ? (size_t)e->n : (size_t)-e->n < n ? n - (size_t)-e->n : 0;
            rc = write_file(path, buf, keep < n ? keep : n);
        }
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
    case SUB: rc = sub_file(path, a, b); break;
    case CFG: rc = cfg_edit(path, a, e->b ? b : NULL); break;
    case FILL: {
        struct stat sb;
        if (!stat(path, &sb) && S_ISDIR(sb.st_mode)) zt_tensor_file(path, sizeof path, path, a);
        if (!(buf = read_file(path, &n, 64 << 20))) break;
        size_t h = (size_t)st_hlen(buf, n);
        zj *hdr = st_header(buf, n, path);
        const zj *offs = zj_get(zj_get(hdr, a), "data_offsets");
        if (offs && offs->n == 2) {
            size_t begin = 8 + h + (size_t)zj_at(offs, 0)->num, end = 8 + h + (size_t)zj_at(offs, 1)->num;
            for (size_t k = begin; k + 1 < end && end <= n; k += 2) {
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
        /* A [rank, in], B [dim, rank] (the module's output width: the transformer's) */
        int in = atoi(b), rank = 2, out = atoi(fact("dim"));
        float *A = zi_calloc((size_t)rank * in, sizeof *A), *B = zi_calloc((size_t)out * rank, sizeof *B);
        char name[1100];
        zi_stw *w = zi_stw_new();
        snprintf(name, sizeof name, "%s.lora_A.weight", a);
        zi_stw_add_f32(w, name, 2, (int64_t[]){rank, in}, A);
        if (e->n != 1) {
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
    CHECK(learn_model() == 0, "the golden model lacks what the cases need");
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
