/* sample.c: the inference command line. README.md describes its interface; run
 * `./sample --help` for the whole list. */
#include "zimage.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char usage[] =
"usage: sample MODEL_DIR \"PROMPT\" [options]\n"
"       sample --info MODEL_DIR\n"
"       sample MODEL_DIR --tokenize TEXT\n"
"       sample MODEL_DIR --eval IN.safetensors --eval-out OUT.safetensors [--lora FILE[:S]]\n"
"       sample --convert-lora IN OUT --to diffsynth|diffusers|comfyui|kohya\n"
"       sample --convert IN_DIR OUT_DIR   (a bf16 copy of an fp32 checkpoint)\n"
"\n"
"  -o, --output FILE      PNG to write (out.png)\n"
"  -n, --negative TEXT    negative prompt, used when --cfg > 1 (\"\")\n"
"  -W, --width N          image width, a multiple of 16 (1024)\n"
"  -H, --height N         image height, a multiple of 16 (1024)\n"
"      --steps N          sampler steps (8)\n"
"      --cfg S            guidance scale, neg + S*(pos - neg); 1 = off (1)\n"
"      --guidance G       the same in diffusers' convention: G = S - 1\n"
"      --cfg-norm C       cap |pred| at C*|pos|; 0 = off (0)\n"
"      --cfg-trunc T      no guidance once 1 - sigma > T; 1 = off (1)\n"
"      --shift F          flow-matching shift (scheduler config)\n"
"      --sampler NAME     euler, heun, dpmpp_2m (euler)\n"
"      --seed N           seed (random, printed)\n"
"      --rng cpu|cuda     noise of torch.randn on that device's generator (cpu: bit-identical;\n"
"                         cuda: within ~3e-7)\n"
"      --lora FILE[:S]    apply a LoRA with strength S (1); repeatable\n"
"      --lora-merge       merge LoRAs into the weights (bf16 rounding) instead of run-time adapters\n"
"      --init-image FILE  img2img from this PNG/JPEG (diffusers' ZImageImg2ImgPipeline); its size is\n"
"                         the output size (multiples of 16; -W/-H, when given, must equal it)\n"
"      --strength S       img2img: the share of the schedule to run, (0, 1]; 1 = from pure noise (0.6)\n"
"  -t, --threads N        worker threads (all cores)\n"
"      --fast             bf16 matrix products (fp32 sums; AMX / AVX512-BF16 where the CPU has\n"
"                         them): faster there, no faster elsewhere, not the golden numbers\n"
"                         (also ZIMAGE_FAST=1)\n"
"      --dump FILE        write every intermediate tensor to a safetensors file\n"
"  -q                     no progress output\n";

/* ---------------------------------------------------------------- flag values */
static long parse_int(const char *flag, const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        zi_die("%s: expected an integer in [%ld, %ld], got '%s'", flag, lo, hi, s);
    return v;
}

static double parse_number(const char *flag, const char *s, double lo, double hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        zi_die("%s: expected a number in [%g, %g], got '%s'", flag, lo, hi, s);
    return v;
}

/* ---------------------------------------------------------------- --info */
static void info_component(const char *dir, const char *sub) {
    char *path = zi_path("%s/%s", dir, sub);
    zj *cfg = zi_config_load(dir, sub);
    const char *cls = cfg ? zj_str(cfg, "_class_name", NULL) : NULL;
    if (cfg && !cls) {
        const zj *arch = zj_get(cfg, "architectures");
        cls = arch && arch->n > 0 && zj_at(arch, 0)->type == ZJ_STR ? zj_at(arch, 0)->str : NULL;
    }
    printf("%s/\n  class:   %s\n", sub, cls ? cls : "?");
    if (!strcmp(sub, "scheduler") || !strcmp(sub, "tokenizer")) {
        zj_free(cfg);
        free(path);
        return;
    }
    zi_st *st = zi_st_open(path);
    if (!st) {
        printf("  error:   %s\n", zi_err());
    } else {
        int64_t params = 0, per_dtype[ZI_NDTYPES] = {0};
        for (int i = 0; i < zi_st_count(st); i++) {
            const zi_tensor *t = zi_st_at(st, i);
            params += t->numel;
            per_dtype[t->dtype] += t->numel;
        }
        printf("  dtype:  ");
        for (int d = 0; d < ZI_NDTYPES; d++)
            if (per_dtype[d]) printf(" %s (%.1f%%)", zi_dtype_name((zi_dtype)d), 100.0 * per_dtype[d] / params);
        printf("\n  tensors: %d\n  params:  %lld (%.3f B)\n", zi_st_count(st), (long long)params, params / 1e9);
        size_t total = 0;
        for (int s = 0; s < zi_st_nshards(st); s++) total += zi_st_shard_bytes(st, s);
        printf("  files:   %d, %.1f MB\n", zi_st_nshards(st), total / 1e6);
        zi_st_close(st);
    }
    zj_free(cfg);
    free(path);
}

static int cmd_info(const char *dir) {
    zj *index = zi_config_load(dir, NULL);
    if (!index) zi_die("%s", zi_err());
    printf("%s: %s\n", dir, zj_str(index, "_class_name", "?"));
    for (int i = 0; i < index->n; i++) {
        const char *k = index->keys[i];
        if (k[0] == '_' || index->kids[i].type != ZJ_ARR) continue;
        info_component(dir, k);
    }
    zj_free(index);
    return 0;
}

/* ---------------------------------------------------------------- --tokenize */
static int cmd_tokenize(const char *dir, const char *text) {
    char *path = zi_path("%s/tokenizer", dir);
    zi_tokenizer *tok = zi_tok_load(path);
    free(path);
    if (!tok) zi_die("%s", zi_err());
    int32_t *ids;
    int n = zi_tok_encode(tok, text, strlen(text), &ids);
    if (n < 0) zi_die("--tokenize: %s", zi_err());
    for (int i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
    printf("\n");
    free(ids);
    zi_tok_free(tok);
    return 0;
}

/* ---------------------------------------------------------------- --eval */
/* The input tensor NAME as float32 (malloc'd), checking its rank; NULL when absent. */
static float *eval_input(const zi_st *in, const char *name, int ndim, const zi_tensor **t) {
    *t = zi_st_get(in, name);
    if (!*t) return NULL;
    if ((*t)->ndim != ndim) zi_die("%s: %s has %d dimensions, expected %d", zi_st_path(in), name, (*t)->ndim, ndim);
    float *v = zi_tensor_f32(*t);
    if (!v) zi_die("%s: %s is not a float tensor", zi_st_path(in), name);
    return v;
}

/* The input must have the shape the model needs: want[k] is a size, or -1 for any size >= 1. */
static void eval_check(const zi_st *in, const char *name, const zi_tensor *t, int ndim, const int64_t *want) {
    int ok = t->ndim == ndim;
    for (int k = 0; k < ndim && ok; k++) ok = want[k] < 0 ? t->shape[k] >= 1 : t->shape[k] == want[k];
    if (ok) return;
    char buf[128];
    int n = 0;
    for (int k = 0; k < ndim; k++)
        n += snprintf(buf + n, sizeof buf - (size_t)n, want[k] < 0 ? "%sN" : "%s%lld", k ? ", " : "", (long long)want[k]);
    zi_die("%s: %s must have the shape [%s] for this model", zi_st_path(in), name, buf);
}

static void eval_te(const char *dir, const zi_st *in, zi_stw *out) {
    const zi_tensor *t = zi_st_get(in, "te.ids");
    if (!t) return;
    if (t->ndim != 1 || (t->dtype != ZI_I64 && t->dtype != ZI_I32))
        zi_die("%s: te.ids must be a 1-D int64 tensor", zi_st_path(in));
    int L = (int)t->numel;
    int32_t *ids = zi_malloc((size_t)L * sizeof *ids);
    for (int i = 0; i < L; i++) {
        int64_t v = t->dtype == ZI_I64 ? ((const int64_t *)t->data)[i] : ((const int32_t *)t->data)[i];
        if (v < 0 || v > INT32_MAX) zi_die("%s: te.ids[%d] = %lld is not a token id", zi_st_path(in), i, (long long)v);
        ids[i] = (int32_t)v;
    }
    char *path = zi_path("%s/text_encoder", dir);
    zi_te *te = zi_te_load(path);
    free(path);
    if (!te) zi_die("%s", zi_err());
    float *e = zi_te_encode(te, ids, L);
    if (!e) zi_die("%s: %s", zi_st_path(in), zi_err());
    zi_stw_add_f32(out, "te.embeds", 2, (int64_t[]){L, zi_te_dim(te)}, e);
    free(e); free(ids);
    zi_te_free(te);
}

static void eval_dit(const char *dir, const zi_params *p, const zi_st *in, zi_stw *out) {
    const zi_tensor *tx, *tt, *tc;
    float *x = eval_input(in, "dit.x", 4, &tx), *t = eval_input(in, "dit.t", 1, &tt), *cap = eval_input(in, "dit.cap", 2, &tc);
    if (!x && !t && !cap) return;
    if (!x || !t || !cap) zi_die("%s: dit.x, dit.t and dit.cap go together", zi_st_path(in));
    zi_lora **loras = zi_calloc((size_t)p->n_lora + 1, sizeof *loras);
    zi_dit *dit = zi_dit_load_with_loras(dir, p, loras);
    if (!dit) zi_die("%s", zi_err());
    const zi_dit_cfg *c = zi_dit_config(dit);
    eval_check(in, "dit.x", tx, 4, (int64_t[]){c->in_channels, 1, -1, -1});
    eval_check(in, "dit.t", tt, 1, (int64_t[]){1});
    eval_check(in, "dit.cap", tc, 2, (int64_t[]){-1, c->cap_feat_dim});
    int h = (int)tx->shape[2], w = (int)tx->shape[3], L = (int)tc->shape[0];
    float *o = zi_malloc((size_t)tx->numel * sizeof *o);
    int rc = zi_dit_forward(dit, 1, (const float *const *)&x, &h, &w, t, (const float *const *)&cap, &L, &o);
    if (!rc) zi_stw_add_f32(out, "dit.out", 4, tx->shape, o);
    for (int i = p->n_lora - 1; i >= 0; i--) zi_lora_free(loras[i]);
    zi_dit_free(dit);
    free(loras); free(o); free(x); free(t); free(cap);
    if (rc) zi_die("%s: %s", zi_st_path(in), zi_err());
}

static void eval_vae(const char *dir, const zi_st *in, zi_stw *out) {
    const zi_tensor *tz, *ti;
    float *z = eval_input(in, "vae.z", 4, &tz), *img = eval_input(in, "vae.img_in", 4, &ti);
    if (!z && !img) return;
    char *path = zi_path("%s/vae", dir);
    zi_vae *vae = zi_vae_load(path);
    free(path);
    if (!vae) zi_die("%s", zi_err());
    if (z) eval_check(in, "vae.z", tz, 4, (int64_t[]){1, zi_vae_latent_channels(vae), -1, -1});
    if (img) eval_check(in, "vae.img_in", ti, 4, (int64_t[]){1, 3, -1, -1});
    if (z) {
        int h = (int)tz->shape[2], w = (int)tz->shape[3], f = zi_vae_factor(vae);
        float *o = zi_vae_decode(vae, z, h, w);
        if (!o) zi_die("%s: %s", zi_st_path(in), zi_err());
        zi_stw_add_f32(out, "vae.img", 4, (int64_t[]){1, 3, (int64_t)h * f, (int64_t)w * f}, o);
        free(o);
    }
    if (img) {
        int H = (int)ti->shape[2], W = (int)ti->shape[3], f = zi_vae_factor(vae), C = zi_vae_latent_channels(vae);
        float *mean, *logvar;
        if (zi_vae_encode(vae, img, H, W, &mean, &logvar)) zi_die("%s: %s", zi_st_path(in), zi_err());
        int64_t shape[4] = {1, C, H / f, W / f};
        zi_stw_add_f32(out, "vae.mean", 4, shape, mean);
        zi_stw_add_f32(out, "vae.logvar", 4, shape, logvar);
        free(mean); free(logvar);
    }
    zi_vae_free(vae);
    free(z); free(img);
}

/* Each group of inputs present in IN is evaluated, one component loaded at a time. */
static int cmd_eval(const char *dir, const zi_params *p, const char *inpath, const char *outpath) {
    zi_st *in = zi_st_open(inpath);
    if (!in) zi_die("%s", zi_err());
    zi_stw *out = zi_stw_new();
    eval_te(dir, in, out);
    eval_dit(dir, p, in, out);
    eval_vae(dir, in, out);
    zi_st_close(in);
    if (zi_stw_write(out, outpath)) zi_die("%s", zi_err());
    zi_stw_free(out);
    return 0;
}

/* ---------------------------------------------------------------- --convert-lora */
static int cmd_convert(const char *in, const char *out, const char *fmt) {
    if (!fmt) zi_die("--convert-lora: --to FORMAT is required (diffsynth, diffusers, comfyui, kohya)");
    zi_lora *l = zi_lora_load(in);
    if (!l) zi_die("%s", zi_err());
    for (int i = 0; i < l->n_unknown; i++)
        fprintf(stderr, "warning: %s: key %s is not a LoRA weight we know; not converted\n", in, l->unknown[i]);
    zi_dtype dt = l->dtype == ZI_F16 || l->dtype == ZI_BF16 ? l->dtype : ZI_F32;
    if (zi_lora_save(l, out, fmt, dt, NULL)) zi_die("%s", zi_err());
    fprintf(stderr, "%s: %d modules written as %s\n", out, l->n, fmt);
    zi_lora_free(l);
    return 0;
}

/* ---------------------------------------------------------------- main */
int main(int argc, char **argv) {
    const char *pos[2] = {0};
    int npos = 0;
    const char *output = "out.png", *info = NULL, *tokenize = NULL, *eval_in = NULL, *eval_out = NULL;
    const char *convert[2] = {0}, *convert_to = NULL, *bf16[2] = {0};
    int threads = 0;
    zi_params p = zi_params_default();
    char *lora_files[64];
    float lora_strengths[64];
    int seed_given = 0, size_given = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define VALUE() (i + 1 < argc ? argv[++i] : (zi_die("%s: missing value", a), (char *)0))
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) output = VALUE();
        else if (!strcmp(a, "-n") || !strcmp(a, "--negative")) p.negative = VALUE();
        else if (!strcmp(a, "-W") || !strcmp(a, "--width")) { p.width = (int)parse_int(a, VALUE(), 16, 16384); size_given = 1; }
        else if (!strcmp(a, "-H") || !strcmp(a, "--height")) { p.height = (int)parse_int(a, VALUE(), 16, 16384); size_given = 1; }
        else if (!strcmp(a, "--steps")) p.steps = (int)parse_int(a, VALUE(), 1, 10000);
        else if (!strcmp(a, "--cfg")) p.cfg = parse_number(a, VALUE(), 0, 1000);
        else if (!strcmp(a, "--guidance")) p.cfg = parse_number(a, VALUE(), 0, 1000) + 1.0f;
        else if (!strcmp(a, "--cfg-norm")) p.cfg_norm = parse_number(a, VALUE(), 0, 1000);
        else if (!strcmp(a, "--cfg-trunc")) p.cfg_trunc = parse_number(a, VALUE(), 0, 1);
        else if (!strcmp(a, "--shift")) p.shift = parse_number(a, VALUE(), 1e-3, 1000);
        else if (!strcmp(a, "--sampler")) p.sampler = VALUE();
        else if (!strcmp(a, "--seed")) { p.seed = (uint64_t)parse_int(a, VALUE(), 0, LONG_MAX); seed_given = 1; }
        else if (!strcmp(a, "--rng")) { if (zi_rng_parse(VALUE(), &p.rng)) zi_die("%s", zi_err()); }
        else if (!strcmp(a, "--lora")) {
            if (p.n_lora == 64) zi_die("--lora: at most 64 LoRAs");
            if (!(lora_files[p.n_lora] = zi_lora_arg(VALUE(), &lora_strengths[p.n_lora]))) zi_die("--lora: %s", zi_err());
            p.n_lora++;
        }
        else if (!strcmp(a, "--lora-merge")) p.lora_merge = 1;
        else if (!strcmp(a, "--init-image")) p.init_image = VALUE();
        else if (!strcmp(a, "--strength")) p.strength = parse_number(a, VALUE(), 0, 1);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) threads = (int)parse_int(a, VALUE(), 1, 1024);
        else if (!strcmp(a, "--fast")) zi_set_fast(1);
        else if (!strcmp(a, "--dump")) p.dump = VALUE();
        else if (!strcmp(a, "-q")) p.quiet = 1;
        else if (!strcmp(a, "--info")) info = VALUE();
        else if (!strcmp(a, "--tokenize")) tokenize = VALUE();
        else if (!strcmp(a, "--eval")) eval_in = VALUE();
        else if (!strcmp(a, "--eval-out")) eval_out = VALUE();
        else if (!strcmp(a, "--convert-lora")) { convert[0] = VALUE(); convert[1] = VALUE(); }
        else if (!strcmp(a, "--to")) convert_to = VALUE();
        else if (!strcmp(a, "--convert")) { bf16[0] = VALUE(); bf16[1] = VALUE(); }
        else if (a[0] == '-' && a[1]) zi_die("unknown option %s (see --help)", a);
        else if (npos < 2) pos[npos++] = a;
        else zi_die("unexpected argument '%s' (see --help)", a);
#undef VALUE
    }
    p.lora_files = (const char *const *)lora_files;
    p.lora_strengths = lora_strengths;
    zi_threads_init(threads);

    int rc = 0;
    if (info) { rc = cmd_info(info); goto done; }
    if (convert[0]) { rc = cmd_convert(convert[0], convert[1], convert_to); goto done; }
    if (bf16[0]) {
        if (zi_convert_bf16(bf16[0], bf16[1], !p.quiet)) zi_die("%s", zi_err());
        goto done;
    }
    if (argc == 1) { fputs(usage, stderr); rc = 1; goto done; }
    if (npos < 1) zi_die("missing MODEL_DIR (see --help)");
    if (tokenize) { rc = cmd_tokenize(pos[0], tokenize); goto done; }
    if (eval_in || eval_out) {
        if (!eval_in || !eval_out) zi_die("--eval and --eval-out go together");
        rc = cmd_eval(pos[0], &p, eval_in, eval_out);
        goto done;
    }
    if (npos < 2) zi_die("missing PROMPT after %s (see --help)", pos[0]);
    if (!seed_given) {
        p.seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 16);
        p.seed &= 0xffffffffu;
    }
    p.prompt = pos[1];
    if (p.init_image && !size_given) {     /* the output takes the init image's size */
        zi_image im;
        if (zi_image_load(p.init_image, &im)) zi_die("--init-image: %s", zi_err());
        p.width = im.w;
        p.height = im.h;
        zi_image_free(&im);
    }
    if (!seed_given && !p.quiet) fprintf(stderr, "seed: %llu\n", (unsigned long long)p.seed);
    if (zi_generate_png(pos[0], &p, output)) zi_die("%s", zi_err());
done:
    for (int i = 0; i < p.n_lora; i++) free(lora_files[i]);
    return rc;
}
