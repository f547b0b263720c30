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
