/* make_model.c: writes a full-size Z-Image-Turbo model directory with random bf16 weights, for
 * `make bench-full` (usage: make_model OUT_DIR TOKENIZER_DIR).
 *
 * The layout and configs are those of the Hugging Face snapshot (zimage-arch.md §a, §g):
 * transformer/ and text_encoder/ in three shards with an index, vae/ in one file, scheduler/,
 * tokenizer/ (copied from TOKENIZER_DIR) and model_index.json: about 20.5 GB. The parameter counts
 * are checked against §h. Weights: a Linear or convolution weight is uniform with variance
 * 1/fan_in (the activations keep their scale from layer to layer and stay finite), norm weights
 * are 1, biases 0, embeddings and pad tokens uniform with variance 1.
 *
 * Written as a stream: each tensor is generated chunk by chunk (threads, a xorshift per chunk, so
 * the bytes do not depend on the thread count) and written at once; memory stays at one buffer.
 * OUT_DIR/.complete is written last: when it is there, nothing is done (the model is cached).
 */
#include "../zimage.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define STAMP "zimage-bench-model v1"

typedef enum { RAND, ONES, ZEROS } fill;

typedef struct {
    zi_st_entry e;
    fill kind;
    float std;          /* RAND: standard deviation */
} gen_tensor;

typedef struct {
    gen_tensor *t;
    int n;
    int64_t params;
} tensor_list;

/* Appends a tensor; shape given as ndim values. */
static void add(tensor_list *l, fill kind, float std, int ndim, const int64_t *shape, const char *fmt, ...) {
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    l->t = zi_realloc(l->t, (size_t)(l->n + 1) * sizeof *l->t);
    gen_tensor *g = &l->t[l->n++];
    *g = (gen_tensor){ .e = { zi_strdup(name), ZI_BF16, ndim, {0} }, .kind = kind, .std = std };
    memcpy(g->e.shape, shape, (size_t)ndim * sizeof *shape);
    l->params += zi_st_entry_bytes(&g->e) / 2;
}

#define SHAPE(...) (sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (const int64_t[]){__VA_ARGS__}

/* A Linear "NAME.weight" [out, in] (variance 1/in), with "NAME.bias" [out] = 0 when bias. */
static void linear(tensor_list *l, int64_t out, int64_t in, int bias, const char *name) {
    add(l, RAND, 1 / sqrtf((float)in), SHAPE(out, in), "%s.weight", name);
    if (bias) add(l, ZEROS, 0, SHAPE(out), "%s.bias", name);
}

/* ---------------------------------------------------------------- the transformer */
enum { D = 3840, NL = 30, NR = 2, NH = 30, CAP = 2560, LAT = 16, PATCH = 2, ADA = 256, TMID = 1024, TFREQ = 256 };
#define FFN ((int64_t)(D / 3.0 * 8))   /* diffusers: int(dim / 3 * 8) */

static void dit_block(tensor_list *l, const char *b, int modulated) {
    char n[128];
    const char *lin[4] = { "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0" };
    for (int i = 0; i < 4; i++) snprintf(n, sizeof n, "%s.%s", b, lin[i]), linear(l, D, D, 0, n);
    add(l, ONES, 0, SHAPE(D / NH), "%s.attention.norm_q.weight", b);
    add(l, ONES, 0, SHAPE(D / NH), "%s.attention.norm_k.weight", b);
    snprintf(n, sizeof n, "%s.feed_forward.w1", b), linear(l, FFN, D, 0, n);
    snprintf(n, sizeof n, "%s.feed_forward.w2", b), linear(l, D, FFN, 0, n);
    snprintf(n, sizeof n, "%s.feed_forward.w3", b), linear(l, FFN, D, 0, n);
    const char *norms[4] = { "attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2" };
    for (int i = 0; i < 4; i++) add(l, ONES, 0, SHAPE(D), "%s.%s.weight", b, norms[i]);
    if (modulated) snprintf(n, sizeof n, "%s.adaLN_modulation.0", b), linear(l, 4 * D, ADA, 1, n);
}

static void dit_tensors(tensor_list *l) {
    int64_t pdim = PATCH * PATCH * LAT;
    linear(l, D, pdim, 1, "all_x_embedder.2-1");
    linear(l, TMID, TFREQ, 1, "t_embedder.mlp.0");
    linear(l, ADA, TMID, 1, "t_embedder.mlp.2");
    add(l, ONES, 0, SHAPE(CAP), "cap_embedder.0.weight");
    linear(l, D, CAP, 1, "cap_embedder.1");
    add(l, RAND, 1, SHAPE(1, D), "x_pad_token");
    add(l, RAND, 1, SHAPE(1, D), "cap_pad_token");
    char b[64];
    for (int i = 0; i < NR; i++) snprintf(b, sizeof b, "noise_refiner.%d", i), dit_block(l, b, 1);
    for (int i = 0; i < NR; i++) snprintf(b, sizeof b, "context_refiner.%d", i), dit_block(l, b, 0);
    for (int i = 0; i < NL; i++) snprintf(b, sizeof b, "layers.%d", i), dit_block(l, b, 1);
    linear(l, pdim, D, 1, "all_final_layer.2-1.linear");
    linear(l, D, ADA, 1, "all_final_layer.2-1.adaLN_modulation.1");
}

static const char dit_config[] =
    "{\n  \"_class_name\": \"ZImageTransformer2DModel\",\n  \"_diffusers_version\": \"0.36.0.dev0\",\n"
    "  \"all_f_patch_size\": [1],\n  \"all_patch_size\": [2],\n  \"axes_dims\": [32, 48, 48],\n"
    "  \"axes_lens\": [1536, 512, 512],\n  \"cap_feat_dim\": 2560,\n  \"dim\": 3840,\n  \"in_channels\": 16,\n"
    "  \"n_heads\": 30,\n  \"n_kv_heads\": 30,\n  \"n_layers\": 30,\n  \"n_refiner_layers\": 2,\n"
    "  \"norm_eps\": 1e-05,\n  \"qk_norm\": true,\n  \"rope_theta\": 256.0,\n  \"t_scale\": 1000.0\n}\n";

/* ---------------------------------------------------------------- the text encoder (Qwen3-4B) */
enum { TD = 2560, TI = 9728, TL = 36, TQ = 32, TKV = 8, THD = 128, VOCAB = 151936 };

static void te_tensors(tensor_list *l) {
    add(l, RAND, 1, SHAPE(VOCAB, TD), "model.embed_tokens.weight");
    char n[128];
    for (int i = 0; i < TL; i++) {
        add(l, ONES, 0, SHAPE(TD), "model.layers.%d.input_layernorm.weight", i);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.q_proj", i), linear(l, TQ * THD, TD, 0, n);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.k_proj", i), linear(l, TKV * THD, TD, 0, n);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.v_proj", i), linear(l, TKV * THD, TD, 0, n);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.o_proj", i), linear(l, TD, TQ * THD, 0, n);
        add(l, ONES, 0, SHAPE(THD), "model.layers.%d.self_attn.q_norm.weight", i);
        add(l, ONES, 0, SHAPE(THD), "model.layers.%d.self_attn.k_norm.weight", i);
        add(l, ONES, 0, SHAPE(TD), "model.layers.%d.post_attention_layernorm.weight", i);
        snprintf(n, sizeof n, "model.layers.%d.mlp.gate_proj", i), linear(l, TI, TD, 0, n);
        snprintf(n, sizeof n, "model.layers.%d.mlp.up_proj", i), linear(l, TI, TD, 0, n);
        snprintf(n, sizeof n, "model.layers.%d.mlp.down_proj", i), linear(l, TD, TI, 0, n);
    }
    add(l, ONES, 0, SHAPE(TD), "model.norm.weight");
}

static const char te_config[] =
    "{\n  \"architectures\": [\"Qwen3ForCausalLM\"],\n  \"attention_bias\": false,\n  \"attention_dropout\": 0.0,\n"
    "  \"bos_token_id\": 151643,\n  \"eos_token_id\": 151645,\n  \"head_dim\": 128,\n  \"hidden_act\": \"silu\",\n"
    "  \"hidden_size\": 2560,\n  \"initializer_range\": 0.02,\n  \"intermediate_size\": 9728,\n"
    "  \"max_position_embeddings\": 40960,\n  \"max_window_layers\": 36,\n  \"model_type\": \"qwen3\",\n"
    "  \"num_attention_heads\": 32,\n  \"num_hidden_layers\": 36,\n  \"num_key_value_heads\": 8,\n"
    "  \"rms_norm_eps\": 1e-06,\n  \"rope_scaling\": null,\n  \"rope_theta\": 1000000,\n  \"sliding_window\": null,\n"
    "  \"tie_word_embeddings\": true,\n  \"torch_dtype\": \"bfloat16\",\n  \"use_cache\": true,\n"
    "  \"use_sliding_window\": false,\n  \"vocab_size\": 151936\n}\n";

/* ---------------------------------------------------------------- the VAE (FLUX) */
enum { VB = 4, VLAYERS = 2, VGROUPS = 32 };
static const int vch[VB] = { 128, 256, 512, 512 };

static void conv(tensor_list *l, int64_t cout, int64_t cin, int k, const char *pre) {
    add(l, RAND, 1 / sqrtf((float)(cin * k * k)), SHAPE(cout, cin, k, k), "%s.weight", pre);
    add(l, ZEROS, 0, SHAPE(cout), "%s.bias", pre);
}

static void group_norm(tensor_list *l, int64_t C, const char *pre) {
    add(l, ONES, 0, SHAPE(C), "%s.weight", pre);
    add(l, ZEROS, 0, SHAPE(C), "%s.bias", pre);
}

static void resnet(tensor_list *l, int cin, int cout, const char *pre) {
    char n[160];
    snprintf(n, sizeof n, "%s.norm1", pre), group_norm(l, cin, n);
    snprintf(n, sizeof n, "%s.conv1", pre), conv(l, cout, cin, 3, n);
    snprintf(n, sizeof n, "%s.norm2", pre), group_norm(l, cout, n);
    snprintf(n, sizeof n, "%s.conv2", pre), conv(l, cout, cout, 3, n);
    if (cin != cout) snprintf(n, sizeof n, "%s.conv_shortcut", pre), conv(l, cout, cin, 1, n);
}

static void mid_block(tensor_list *l, const char *coder, int C) {
    char n[160];
    snprintf(n, sizeof n, "%s.mid_block.resnets.0", coder), resnet(l, C, C, n);
    snprintf(n, sizeof n, "%s.mid_block.attentions.0.group_norm", coder), group_norm(l, C, n);
    const char *lin[4] = { "to_q", "to_k", "to_v", "to_out.0" };
    for (int i = 0; i < 4; i++) snprintf(n, sizeof n, "%s.mid_block.attentions.0.%s", coder, lin[i]), linear(l, C, C, 1, n);
    snprintf(n, sizeof n, "%s.mid_block.resnets.1", coder), resnet(l, C, C, n);
}

static void vae_tensors(tensor_list *l) {
    char n[160];
    conv(l, vch[0], 3, 3, "encoder.conv_in");
    int cin = vch[0];
    for (int i = 0; i < VB; i++) {
        for (int j = 0; j < VLAYERS; j++, cin = vch[i])
            snprintf(n, sizeof n, "encoder.down_blocks.%d.resnets.%d", i, j), resnet(l, cin, vch[i], n);
        if (i < VB - 1) snprintf(n, sizeof n, "encoder.down_blocks.%d.downsamplers.0.conv", i), conv(l, vch[i], vch[i], 3, n);
    }
    mid_block(l, "encoder", vch[VB - 1]);
    group_norm(l, vch[VB - 1], "encoder.conv_norm_out");
    conv(l, 2 * LAT, vch[VB - 1], 3, "encoder.conv_out");
    conv(l, vch[VB - 1], LAT, 3, "decoder.conv_in");
    mid_block(l, "decoder", vch[VB - 1]);
    cin = vch[VB - 1];
    for (int i = 0; i < VB; i++) {
        int c = vch[VB - 1 - i];
        for (int j = 0; j < VLAYERS + 1; j++, cin = c)
            snprintf(n, sizeof n, "decoder.up_blocks.%d.resnets.%d", i, j), resnet(l, cin, c, n);
        if (i < VB - 1) snprintf(n, sizeof n, "decoder.up_blocks.%d.upsamplers.0.conv", i), conv(l, c, c, 3, n);
    }
    group_norm(l, vch[0], "decoder.conv_norm_out");
    conv(l, 3, vch[0], 3, "decoder.conv_out");
}

static const char vae_config[] =
    "{\n  \"_class_name\": \"AutoencoderKL\",\n  \"_diffusers_version\": \"0.36.0.dev0\",\n  \"act_fn\": \"silu\",\n"
    "  \"block_out_channels\": [128, 256, 512, 512],\n"
    "  \"down_block_types\": [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\", \"DownEncoderBlock2D\", \"DownEncoderBlock2D\"],\n"
    "  \"force_upcast\": true,\n  \"in_channels\": 3,\n  \"latent_channels\": 16,\n  \"latents_mean\": null,\n"
    "  \"latents_std\": null,\n  \"layers_per_block\": 2,\n  \"mid_block_add_attention\": true,\n  \"norm_num_groups\": 32,\n"
    "  \"out_channels\": 3,\n  \"sample_size\": 1024,\n  \"scaling_factor\": 0.3611,\n  \"shift_factor\": 0.1159,\n"
    "  \"up_block_types\": [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\", \"UpDecoderBlock2D\", \"UpDecoderBlock2D\"],\n"
    "  \"use_post_quant_conv\": false,\n  \"use_quant_conv\": false\n}\n";

static const char scheduler_config[] =
    "{\n  \"_class_name\": \"FlowMatchEulerDiscreteScheduler\",\n  \"_diffusers_version\": \"0.36.0.dev0\",\n"
    "  \"num_train_timesteps\": 1000,\n  \"shift\": 3.0,\n  \"use_dynamic_shifting\": false\n}\n";

static const char model_index[] =
    "{\n  \"_class_name\": \"ZImagePipeline\",\n  \"_diffusers_version\": \"0.36.0.dev0\",\n"
    "  \"scheduler\": [\"diffusers\", \"FlowMatchEulerDiscreteScheduler\"],\n"
    "  \"text_encoder\": [\"transformers\", \"Qwen3Model\"],\n  \"tokenizer\": [\"transformers\", \"Qwen2Tokenizer\"],\n"
    "  \"transformer\": [\"diffusers\", \"ZImageTransformer2DModel\"],\n  \"vae\": [\"diffusers\", \"AutoencoderKL\"]\n}\n";

/* ---------------------------------------------------------------- generation */
static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static uint64_t hash_name(const char *s) {
    uint64_t h = 1469598103934665603ull;        /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

enum { GCHUNK = 1 << 16, BUF = 1 << 24 };   /* values per generator chunk, per write */

typedef struct {
    uint16_t *buf;
    int64_t first;      /* index in the tensor of buf[0] */
    int64_t n;
    uint64_t seed;
    float half_width;   /* uniform on [-a, a]: a = std·√3 */
} gen_job;

/* Chunk c of the tensor: its own xorshift64*, four 16-bit uniforms per step, each scaled to
 * [-a, a] and truncated to bf16 (the rounding does not matter for random weights). */
static void gen_range(void *ctx, int64_t c0, int64_t c1) {
    const gen_job *g = ctx;
    float s = g->half_width / 32768.0f;
    for (int64_t c = c0; c < c1; c++) {
        int64_t lo = c * GCHUNK, hi = lo + GCHUNK < g->n ? lo + GCHUNK : g->n;
        uint64_t x = splitmix64(g->seed ^ (uint64_t)((g->first + lo) / GCHUNK)) | 1;
        for (int64_t i = lo; i < hi; i += 4) {
            x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
            uint64_t r = x * 0x2545F4914F6CDD1Dull;
            for (int k = 0; k < 4 && i + k < hi; k++) {
                union { float f; uint32_t u; } v = { (float)(int16_t)(r >> (16 * k)) * s };
                g->buf[i + k] = (uint16_t)(v.u >> 16);
            }
        }
    }
}

static int write_tensor(FILE *f, const gen_tensor *t, uint16_t *buf, const char *path) {
    int64_t n = zi_st_entry_bytes(&t->e) / 2;
    if (t->kind != RAND) {
        uint16_t v = t->kind == ONES ? zi_f32_to_bf16(1.0f) : 0;
        for (int64_t i = 0; i < (n < BUF ? n : BUF); i++) buf[i] = v;
    }
    for (int64_t first = 0; first < n; first += BUF) {
        int64_t m = n - first < BUF ? n - first : BUF;
        if (t->kind == RAND) {
            gen_job g = { buf, first, m, hash_name(t->e.name), t->std * sqrtf(3.0f) };
            zi_parallel_for((m + GCHUNK - 1) / GCHUNK, 1, gen_range, &g);
        }
        if (fwrite(buf, 2, (size_t)m, f) != (size_t)m) {
            zi_seterr("%s: write failed: %s", path, strerror(errno));
            return -1;
        }
    }
    return 0;
}

static int write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f)) {
        zi_seterr("%s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* One safetensors file of tensors t[0..n). */
static int write_file(const char *path, const gen_tensor *t, int n, uint16_t *buf) {
    zi_st_entry *e = zi_malloc((size_t)n * sizeof *e);
    for (int i = 0; i < n; i++) e[i] = t[i].e;
    FILE *f = fopen(path, "wb");
    int rc = !f || zi_st_write_header(f, e, n, path);
    if (!f) zi_seterr("%s: %s", path, strerror(errno));
    for (int i = 0; !rc && i < n; i++) rc = write_tensor(f, &t[i], buf, path);
    if (f && fclose(f) && !rc) { zi_seterr("%s: write failed", path); rc = 1; }
    free(e);
    return rc ? -1 : 0;
}

/* DIR/BASE.safetensors, or `shards` files BASE-0000k-of-0000n.safetensors (split at equal byte
 * counts, tensors whole) and BASE.safetensors.index.json. */
static int write_component(const char *dir, const char *base, const tensor_list *l, int shards, uint16_t *buf) {
    if (shards == 1) {
        char *p = zi_path("%s/%s.safetensors", dir, base);
        int rc = write_file(p, l->t, l->n, buf);
        free(p);
        return rc;
    }
    int64_t total = 0, acc = 0;
    for (int i = 0; i < l->n; i++) total += zi_st_entry_bytes(&l->t[i].e);
    int *shard_of = zi_malloc((size_t)l->n * sizeof *shard_of), rc = 0;
    for (int i = 0; i < l->n; i++) {
        int s = (int)(acc * shards / total);
        shard_of[i] = s < shards ? s : shards - 1;
        acc += zi_st_entry_bytes(&l->t[i].e);
    }
    char *ip = zi_path("%s/%s.safetensors.index.json", dir, base);
    FILE *idx = fopen(ip, "w");
    if (!idx) { zi_seterr("%s: %s", ip, strerror(errno)); rc = -1; }
    if (idx) fprintf(idx, "{\n  \"metadata\": {\n    \"total_size\": %lld\n  },\n  \"weight_map\": {", (long long)total);
    for (int s = 0, i = 0; s < shards && !rc; s++) {
        int j = i;
        while (j < l->n && shard_of[j] == s) j++;
        char *name = zi_path("%s-%05d-of-%05d.safetensors", base, s + 1, shards), *p = zi_path("%s/%s", dir, name);
        for (int k = i; k < j; k++) fprintf(idx, "%s\n    \"%s\": \"%s\"", k ? "," : "", l->t[k].e.name, name);
        rc = write_file(p, l->t + i, j - i, buf);
        fprintf(stderr, "  %s: %d tensors\n", p, j - i);
        free(name); free(p);
        i = j;
    }
    if (idx) {
        fputs("\n  }\n}\n", idx);
        if (fclose(idx) && !rc) { zi_seterr("%s: write failed", ip); rc = -1; }
    }
    free(ip); free(shard_of);
    return rc;
}

/* Expected from zimage-arch.md §h. */
static int check_params(const char *what, const tensor_list *l, int64_t want, int want_tensors) {
    fprintf(stderr, "%s: %d tensors, %lld parameters (%.2f GB bf16)\n", what, l->n, (long long)l->params,
            l->params * 2e-9);
    if (l->params == want && l->n == want_tensors) return 0;
    zi_seterr("%s: %d tensors and %lld parameters, zimage-arch.md §h says %d and %lld", what, l->n,
              (long long)l->params, want_tensors, (long long)want);
    return -1;
}

static int make_dirs(const char *out) {
    const char *subs[] = { "", "/transformer", "/text_encoder", "/vae", "/scheduler", "/tokenizer" };
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++) {
        char *p = zi_path("%s%s", out, subs[i]);
        int rc = mkdir(p, 0777) && errno != EEXIST;
        if (rc) zi_seterr("%s: %s", p, strerror(errno));
        free(p);
        if (rc) return -1;
    }
    return 0;
}

static int copy_tokenizer(const char *src, const char *out) {
    const char *files[] = { "tokenizer.json", "tokenizer_config.json" };
    for (int i = 0; i < 2; i++) {
        char *a = zi_path("%s/%s", src, files[i]), *b = zi_path("%s/tokenizer/%s", out, files[i]);
        FILE *fa = fopen(a, "rb"), *fb = fa ? fopen(b, "wb") : NULL;
        int rc = !fa || !fb;
        if (rc) zi_seterr("%s: %s", fa ? b : a, strerror(errno));
        char buf[1 << 16];
        for (size_t n; !rc && (n = fread(buf, 1, sizeof buf, fa)) > 0;) rc = fwrite(buf, 1, n, fb) != n;
        if (fa) fclose(fa);
        if (fb && fclose(fb)) rc = 1;
        free(a); free(b);
        if (rc) return -1;
    }
    return 0;
}

static int is_complete(const char *out) {
    char *p = zi_path("%s/.complete", out), line[64] = "";
    FILE *f = fopen(p, "r");
    free(p);
    if (!f) return 0;
    int ok = fgets(line, sizeof line, f) && !strncmp(line, STAMP, strlen(STAMP));
    fclose(f);
    return ok;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: make_model OUT_DIR TOKENIZER_DIR\n");
        return 1;
    }
    const char *out = argv[1];
    if (is_complete(out)) {
        fprintf(stderr, "%s: already there\n", out);
        return 0;
    }
    zi_threads_init(0);
    tensor_list dit = {0}, te = {0}, vae = {0};
    dit_tensors(&dit);
    te_tensors(&te);
    vae_tensors(&vae);
    if (check_params("transformer", &dit, 6154908736, 521) || check_params("text_encoder", &te, 4022468096, 398) ||
        check_params("vae", &vae, 83819683, 244))
        zi_die("%s", zi_err());
    double t0 = zi_now();
    uint16_t *buf = zi_malloc((size_t)BUF * sizeof *buf);
    char *td = zi_path("%s/transformer", out), *ed = zi_path("%s/text_encoder", out), *vd = zi_path("%s/vae", out);
    char *p[5] = { zi_path("%s/config.json", td), zi_path("%s/config.json", ed), zi_path("%s/config.json", vd),
                   zi_path("%s/scheduler/scheduler_config.json", out), zi_path("%s/model_index.json", out) };
    if (make_dirs(out) || copy_tokenizer(argv[2], out) || write_text(p[0], dit_config) || write_text(p[1], te_config) ||
        write_text(p[2], vae_config) || write_text(p[3], scheduler_config) || write_text(p[4], model_index) ||
        write_component(td, "diffusion_pytorch_model", &dit, 3, buf) || write_component(ed, "model", &te, 3, buf) ||
        write_component(vd, "diffusion_pytorch_model", &vae, 1, buf))
        zi_die("%s", zi_err());
    char *stamp = zi_path("%s/.complete", out);
    if (write_text(stamp, STAMP "\n")) zi_die("%s", zi_err());
    double gb = (dit.params + te.params + vae.params) * 2e-9, dt = zi_now() - t0;
    fprintf(stderr, "%s: %.1f GB written in %.1f s (%.2f GB/s)\n", out, gb, dt, gb / dt);
    for (int i = 0; i < 5; i++) free(p[i]);
    free(stamp); free(td); free(ed); free(vd); free(buf);
    tensor_list *ls[3] = { &dit, &te, &vae };
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < ls[k]->n; i++) free((char *)ls[k]->t[i].e.name);
        free(ls[k]->t);
    }
    return 0;
}
