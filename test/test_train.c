/* Tests of trainer.c and train: metadata parsing, DiffSynth's training grid and weights,
 * AdamW + ConstantLR, LoRA initialisation, the loss, state files; then the train program on
 * the tiny model (loss goes down, resume is bit-exact, --eval against PyTorch's gradients). */
#include "test.h"
#include "../zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int parse(const char *text, const char *name, zi_train_meta *m) {
    return zi_train_meta_parse(text, strlen(text), name, m);
}

TEST(train_meta_csv) {
    zi_train_meta m;
    const char *csv =
        "\xEF\xBB\xBFid,image,prompt,extra\r\n"
        "1,a.png,plain prompt,x\r\n"
        "2,\"b,c.jpg\",\"with, commas and \"\"quotes\"\"\",y\n"
        "\n"
        "3,d.png,\"two\nlines\",\n"
        "4,e.png,,z";
    CHECK(parse(csv, "m.csv", &m) == 0, "%s", zi_err());
    CHECK(m.n == 4, "%d rows", m.n);
    CHECK(!strcmp(m.items[0].image, "a.png") && !strcmp(m.items[0].prompt, "plain prompt"), "row 1");
    CHECK(!strcmp(m.items[1].image, "b,c.jpg"), "row 2 image '%s'", m.items[1].image);
    CHECK(!strcmp(m.items[1].prompt, "with, commas and \"quotes\""), "row 2 prompt '%s'", m.items[1].prompt);
    CHECK(!strcmp(m.items[2].prompt, "two\nlines"), "row 3 prompt '%s'", m.items[2].prompt);
    CHECK(!strcmp(m.items[3].prompt, ""), "row 4: empty prompt");
    zi_train_meta_free(&m);

    CHECK(parse("image,caption\na.png,x\n", "m.csv", &m) < 0 && strstr(zi_err(), "m.csv") &&
          strstr(zi_err(), "prompt"), "missing column: %s", zi_err());
    CHECK(parse("image,prompt\na.png,x\nb.png\n", "m.csv", &m) < 0 && strstr(zi_err(), "row 2"),
          "short row: %s", zi_err());
    CHECK(parse("image,prompt\na.png,\"open\n", "m.csv", &m) < 0 && strstr(zi_err(), "unterminated"),
          "open quote: %s", zi_err());
    CHECK(parse("image,prompt\n,x\n", "m.csv", &m) < 0 && strstr(zi_err(), "row 1"), "empty image: %s", zi_err());
    CHECK(parse("image,prompt\n", "m.csv", &m) < 0 && strstr(zi_err(), "no rows"), "no rows: %s", zi_err());
}

TEST(train_meta_json) {
    zi_train_meta m;
    const char *json = "[{\"image\": \"a.png\", \"prompt\": \"a \\\"dog\\\", running\\nfast\", \"n\": 1},\n"
                       " {\"prompt\": \"\", \"image\": \"sub/b.jpg\"}]";
    CHECK(parse(json, "m.json", &m) == 0, "%s", zi_err());
    CHECK(m.n == 2 && !strcmp(m.items[0].prompt, "a \"dog\", running\nfast") && !strcmp(m.items[1].image, "sub/b.jpg"),
          "json rows");
    zi_train_meta_free(&m);
    CHECK(parse("[{\"image\": \"a.png\"}]", "m.json", &m) < 0 && strstr(zi_err(), "row 1") &&
          strstr(zi_err(), "prompt"), "missing key: %s", zi_err());
    CHECK(parse("{\"image\": \"a.png\"}", "m.json", &m) < 0, "not an array");
    CHECK(parse("[{\"image\": 3, \"prompt\": \"x\"}]", "m.json", &m) < 0 && strstr(zi_err(), "image"),
          "image not a string: %s", zi_err());

    const char *jsonl = "{\"image\": \"a.png\", \"prompt\": \"one, two\"}\r\n\n{\"image\": \"b.png\", \"prompt\": \"x\\ny\"}";
    CHECK(parse(jsonl, "m.JSONL", &m) == 0, "%s", zi_err());
    CHECK(m.n == 2 && !strcmp(m.items[0].prompt, "one, two") && !strcmp(m.items[1].prompt, "x\ny"), "jsonl rows");
    zi_train_meta_free(&m);
    CHECK(parse("{\"image\": \"a.png\", \"prompt\": \"x\"}\n{\"image\": \"b.png\"}\n", "m.jsonl", &m) < 0 &&
          strstr(zi_err(), "row 2"), "jsonl missing key: %s", zi_err());
    CHECK(parse("{\"image\": \"a.png\", \"prompt\": \"x\"}\n{oops}\n", "m.jsonl", &m) < 0 &&
          strstr(zi_err(), "m.jsonl") && strstr(zi_err(), "line 2"), "jsonl syntax: %s", zi_err());
}

/* Reference values in double from DiffSynth's formulas (flow_match.py, set_timesteps_z_image
 * and set_training_weight, training.md §4, §6.3): σ_i = 3s/(1 + 2s), s = 1 − i/1000;
 * y = exp(−2((1000σ − 500)/1000)²), w = (y − min y)·1000/Σ(y − min y). */
TEST(train_grid_weights) {
    static float sig[ZI_TRAIN_GRID], w[ZI_TRAIN_GRID];
    zi_train_grid(ZI_TRAIN_GRID, 3.0f, sig, w);
    static const struct { int i; double sigma, w; } ref[] = {
        {0, 1.0, 0.0}, {1, 0.9996664442961973, 0.0018488033177802054}, {100, 0.9642857142857144, 0.19761163920951594},
        {250, 0.9, 0.5465596378732608}, {500, 0.75, 1.2609434528113599}, {750, 0.5, 1.7978379650860101},
        {900, 0.25, 1.2609434528113594}, {999, 0.002994011976047907, 0.016594750966948978},
    };
    for (size_t k = 0; k < sizeof ref / sizeof ref[0]; k++) {
        int i = ref[k].i;
        CHECK(fabs(sig[i] - ref[k].sigma) <= 1e-7 * (1 + ref[k].sigma), "sigma[%d] = %.9g, want %.9g", i, sig[i], ref[k].sigma);
        CHECK(fabs(w[i] - ref[k].w) <= 2e-6 * (1 + ref[k].w), "w[%d] = %.9g, want %.9g", i, w[i], ref[k].w);
    }
    CHECK(w[0] == 0.0f, "the pure-noise point has weight exactly 0");
    double mean = 0;
    for (int i = 0; i < ZI_TRAIN_GRID; i++) mean += w[i];
    CHECK(fabs(mean / ZI_TRAIN_GRID - 1.0) < 1e-5, "mean weight %g", mean / ZI_TRAIN_GRID);
    /* the 8-point grid of trajectory imitation (§6.3, "+ w[1]" rule) */
    float s8[8], w8[8];
    zi_train_grid(8, 3.0f, s8, w8);
    static const double r8[8] = {0.25749027501483246, 0.5149805500296649, 0.817663619254175, 1.166961237709323,
                                 1.549841304824748, 1.9128141045654072, 2.100108784536417, 1.7400623241840913};
    for (int i = 0; i < 8; i++) CHECK(fabs(w8[i] - r8[i]) < 2e-6 * r8[i], "w8[%d] = %.9g, want %.9g", i, w8[i], r8[i]);
    CHECK(fabsf(s8[1] - 0.95454545f) < 1e-6f && fabsf(s8[7] - 0.3f) < 1e-6f, "8-step sigmas");
}

TEST(train_rng) {
    /* timestep indices uniform over [0, 1000), every epoch a permutation, all reproducible */
    int hist[10] = {0};
    for (int k = 0; k < 100000; k++) {
        int i = zi_train_timestep(42, k, ZI_TRAIN_GRID);
        CHECK(i >= 0 && i < ZI_TRAIN_GRID, "index %d", i);
        hist[i / 100]++;
    }
    for (int b = 0; b < 10; b++) CHECK(abs(hist[b] - 10000) < 500, "decile %d has %d of 100000", b, hist[b]);
    CHECK(zi_train_timestep(42, 7, 1000) == zi_train_timestep(42, 7, 1000), "reproducible");
    CHECK(zi_train_noise_seed(1, 0) != zi_train_noise_seed(2, 0) && zi_train_noise_seed(1, 0) != zi_train_noise_seed(1, 1),
          "noise seeds differ by seed and sample");
    int p[100], q[100], seen[100] = {0}, same = 1;
    zi_train_perm(p, 100, 5, 0);
    zi_train_perm(q, 100, 5, 1);
    for (int i = 0; i < 100; i++) { seen[p[i]]++; same &= p[i] == q[i]; }
    for (int i = 0; i < 100; i++) CHECK(seen[i] == 1, "not a permutation");
    CHECK(!same, "epochs shuffle differently");
}

/* AdamW + ConstantLR minimising ½Σ(w − c)², against the same arithmetic in Python doubles
 * (torch's formulas: decay, lerp, addcmul, bias corrections; lr 0.1: steps 1..5 at lr/3). */
TEST(train_adamw) {
    CHECK(zi_train_lr(1e-4, 1) == 1e-4 * (1.0 / 3.0) && zi_train_lr(1e-4, 5) == zi_train_lr(1e-4, 1) &&
          fabs(zi_train_lr(1e-4, 6) - 1e-4) < 1e-20, "ConstantLR warm-up");
    float w[3] = {0.5f, -1.25f, 2.0f}, g[3], m[3] = {0}, v[3] = {0};
    const float c[3] = {1.0f, 0.0f, -3.0f};
    static const double ref[4][3] = {
        {0.5331666660000001, -1.2162500002666665, 1.9660000000666666},   /* after step 1 */
        {0.6642813879060304, -1.0818241582347063, 1.8302157660900458},   /* 5 */
        {0.7603667046046627, -0.9817347566760866, 1.7286013479905824},   /* 6: full lr */
        {0.9412130924432692, -0.7846019695240276, 1.5262071528719623},   /* 8 */
    };
    int at = 0;
    for (int step = 1; step <= 8; step++) {
        for (int i = 0; i < 3; i++) g[i] = w[i] - c[i];
        zi_adamw(w, g, m, v, 3, step, zi_train_lr(0.1, step), 0.9, 0.999, 1e-8, 0.01);
        if (step == 1 || step == 5 || step == 6 || step == 8) {
            for (int i = 0; i < 3; i++)
                CHECK(fabs(w[i] - ref[at][i]) < 2e-6, "step %d w[%d] = %.9g, want %.9g", step, i, w[i], ref[at][i]);
            at++;
        }
    }
}

/* Fake layers: names as in the DiT, no weights needed for matching and initialisation. */
static zi_lin fake[] = {
    {.name = "layers.0.attention.to_q", .W = {NULL, ZI_BF16, 64, 256}},
    {.name = "layers.0.attention.to_out.0", .W = {NULL, ZI_BF16, 64, 64}},
    {.name = "layers.0.adaLN_modulation.0", .W = {NULL, ZI_BF16, 256, 64}},
    {.name = "noise_refiner.1.feed_forward.w2", .W = {NULL, ZI_BF16, 64, 512}},
    {.name = "context_refiner.0.feed_forward.w1", .W = {NULL, ZI_BF16, 512, 64}},
    {.name = "cap_embedder.1", .W = {NULL, ZI_BF16, 64, 32}},
    {.name = "layers.0.feed_forward.xw1", .W = {NULL, ZI_BF16, 64, 64}},
};
#define NFAKE ((int)(sizeof fake / sizeof fake[0]))

static zi_train_lora *fake_lora(int rank, uint64_t seed) {
    zi_lin *lins[NFAKE];
    for (int i = 0; i < NFAKE; i++) lins[i] = &fake[i];
    return zi_train_lora_new(lins, NFAKE, "to_q,to_k,to_v,to_out.0,w1,w2,w3", rank, seed);
}

TEST(train_lora_init) {
    zi_train_lora *t = fake_lora(32, 7);
    CHECK(t, "%s", zi_err());
    CHECK(t->lora.n == 4, "%d modules, want to_q, to_out.0, w2, w1", t->lora.n);
    CHECK(!strcmp(t->lora.m[1].name, "layers.0.attention.to_out.0") && fake[0].lora == &t->ad[0] &&
          fake[4].lora == &t->ad[3] && !fake[2].lora && !fake[6].lora, "matched by suffix, attached");
    CHECK(t->n_params == 32 * ((256 + 64) + (64 + 64) + (512 + 64) + (64 + 512)), "parameter count %lld", (long long)t->n_params);
    for (int i = 0; i < t->lora.n; i++) {
        const zi_lora_module *m = &t->lora.m[i];
        double bound = 1.0 / sqrt(m->in), s = 0, s2 = 0, mx = 0;
        int64_t n = (int64_t)m->rank * m->in;
        for (int64_t k = 0; k < n; k++) {
            s += m->A[k]; s2 += (double)m->A[k] * m->A[k];
            if (fabs(m->A[k]) > mx) mx = fabs(m->A[k]);
        }
        /* U(−b, b): mean 0, variance b²/3, |x| < b */
        CHECK(mx < bound && mx > 0.98 * bound, "%s: max |A| %g, bound %g", m->name, mx, bound);
        CHECK(fabs(s / n) < 4 * bound / sqrt(3.0 * n), "%s: mean %g", m->name, s / n);
        CHECK(fabs(s2 / n / (bound * bound / 3) - 1) < 0.06, "%s: variance ratio %g", m->name, s2 / n / (bound * bound / 3));
        for (int64_t k = 0; k < (int64_t)m->out * m->rank; k++) CHECK(m->B[k] == 0, "B starts at 0");
        CHECK(t->ad[i].scale == 1.0f && t->ad[i].dA && t->ad[i].dB && t->ad[i].A == m->A, "adapter wiring");
    }
    zi_train_lora *u = fake_lora(32, 7);
    CHECK(!memcmp(t->w, u->w, (size_t)t->n_params * sizeof(float)), "same seed, same init");
    zi_train_lora_free(u);
    CHECK(fake[0].lora == &t->ad[0] && !fake[0].lora->next, "freeing the second detached only its own adapters");
    zi_train_lora_free(t);
    for (int i = 0; i < NFAKE; i++) CHECK(!fake[i].lora, "detached");
    zi_lin *one = &fake[0];
    CHECK(!zi_train_lora_new(&one, 1, "to_k", 4, 1) && strstr(zi_err(), "to_k"), "no match: %s", zi_err());
}

TEST(train_loss_grad) {
    float out[5] = {0.3f, -1.2f, 0.8f, 0.05f, -0.4f}, x0[5] = {0.1f, 0.5f, -0.7f, 1.1f, 0.0f},
          nz[5] = {-0.6f, 0.4f, 1.3f, -0.2f, 0.9f}, d[5];
    double ref = 0;
    for (int i = 0; i < 5; i++) { double e = -out[i] - (nz[i] - x0[i]); ref += e * e; }
    ref = ref / 5 * 1.5;
    float loss = zi_train_loss(out, x0, nz, 5, 1.5f, 0.5f, d);
    CHECK(fabs(loss - ref) < 1e-6 * ref, "loss %g want %g", loss, ref);
    for (int i = 0; i < 5; i++) {   /* central differences of the loss, times grad_scale */
        float o[5];
        memcpy(o, out, sizeof o);
        o[i] += 1e-3f;
        double lp = zi_train_loss(o, x0, nz, 5, 1.5f, 1, NULL);
        o[i] -= 2e-3f;
        double lm = zi_train_loss(o, x0, nz, 5, 1.5f, 1, NULL);
        double fd = 0.5 * (lp - lm) / 2e-3;
        CHECK(fabs(d[i] - fd) < 1e-3 * (fabs(fd) + 1e-2), "dout[%d] = %g, finite differences %g", i, d[i], fd);
    }
    float xt[5];
    zi_train_noisy(xt, x0, nz, 0.25f, 5);
    CHECK(fabsf(xt[2] - (0.75f * -0.7f + 0.25f * 1.3f)) < 1e-7f, "x_t");
}

TEST(train_state_round_trip) {
    zi_train_lora *t = fake_lora(4, 3);
    CHECK(t, "%s", zi_err());
    for (int s = 0; s < 3; s++) {
        for (int64_t i = 0; i < t->n_params; i++) t->g[i] = sinf((float)(i + 7 * s));
        zi_train_lora_step(t, 1e-3, 0.01);
    }
    for (int64_t i = 0; i < t->n_params; i++) t->g[i] = cosf((float)i);   /* a partial accumulation */
    zi_train_pos pos = {.sample = 11, .loss_sum = 1.25, .partial = 1}, back;
    char path[512];
    snprintf(path, sizeof path, "%s/state.safetensors", zt_tmpdir());
    CHECK(zi_train_state_save(t, &pos, "rank=4", path) == 0, "%s", zi_err());
    zi_train_lora *u = fake_lora(4, 99);
    CHECK(zi_train_state_load(u, &back, "rank=8", path) < 0 && strstr(zi_err(), "other settings"), "config check: %s", zi_err());
    CHECK(zi_train_state_load(u, &back, "rank=4", path) == 0, "%s", zi_err());
    size_t nb = (size_t)t->n_params * sizeof(float);
    CHECK(!memcmp(t->w, u->w, nb) && !memcmp(t->m, u->m, nb) && !memcmp(t->v, u->v, nb) && !memcmp(t->g, u->g, nb),
          "state restored bit for bit");
    CHECK(u->step == 3 && back.sample == 11 && back.loss_sum == 1.25 && back.partial, "position restored");
    zi_train_lora_free(u);
    zi_train_lora_free(t);
}

/* ================================================================ the train program */

#include <dirent.h>

/* Two small PNGs and a CSV naming them (one prompt quoted, with a comma). */
static const char *write_dataset(void) {
    static char dir[512];
    snprintf(dir, sizeof dir, "%s/data", zt_tmpdir());
    char path[600];
    snprintf(path, sizeof path, "mkdir -p %s", dir);
    if (zt_sh(NULL, 0, "%s", path)) return NULL;
    static const int size[2][2] = {{40, 36}, {50, 33}};
    for (int k = 0; k < 2; k++) {
        int w = size[k][0], h = size[k][1];
        uint8_t *rgb = malloc((size_t)w * h * 3);
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
                for (int c = 0; c < 3; c++)
                    rgb[(y * w + x) * 3 + c] = (uint8_t)(k ? (x * 5 + y * 3 * c) : 127 + 120 * sin(0.3 * x + c + 0.1 * y));
        snprintf(path, sizeof path, "%s/%c.png", dir, 'a' + k);
        int rc = zi_png_write(path, rgb, w, h, NULL, 0);
        free(rgb);
        if (rc) return NULL;
    }
    snprintf(path, sizeof path, "%s/meta.csv", dir);
    FILE *f = fopen(path, "w");
    if (!f) return NULL;
    fputs("image,prompt\na.png,\"a red, wavy pattern\"\nb.png,stripes\n", f);
    fclose(f);
    return dir;
}

#define TINY "test/golden/tiny-zimage"

static int run_train(char *log, size_t cap, const char *data, const char *out, const char *extra) {
    return zt_sh(log, cap, "%s/train " TINY " --dataset-base-path %s --dataset-metadata-path %s/meta.csv "
                 "--output-path %s --lora-rank 4 -q %s", zt_bin(), data, data, out, extra);
}

/* every tensor of a equals b's bit for bit */
static int same_tensors(const char *pa, const char *pb) {
    zi_st *a = zi_st_open(pa), *b = zi_st_open(pb);
    int ok = a && b && zi_st_count(a) == zi_st_count(b);
    for (int i = 0; ok && i < zi_st_count(a); i++) {
        const zi_tensor *x = zi_st_at(a, i), *y = zi_st_get(b, x->name);
        ok = y && x->nbytes == y->nbytes && !memcmp(x->data, y->data, x->nbytes);
        if (!ok) fprintf(stderr, "    %s differs\n", x->name);
    }
    zi_st_close(a);
    zi_st_close(b);
    return ok;
}

/* The LoRA modules train makes with its default targets: 7 in each block (zt_dit_blocks).
 * -1 when the model does not load. */
static int target_modules(void) {
    zi_dit *m = zi_dit_load(TINY "/transformer");
    if (!m) return -1;
    int n = 7 * zt_dit_blocks(zi_dit_config(m));
    zi_dit_free(m);
    return n;
}

/* The training loss (σ weight 1) of the base model and of the base plus the LoRA a run wrote,
 * on every example that run cached (out_dir/cache), each at fixed noise and at each of the ns
 * σ: point k = example·ns + j goes to base[k] and trained[k] (cap points at most). Returns the
 * number of points, or -1. */
static int cached_losses(const char *out_dir, const char *lora_path, const float *sigmas, int ns, float *base,
                         float *trained, int cap) {
    char dir[700], file[1000];
    snprintf(dir, sizeof dir, "%s/cache", out_dir);
    zi_dit *dit = zi_dit_load(TINY "/transformer");
    zi_lora *lora = zi_lora_load(lora_path);
    DIR *d = opendir(dir);
    int nlin = 0, k = 0, rc = dit && lora && d ? 0 : -1;
    zi_lin *const *lins = dit ? zi_dit_lins(dit, &nlin) : NULL;
    struct dirent *e;
    while (!rc && (e = readdir(d))) {
        if (!strstr(e->d_name, ".safetensors")) continue;
        snprintf(file, sizeof file, "%s/%s", dir, e->d_name);
        zi_st *st = zi_st_open(file);
        /* latents [C, h, w], prompt_embeds [L, cap_feat_dim] */
        const zi_tensor *x = st ? zi_st_get(st, "latents") : NULL, *c = st ? zi_st_get(st, "prompt_embeds") : NULL;
        if (!x || !c || x->ndim != 3 || c->ndim != 2 || k + ns > cap) {
            zi_st_close(st);
            rc = -1;
            break;
        }
        int64_t n = x->numel;
        int h = (int)x->shape[1], w = (int)x->shape[2], L = (int)c->shape[0];
        float *x0 = zi_tensor_f32(x), *cp = zi_tensor_f32(c), *noise = malloc(n * sizeof(float));
        float *xt = malloc(n * sizeof(float)), *out = malloc(n * sizeof(float));
        const float *xp = xt, *cc = cp;
        /* the example's noise, seeded by its prompt (FNV-1a): the same from run to run, whatever
         * the order of the listing (the file names hash the run's paths) */
        const char *prompt = zi_st_meta(st, "prompt");
        uint64_t seed = 1469598103934665603ull;
        for (const char *q = prompt ? prompt : ""; *q; q++) seed = (seed ^ (uint8_t)*q) * 1099511628211ull;
        zi_randn(noise, n, seed, ZI_RNG_CPU);
        for (int j = 0; j < ns && !rc; j++, k++) {
            float t = zi_flow_t(sigmas[j]);
            zi_train_noisy(xt, x0, noise, sigmas[j], n);
            for (int with = 0; with < 2 && !rc; with++) {
                if (with && zi_lora_apply(lora, lins, nlin, 1.0f, 0, 0) < 0) rc = -1;
                else rc = zi_dit_forward(dit, 1, &xp, &h, &w, &t, &cc, &L, &out);
                if (!rc) (with ? trained : base)[k] = zi_train_loss(out, x0, noise, n, 1.0f, 1.0f, NULL);
                if (with) zi_lora_remove(lora);
            }
        }
        free(x0); free(cp); free(noise); free(xt); free(out);
        zi_st_close(st);
    }
    if (d) closedir(d);
    zi_lora_free(lora);
    zi_dit_free(dit);
    return rc ? -1 : k;
}

/* Whether a run's training lowered the loss on its examples: at every cached example and at
 * every σ of a spread over the noise levels, the trained LoRA's loss lies below the base
 * model's. All examples are judged (not one picked by the order of a directory listing, which
 * changes from run to run), each at fixed noise, at several σ: a LoRA that learnt nothing (no
 * step, wrong gradients) leaves the loss where it was or moves it up at some of these points;
 * a working one lowers it at all of them. How much lower depends on how much the model at hand
 * can learn in a few steps (the tiny models of the golden sets: 18% to 37% on average), so it
 * is printed, not judged. */
static int loss_went_down(const char *out_dir, const char *lora_path) {
    static const float sigmas[] = {0.25f, 0.5f, 0.75f};
    enum { NS = sizeof sigmas / sizeof sigmas[0], CAP = 16 * NS };
    float base[CAP], trained[CAP];
    int n = cached_losses(out_dir, lora_path, sigmas, NS, base, trained, CAP);
    if (n <= 0) {
        fprintf(stderr, "    %s or its cached encodings: %s\n", lora_path, zi_err());
        return 0;
    }
    double mb = 0, mt = 0;
    int every = 1;
    for (int k = 0; k < n; k++) {
        fprintf(stderr, "    example %d, sigma %.2f: loss base %.6f, trained %.6f\n", k / NS, sigmas[k % NS], base[k],
                trained[k]);
        every &= trained[k] < base[k];
        mb += base[k] / n;
        mt += trained[k] / n;
    }
    fprintf(stderr, "    mean loss: base %.6f, trained %.6f (%.1f%% lower)\n", mb, mt, 100 * (1 - mt / mb));
    return every;
}

/* Training on two images lowers the loss on them (loss_went_down): the trained LoRA against
 * the base model. */
TEST(train_tiny_loss_goes_down) {
    const char *data = write_dataset();
    CHECK(data, "could not write the dataset");
    char out[600], log[8192], lora[700];
    snprintf(out, sizeof out, "%s/run-down", zt_tmpdir());
    int rc = run_train(log, sizeof log, data, out, "--dataset-repeat 20 --learning-rate 1e-2 --seed 1");
    CHECK(rc == 0, "train failed:\n%s", log);
    snprintf(lora, sizeof lora, "%s/epoch-0.safetensors", out);
    CHECK(loss_went_down(out, lora), "the loss did not go down");
    /* a second run finds everything in the cache */
    rc = zt_sh(log, sizeof log, "%s/train " TINY " --dataset-base-path %s --dataset-metadata-path %s/meta.csv "
               "--output-path %s --lora-rank 4 --num-epochs 1 --dataset-repeat 1", zt_bin(), data, data, out);
    CHECK(rc == 0 && strstr(log, "2 from the cache"), "second run:\n%s", log);
}

/* Gradient accumulation over 4 samples (6 per epoch, so each epoch ends on a short step);
 * one run of 2 epochs on 2 threads against one epoch, then --resume for the second, on 1
 * thread and with gradient checkpointing (which must not change a bit either). */
TEST(train_resume_bit_exact) {
    const char *data = write_dataset();
    CHECK(data, "could not write the dataset");
    char a[600], b[600], log[8192], extra[900];
    snprintf(a, sizeof a, "%s/run-a", zt_tmpdir());
    snprintf(b, sizeof b, "%s/run-b", zt_tmpdir());
    const char *common = "--dataset-repeat 3 --gradient-accumulation-steps 4 --learning-rate 1e-3 --seed 7 --save-steps 5";
    snprintf(extra, sizeof extra, "%s --num-epochs 2 -t 2", common);
    CHECK(run_train(log, sizeof log, data, a, extra) == 0, "run a:\n%s", log);
    snprintf(extra, sizeof extra, "%s --num-epochs 1 -t 1", common);
    CHECK(run_train(log, sizeof log, data, b, extra) == 0, "run b:\n%s", log);
    snprintf(extra, sizeof extra, "%s --num-epochs 2 -t 1 --use-gradient-checkpointing --resume %s", common, b);
    CHECK(run_train(log, sizeof log, data, b, extra) == 0, "run b resumed:\n%s", log);
    char pa[700], pb[700];
    static const char *const files[] = {"epoch-1.safetensors", "step-10.safetensors", "step-12.safetensors",
                                        "training-state.safetensors"};
    for (int i = 0; i < 4; i++) {
        snprintf(pa, sizeof pa, "%s/%s", a, files[i]);
        snprintf(pb, sizeof pb, "%s/%s", b, files[i]);
        CHECK(same_tensors(pa, pb), "%s: the resumed run differs from the uninterrupted one", files[i]);
    }
    snprintf(extra, sizeof extra, "%s --num-epochs 2 --lora-rank 8 --resume %s", common, b);
    CHECK(zt_sh(log, sizeof log, "%s/train " TINY " --dataset-base-path %s --dataset-metadata-path %s/meta.csv "
                "--output-path %s %s", zt_bin(), data, data, b, extra) != 0 && strstr(log, "other settings"),
          "resume with another rank must fail:\n%s", log);
}

TEST(train_data_errors) {
    const char *data = write_dataset();
    CHECK(data, "could not write the dataset");
    char log[8192], meta[700], bad[700];
    snprintf(meta, sizeof meta, "%s/missing.csv", data);
    FILE *f = fopen(meta, "w");
    CHECK(f, "cannot write %s", meta);
    fputs("image,prompt\na.png,x\nnope.png,y\n", f);
    fclose(f);
    int rc = zt_sh(log, sizeof log, "%s/train " TINY " --dataset-base-path %s --dataset-metadata-path %s "
                   "--output-path %s/run-err -q", zt_bin(), data, meta, zt_tmpdir());
    CHECK(rc != 0 && strstr(log, "missing.csv: row 2") && strstr(log, "nope.png"), "missing image:\n%s", log);
    snprintf(bad, sizeof bad, "%s/bad.png", data);
    f = fopen(bad, "w");
    CHECK(f, "cannot write %s", bad);
    fputs("not an image", f);
    fclose(f);
    f = fopen(meta, "w");
    fputs("image,prompt\nbad.png,y\n", f);
    fclose(f);
    rc = zt_sh(log, sizeof log, "%s/train " TINY " --dataset-base-path %s --dataset-metadata-path %s "
               "--output-path %s/run-err -q", zt_bin(), data, meta, zt_tmpdir());
    CHECK(rc != 0 && strstr(log, "row 1") && strstr(log, "bad.png"), "unreadable image:\n%s", log);
    rc = zt_sh(log, sizeof log, "%s/train " TINY " --dataset-base-path %s --bogus 1", zt_bin(), data);
    CHECK(rc != 0 && strstr(log, "--bogus"), "unknown flag:\n%s", log);
    /* an error stays on one line, also when a file name holds a newline */
    f = fopen(meta, "w");
    fputs("image,prompt\n\"new\nline.png\",y\n", f);
    fclose(f);
    rc = zt_sh(log, sizeof log, "%s/train " TINY " --dataset-base-path %s --dataset-metadata-path %s "
               "--output-path %s/run-err -q", zt_bin(), data, meta, zt_tmpdir());
    CHECK(rc == 1 && strstr(log, "new\\nline.png") && strchr(log, '\n') == log + strlen(log) - 1,
          "a newline in a file name:\n%s", log);
}

/* One training step's loss and LoRA gradients against PyTorch (oracle/gen_golden.py). */
TEST(train_eval_golden) {
    for (int k = 0; k < 2; k++) {
        char name[64], in[600], lora[600], out[600], log[8192];
        snprintf(name, sizeof name, "train-%d.safetensors", k);
        snprintf(in, sizeof in, "%s", zt_golden(name));
        snprintf(lora, sizeof lora, "%s", zt_golden("lora-a-diffsynth.safetensors"));
        snprintf(out, sizeof out, "%s/train-eval-%d.safetensors", zt_tmpdir(), k);
        int rc = zt_sh(log, sizeof log, "%s/train " TINY " --eval %s --eval-out %s --lora %s:1", zt_bin(), in,
                       out, lora);
        CHECK(rc == 0, "train --eval failed:\n%s", log);
        zi_st *got = zi_st_open(out), *ref = zi_st_open(in);
        zi_lora *l = zi_lora_load(lora);
        CHECK(got && ref && l, "%s", zi_err());
        int nmod = l->n, ngrad = 0, ok = 1;
        zi_lora_free(l);
        for (int i = 0; i < zi_st_count(ref); i++) {
            const zi_tensor *r = zi_st_at(ref, i);
            if (strcmp(r->name, "train.loss") && strncmp(r->name, "grad.", 5)) continue;
            const zi_tensor *g = zi_st_get(got, r->name);
            if (!g || g->numel != r->numel) { fprintf(stderr, "    %s missing or misshapen\n", r->name); ok = 0; continue; }
            ngrad += r->name[0] == 'g';
            ok &= zt_close(r->name, g->data, r->data, (size_t)r->numel, 1e-3);
        }
        zi_st_close(got);
        zi_st_close(ref);
        /* the golden file holds d/dA and d/dB of every module of the LoRA: all of them compared */
        CHECK(ok && ngrad == 2 * nmod, "%s: %d gradients compared (LoRA of %d modules); loss or gradients differ",
              name, ngrad, nmod);
    }
}

/* Scheme 2's --preset-lora-path: merged into the frozen DiT before training, not saved. */
TEST(train_preset_lora) {
    const char *data = write_dataset();
    CHECK(data, "could not write the dataset");
    char out[600], log[8192], extra[900], path[700];
    snprintf(out, sizeof out, "%s/run-preset", zt_tmpdir());
    snprintf(extra, sizeof extra, "--preset-lora-path %s --preset-lora-model dit",
             zt_golden("lora-b-aitoolkit.safetensors"));
    CHECK(run_train(log, sizeof log, data, out, extra) == 0, "train failed:\n%s", log);
    snprintf(path, sizeof path, "%s/epoch-0.safetensors", out);
    zi_lora *l = zi_lora_load(path);
    int want = target_modules();
    CHECK(l && l->n == want && l->m[0].rank == 4, "the saved LoRA is the trained one alone (rank 4, %d modules)",
          want);
    zi_lora_free(l);
}

/* --preset-lora FILE:STRENGTH (scheme 2): strength 0 trains exactly as without a preset,
 * strength 1 differently. */
TEST(train_preset_lora_strength) {
    const char *data = write_dataset();
    CHECK(data, "could not write the dataset");
    char out[3][600], log[8192], extra[900], path[3][700];
    const char *strength[3] = {NULL, "0", "1"};
    for (int k = 0; k < 3; k++) {
        snprintf(out[k], sizeof out[k], "%s/run-preset-s%d", zt_tmpdir(), k);
        if (strength[k])
            snprintf(extra, sizeof extra, "--seed 3 --preset-lora %s:%s", zt_golden("lora-b-aitoolkit.safetensors"),
                     strength[k]);
        else
            snprintf(extra, sizeof extra, "--seed 3");
        CHECK(run_train(log, sizeof log, data, out[k], extra) == 0, "train failed:\n%s", log);
        snprintf(path[k], sizeof path[k], "%s/run-preset-s%d/epoch-0.safetensors", zt_tmpdir(), k);
    }
    CHECK(same_tensors(path[0], path[1]), "a preset at strength 0 changed the training");
    zi_st *a = zi_st_open(path[0]), *b = zi_st_open(path[2]);
    int want = 2 * target_modules();
    CHECK(a && b && zi_st_count(a) == want && zi_st_count(b) == want, "%d tensors (the trained LoRA alone)", want);
    int differ = 0;
    for (int i = 0; i < zi_st_count(a); i++) {
        const zi_tensor *x = zi_st_at(a, i), *y = zi_st_get(b, x->name);
        differ |= !y || memcmp(x->data, y->data, x->nbytes);
    }
    zi_st_close(a);
    zi_st_close(b);
    CHECK(differ, "the preset at strength 1 did not change the trained LoRA");
}

/* --task trajectory-imitation (scheme 3): continues the --lora-checkpoint LoRA, saves the
 * trained one; without a checkpoint it is an error. */
TEST(train_trajectory_imitation) {
    const char *data = write_dataset();
    CHECK(data, "could not write the dataset");
    char out[600], log[8192], extra[900], path[700];
    snprintf(out, sizeof out, "%s/run-distill", zt_tmpdir());
    snprintf(extra, sizeof extra, "--task trajectory_imitation --lora-checkpoint %s --teacher-steps 20 "
             "--learning-rate 1e-3 --use-gradient-checkpointing", zt_golden("lora-a-diffsynth.safetensors"));
    CHECK(run_train(log, sizeof log, data, out, extra) == 0, "train failed:\n%s", log);
    snprintf(path, sizeof path, "%s/epoch-0.safetensors", out);
    zi_lora *got = zi_lora_load(path), *start = zi_lora_load(zt_golden("lora-a-diffsynth.safetensors"));
    CHECK(got && start && got->n == start->n, "the saved LoRA has the checkpoint's modules");
    double moved = 0;
    for (int i = 0; i < got->n; i++)
        for (int j = 0; j < start->n; j++)
            if (!strcmp(got->m[i].name, start->m[j].name))
                for (int k = 0; k < got->m[i].rank * got->m[i].in; k++)
                    moved = fmax(moved, fabs(got->m[i].A[k] - start->m[j].A[k]));
    zi_lora_free(got);
    zi_lora_free(start);
    CHECK(moved > 1e-4, "the LoRA did not move from the checkpoint (max |ΔA| %g)", moved);
    CHECK(run_train(log, sizeof log, data, out, "--task trajectory-imitation") != 0 &&
          strstr(log, "--lora-checkpoint"), "no checkpoint: %s", log);
    CHECK(run_train(log, sizeof log, data, out, "--task dpo") != 0 && strstr(log, "--task"), "unknown task: %s", log);
}

/* ================================================================ previews (--sample-every) */

/* Previews every 2 optimizer steps write sample-STEP.png (the size asked for) and change nothing
 * of the training: the LoRA and the training state equal a run without previews, bit for bit.
 * Twice: plain SFT (default cfg 2: a CFG batch of two, training switched off around it) and
 * with scheme 2's preset LoRA (lifted out of the weights for each preview, merged back). */
TEST(train_previews_change_nothing) {
    const char *data = write_dataset();
    CHECK(data, "could not write the dataset");
    char preset[800];
    snprintf(preset, sizeof preset, "--preset-lora %s:0.7", zt_golden("lora-b-aitoolkit.safetensors"));
    const char *scheme[2] = {"", preset};
    for (int k = 0; k < 2; k++) {
        char out[2][600], log[8192], extra[1600], pa[700], pb[700];
        for (int v = 0; v < 2; v++) {
            snprintf(out[v], sizeof out[v], "%s/run-preview-%d-%d", zt_tmpdir(), k, v);
            snprintf(extra, sizeof extra, "--dataset-repeat 3 --learning-rate 1e-3 --seed 5 %s %s", scheme[k],
                     v ? "--sample-every 2 --sample-prompt 'a dog, running' --sample-size 32x48 --sample-steps 3" : "");
            CHECK(run_train(log, sizeof log, data, out[v], extra) == 0, "train failed:\n%s", log);
        }
        static const char *const files[] = {"epoch-0.safetensors", "training-state.safetensors"};
        for (int i = 0; i < 2; i++) {
            snprintf(pa, sizeof pa, "%s/%s", out[0], files[i]);
            snprintf(pb, sizeof pb, "%s/%s", out[1], files[i]);
            CHECK(same_tensors(pa, pb), "scheme %d: %s differs with previews", k + 1, files[i]);
        }
        for (int step = 2; step <= 6; step += 2) {
            zi_image im;
            snprintf(pa, sizeof pa, "%s/sample-%d.png", out[1], step);
            CHECK(zi_image_load(pa, &im) == 0, "%s", zi_err());
            CHECK(im.w == 32 && im.h == 48, "%s is %dx%d", pa, im.w, im.h);
            zi_image_free(&im);
        }
        snprintf(pa, sizeof pa, "%s/sample-1.png", out[1]);
        CHECK(zt_sh(NULL, 0, "test ! -e %s", pa) == 0, "a preview at step 1");
    }
    char log[8192], out[600];
    snprintf(out, sizeof out, "%s/run-preview-bad", zt_tmpdir());
    CHECK(run_train(log, sizeof log, data, out, "--sample-every 2") != 0 && strstr(log, "--sample-prompt"),
          "--sample-every without a prompt:\n%s", log);
    CHECK(run_train(log, sizeof log, data, out, "--sample-every 2 --sample-prompt x --sample-size 40x40") != 0 &&
          strstr(log, "multiple of 16"), "a preview size that is no multiple of 16:\n%s", log);
}

/* --lora-format (alias --save-format) writes the other layouts; each loads back. */
TEST(train_lora_format) {
    const char *data = write_dataset();
    CHECK(data, "could not write the dataset");
    static const char *const fmt[3][2] = {{"--lora-format", "kohya"}, {"--save-format", "diffusers"},
                                          {"--lora-format", "comfyui"}};
    for (int k = 0; k < 3; k++) {
        char out[600], log[8192], extra[200], path[700];
        snprintf(out, sizeof out, "%s/run-format-%d", zt_tmpdir(), k);
        snprintf(extra, sizeof extra, "%s %s", fmt[k][0], fmt[k][1]);
        CHECK(run_train(log, sizeof log, data, out, extra) == 0, "train failed:\n%s", log);
        snprintf(path, sizeof path, "%s/epoch-0.safetensors", out);
        zi_lora *l = zi_lora_load(path);
        int want = target_modules();
        CHECK(l && l->n == want && l->n_unknown == 0, "%s: %s (%d modules, %d unknown keys; want %d)", fmt[k][1],
              l ? "wrong modules" : zi_err(), l ? l->n : 0, l ? l->n_unknown : 0, want);
        zi_lora_free(l);
    }
    char log[8192], out[600];
    snprintf(out, sizeof out, "%s/run-format-bad", zt_tmpdir());
    CHECK(run_train(log, sizeof log, data, out, "--lora-format safetensors") != 0 && strstr(log, "--lora-format"),
          "unknown format:\n%s", log);
}

/* ================================================================ the "done when" */

/* A dataset of PNGs and JPEGs of odd sizes (37x53 RGBA and 100x61 gray PNGs, written here;
 * 61x45 baseline and progressive 4:2:0 JPEGs of test/data/jpeg), two of them in a
 * subfolder, listed in a JSONL file: training lowers the loss on them (loss_went_down), and
 * ./sample --lora loads the LoRA it wrote. */
TEST(train_odd_sizes_png_jpeg) {
    char dir[600], path[800], log[8192];
    snprintf(dir, sizeof dir, "%s/odd", zt_tmpdir());
    CHECK(zt_sh(log, sizeof log, "mkdir -p %s/jpg && cp test/data/jpeg/b420.jpg test/data/jpeg/prog420.jpg %s/jpg/",
                dir, dir) == 0, "%s", log);
    static const int size[2][3] = {{37, 53, 4}, {100, 61, 1}};   /* w, h, channels */
    for (int k = 0; k < 2; k++) {
        zi_image im = { .w = size[k][0], .h = size[k][1], .c = size[k][2] };
        im.px = malloc((size_t)im.w * im.h * im.c);
        for (int y = 0; y < im.h; y++)
            for (int x = 0; x < im.w; x++)
                for (int c = 0; c < im.c; c++)
                    im.px[((size_t)y * im.w + x) * im.c + c] =
                        (uint8_t)(c == 3 ? 255 - x : 127 + 100 * sin(0.2 * x * (k + 1) + 0.7 * c) * cos(0.15 * y));
        snprintf(path, sizeof path, "%s/%s.png", dir, k ? "gray" : "rgba");
        int rc = zi_png_write_image(path, &im, NULL, 0);
        zi_image_free(&im);
        CHECK(rc == 0, "%s", zi_err());
    }
    snprintf(path, sizeof path, "%s/meta.jsonl", dir);
    FILE *f = fopen(path, "w");
    CHECK(f, "cannot write %s", path);
    fputs("{\"image\": \"rgba.png\", \"prompt\": \"waves, \\\"soft\\\"\"}\n{\"image\": \"gray.png\", \"prompt\": \"gray stripes\"}\n"
          "{\"image\": \"jpg/b420.jpg\", \"prompt\": \"a photo\"}\n{\"image\": \"jpg/prog420.jpg\", \"prompt\": \"a photo, progressive\"}\n", f);
    fclose(f);
    char out[700];
    snprintf(out, sizeof out, "%s/run", dir);
    int rc = zt_sh(log, sizeof log, "%s/train " TINY " --dataset-base-path %s --dataset-metadata-path %s --output-path %s "
                   "--lora-rank 4 --dataset-repeat 20 --learning-rate 1e-2 --seed 2", zt_bin(), dir, path, out);
    CHECK(rc == 0 && strstr(log, "dataset: 4 examples"), "train failed:\n%s", log);
    char lora[800];
    snprintf(lora, sizeof lora, "%s/epoch-0.safetensors", out);
    CHECK(loss_went_down(out, lora), "the loss did not go down");
    snprintf(path, sizeof path, "%s/sample.png", dir);
    rc = zt_sh(log, sizeof log, "%s/sample " TINY " 'a photo' -W 32 -H 32 --steps 2 --seed 1 --lora %s -o %s", zt_bin(),
               lora, path);
    char applied[64];     /* sample reports the modules of the LoRA it applied */
    snprintf(applied, sizeof applied, ": %d modules,", target_modules());
    CHECK(rc == 0 && strstr(log, applied), "sample --lora failed (want \"%s\"):\n%s", applied, log);
    zi_image im;
    CHECK(zi_image_load(path, &im) == 0 && im.w == 32 && im.h == 32, "no 32x32 image from sample: %s", zi_err());
    zi_image_free(&im);
}
