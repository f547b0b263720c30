/* sample.c: the inference command line. The fixed part of its interface is
 * ../shared/spec/cli.md (copied in README.md); run `./sample --help` for the whole list. */
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
"      --rng cpu|cuda     noise identical to torch.randn on that device's generator (cpu)\n"
"      --lora FILE[:S]    apply a LoRA with strength S (1); repeatable\n"
"  -t, --threads N        worker threads (all cores)\n"
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

static float parse_float(const char *flag, const char *s, double lo, double hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        zi_die("%s: expected a number in [%g, %g], got '%s'", flag, lo, hi, s);
    return (float)v;
}

/* "FILE[:STRENGTH]": the strength is whatever follows the last ':' when it parses as a
 * number, so paths containing ':' still work. */
static void parse_lora(const char *arg, char **file, float *strength) {
    const char *colon = strrchr(arg, ':');
    *strength = 1.0f;
    if (colon && colon[1]) {
        char *end;
        double s = strtod(colon + 1, &end);
        if (!*end) {
            *file = strndup(arg, (size_t)(colon - arg));
            *strength = (float)s;
            return;
        }
    }
    *file = zi_strdup(arg);
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

/* ---------------------------------------------------------------- main */
int main(int argc, char **argv) {
    const char *pos[2] = {0};
    int npos = 0;
    const char *output = "out.png", *info = NULL;
    int threads = 0;
    zi_params p = zi_params_default();
    char *lora_files[64];
    float lora_strengths[64];
    int seed_given = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define VALUE() (i + 1 < argc ? argv[++i] : (zi_die("%s: missing value", a), (char *)0))
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) output = VALUE();
        else if (!strcmp(a, "-n") || !strcmp(a, "--negative")) p.negative = VALUE();
        else if (!strcmp(a, "-W") || !strcmp(a, "--width")) p.width = (int)parse_int(a, VALUE(), 16, 16384);
        else if (!strcmp(a, "-H") || !strcmp(a, "--height")) p.height = (int)parse_int(a, VALUE(), 16, 16384);
        else if (!strcmp(a, "--steps")) p.steps = (int)parse_int(a, VALUE(), 1, 10000);
        else if (!strcmp(a, "--cfg")) p.cfg = parse_float(a, VALUE(), 0, 1000);
        else if (!strcmp(a, "--guidance")) p.cfg = parse_float(a, VALUE(), 0, 1000) + 1.0f;
        else if (!strcmp(a, "--cfg-norm")) p.cfg_norm = parse_float(a, VALUE(), 0, 1000);
        else if (!strcmp(a, "--cfg-trunc")) p.cfg_trunc = parse_float(a, VALUE(), 0, 1);
        else if (!strcmp(a, "--shift")) p.shift = parse_float(a, VALUE(), 1e-3, 1000);
        else if (!strcmp(a, "--sampler")) p.sampler = VALUE();
        else if (!strcmp(a, "--seed")) { p.seed = (uint64_t)parse_int(a, VALUE(), 0, LONG_MAX); seed_given = 1; }
        else if (!strcmp(a, "--rng")) {
            const char *v = VALUE();
            if (strcmp(v, "cpu") && strcmp(v, "cuda")) zi_die("--rng: expected cpu or cuda, got '%s'", v);
            p.rng_cuda = !strcmp(v, "cuda");
        }
        else if (!strcmp(a, "--lora")) {
            if (p.n_lora == 64) zi_die("--lora: at most 64 LoRAs");
            parse_lora(VALUE(), &lora_files[p.n_lora], &lora_strengths[p.n_lora]);
            p.n_lora++;
        }
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) threads = (int)parse_int(a, VALUE(), 1, 1024);
        else if (!strcmp(a, "--dump")) p.dump = VALUE();
        else if (!strcmp(a, "-q")) p.quiet = 1;
        else if (!strcmp(a, "--info")) info = VALUE();
        else if (a[0] == '-' && a[1]) zi_die("unknown option %s (see --help)", a);
        else if (npos < 2) pos[npos++] = a;
        else zi_die("unexpected argument '%s' (see --help)", a);
#undef VALUE
    }
    p.lora_files = (const char *const *)lora_files;
    p.lora_strengths = lora_strengths;
    zi_threads_init(threads);

    if (info) return cmd_info(info);
    if (npos < 2) { fputs(usage, stderr); return 1; }
    if (!seed_given) {
        p.seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 16);
        p.seed &= 0xffffffffu;
    }
    p.prompt = pos[1];
    if (!seed_given && !p.quiet) fprintf(stderr, "seed: %llu\n", (unsigned long long)p.seed);
    return zi_generate_png(pos[0], &p, output) ? 1 : 0;
}
