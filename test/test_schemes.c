/* Tests of the training schemes 2 and 3 on the tiny model (training.md §9-§10):
 * scheme 3's trajectory-imitation loss against the oracle (DiffSynth's TrajectoryImitationLoss in
 * float32, golden distill-0) and a short distillation run lowering it; scheme 2's preset LoRA
 * merged under a trained LoRA, left out of the saved file, and removed bit-exactly.
 * (Scheme 4, two stacked DiffSynth-format LoRAs at inference, is in test_pipeline.c.) */
#include "test.h"
#include "../zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TINY_DIT "test/golden/tiny-zimage/transformer"

static zi_lin **dit_lins(zi_dit *dit, int *n) {
    *n = zi_dit_nlin(dit);
    zi_lin **l = malloc((size_t)*n * sizeof *l);
    for (int i = 0; i < *n; i++) l[i] = zi_dit_lin_at(dit, i);
    return l;
}

/* distill-0's inputs (x_T and the prompt features), the default schedules, the tiny DiT and
 * the SFT LoRA every distillation test starts from */
typedef struct {
    zi_st *st;
    float *xT, *cap, *neg;
    zi_distill_input in;
    int64_t n;
    zi_distill_cfg cfg;
    zi_distill_sched s;
    zi_dit *dit;
    zi_lora *sft;
    zi_lin **lins;
    int nlin;
} distill_case;

static int distill_case_load(distill_case *c) {
    memset(c, 0, sizeof *c);
    c->cfg = zi_distill_default();
    if (zi_distill_sched_init(&c->s, &c->cfg)) return -1;
    c->dit = zi_dit_load(TINY_DIT);
    c->sft = zi_lora_load(zt_golden("lora-a-diffsynth.safetensors"));
    if (!c->dit || !c->sft) return -1;
    c->lins = dit_lins(c->dit, &c->nlin);
    if (!(c->st = zi_st_open(zt_golden("distill-0.safetensors")))) return -1;
    const zi_tensor *x = zi_st_get(c->st, "distill.xT"), *cp = zi_st_get(c->st, "distill.cap"),
                    *ng = zi_st_get(c->st, "distill.neg");
    if (!x || !cp || !ng) return -1;
    c->xT = zi_tensor_f32(x); c->cap = zi_tensor_f32(cp); c->neg = zi_tensor_f32(ng);
    c->in = (zi_distill_input){ .h = (int)x->shape[2], .w = (int)x->shape[3], .L = (int)cp->shape[0],
                                .Ln = (int)ng->shape[0], .cap = c->cap, .neg = c->neg };
    c->n = x->numel;
    return 0;
}

static void distill_case_free(distill_case *c) {
    free(c->xT); free(c->cap); free(c->neg);
    zi_st_close(c->st);
    free(c->lins);
    zi_lora_free(c->sft);
    zi_dit_free(c->dit);
    zi_distill_sched_free(&c->s);
}

static int close_to(const zi_st *st, const char *name, const float *got, double tol) {
    const zi_tensor *t = zi_st_get(st, name);
    if (!t) { fprintf(stderr, "    %s: not in the golden file\n", name); return 0; }
    float *ref = zi_tensor_f32(t);
    int ok = zt_close(name, got, ref, (size_t)t->numel, tol);
    free(ref);
    return ok;
}

/* The schedules, the teacher's trajectory, the targets, the student's velocities, the loss and
 * its gradients, step by step against the oracle; then zi_distill_sample (adapters swapped
 * inside) gives the same loss and gradients. */
TEST(distill_golden) {
    distill_case c;
    CHECK(distill_case_load(&c) == 0, "distill-0: %s", zi_err());
    int ok = close_to(c.st, "distill.teacher_timesteps", c.s.t_time, 1e-6) &&
             close_to(c.st, "distill.teacher_sigmas", c.s.t_sigma, 1e-6) &&
             close_to(c.st, "distill.student_sigmas", c.s.s_sigma, 1e-6) &&
             close_to(c.st, "distill.student_timesteps", c.s.s_time, 1e-6) &&
             close_to(c.st, "distill.weights", c.s.s_weight, 1e-6);
    const zi_tensor *gi = zi_st_get(c.st, "distill.idx");
    for (int i = 0; ok && i <= c.s.ns; i++) ok = ((const int64_t *)gi->data)[i] == c.s.idx[i];
    CHECK(ok, "schedules differ");

    int64_t n = c.n;
    float *traj = malloc((size_t)(c.s.ns + 1) * n * sizeof(float)), *tg = malloc((size_t)n * sizeof(float));
    float *v = malloc((size_t)c.s.ns * n * sizeof(float)), terms[64];

    /* the teacher: base + the SFT LoRA at run time */
    CHECK(zi_lora_apply(c.sft, c.lins, c.nlin, 1.0f, 0, 0) > 0, "%s", zi_err());
    CHECK(zi_distill_teacher(c.dit, &c.s, c.cfg.teacher_cfg, &c.in, c.xT, traj) == 0, "%s", zi_err());
    zi_lora_remove(c.sft);
    char name[64];
    for (int i = 0; i < c.s.ns; i++) {
        snprintf(name, sizeof name, "distill.x.%d", i);
        ok &= close_to(c.st, name, traj + (size_t)i * n, 1e-4);
        zi_distill_target(&c.s, i, traj, n, tg);
        snprintf(name, sizeof name, "distill.target.%d", i);
        ok &= close_to(c.st, name, tg, 1e-4);
    }
    ok &= close_to(c.st, "distill.final", traj + (size_t)c.s.ns * n, 1e-4);
    CHECK(ok, "teacher trajectory or targets differ");

    /* the student: the same LoRA, trainable */
    zi_train_lora *st = zi_train_lora_of(c.sft, c.lins, c.nlin, 1.0f);
    CHECK(st, "%s", zi_err());
    zi_dit_set_training(c.dit, 1, 0);
    float loss = zi_distill_student(c.dit, &c.s, c.cfg.student_cfg, &c.in, traj, 1.0f, 0, terms, v);
    CHECK(!isnan(loss), "%s", zi_err());
    for (int i = 0; i < c.s.ns; i++) {
        snprintf(name, sizeof name, "distill.v.%d", i);
        ok &= close_to(c.st, name, v + (size_t)i * n, 1e-4);
        snprintf(name, sizeof name, "distill.term.%d", i);
        ok &= close_to(c.st, name, &terms[i], 1e-4);
    }
    ok &= close_to(c.st, "distill.loss", &loss, 1e-4);
    int ngrad = 0, ngolden = 0;     /* every gradient of the golden file must be compared */
    for (int i = 0; i < zi_st_count(c.st); i++) ngolden += !strncmp(zi_st_at(c.st, i)->name, "grad.", 5);
    for (int i = 0; i < st->lora.n; i++) {
        const zi_lora_module *m = &st->lora.m[i];
        snprintf(name, sizeof name, "grad.%s.lora_A", m->name);
        ok &= close_to(c.st, name, st->ad[i].dA, 1e-3);
        snprintf(name, sizeof name, "grad.%s.lora_B", m->name);
        ok &= close_to(c.st, name, st->ad[i].dB, 1e-3);
        ngrad += 2;
    }
    CHECK(ok && ngrad == ngolden, "student velocities, loss or gradients differ (%d gradients compared of %d)", ngrad,
          ngolden);

    /* one call: the teacher swapped in and out around the student's adapters */
    float *g1 = malloc((size_t)st->n_params * sizeof(float));
    memcpy(g1, st->g, (size_t)st->n_params * sizeof(float));
    zi_train_lora_zero_grad(st);
    float loss2 = zi_distill_sample(c.dit, st, c.sft, &c.s, &c.cfg, &c.in, c.xT, 1.0f, 0);
    CHECK(loss2 == loss && !memcmp(g1, st->g, (size_t)st->n_params * sizeof(float)),
          "zi_distill_sample: loss %.9g vs %.9g, or the gradients differ", loss2, loss);
    for (int i = 0; i < c.nlin; i++) {
        int k = 0;
        for (const zi_lora_adapter *a = c.lins[i]->lora; a; a = a->next) k++;
        CHECK(k <= 1, "%s: %d adapters attached after zi_distill_sample", c.lins[i]->name, k);
    }
    free(g1);
    zi_train_lora_free(st);
    distill_case_free(&c);
    free(traj); free(tg); free(v);
}

/* A few AdamW steps of distillation on the fixed noise and prompt lower the loss. */
TEST(distill_short_run) {
    distill_case c;
    CHECK(distill_case_load(&c) == 0, "distill-0: %s", zi_err());
    zi_train_lora *st = zi_train_lora_of(c.sft, c.lins, c.nlin, 1.0f);
    CHECK(st, "%s", zi_err());
    zi_dit_set_training(c.dit, 1, 1);
    float first = NAN, last = NAN;
    for (int k = 0; k < 6; k++) {
        zi_train_lora_zero_grad(st);
        last = zi_distill_sample(c.dit, st, c.sft, &c.s, &c.cfg, &c.in, c.xT, 1.0f, 1);
        CHECK(!isnan(last), "%s", zi_err());
        if (k == 0) first = last;
        zi_train_lora_step(st, 1e-2, 0.01);
    }
    fprintf(stderr, "    distillation loss: %.6f -> %.6f after 5 steps\n", first, last);
    CHECK(last < 0.9f * first, "loss %g -> %g did not go down", first, last);
    zi_train_lora_free(st);
    distill_case_free(&c);
}

/* A guided student (cfg 2) whose negative prompt is its prompt has v = v_pos: the same loss
 * as cfg 1, and the gradients of its two backward passes (−2 and +1 times cfg 1's) sum to
 * cfg 1's. */
TEST(distill_student_cfg) {
    distill_case c;
    CHECK(distill_case_load(&c) == 0, "distill-0: %s", zi_err());
    float *traj = malloc((size_t)(c.s.ns + 1) * c.n * sizeof(float));
    for (int i = 0; i <= c.s.ns; i++) {       /* the teacher's latents, from the golden file */
        char name[64];
        if (i < c.s.ns) snprintf(name, sizeof name, "distill.x.%d", i);
        else snprintf(name, sizeof name, "distill.final");
        const zi_tensor *xs = zi_st_get(c.st, name);
        CHECK(xs, "%s missing", name);
        float *x = zi_tensor_f32(xs);
        memcpy(traj + (size_t)i * c.n, x, (size_t)c.n * sizeof(float));
        free(x);
    }
    zi_train_lora *st = zi_train_lora_of(c.sft, c.lins, c.nlin, 1.0f);
    CHECK(st, "%s", zi_err());
    zi_dit_set_training(c.dit, 1, 0);
    float l1 = zi_distill_student(c.dit, &c.s, 1.0f, &c.in, traj, 1.0f, 0, NULL, NULL);
    float *g1 = malloc((size_t)st->n_params * sizeof(float));
    memcpy(g1, st->g, (size_t)st->n_params * sizeof(float));
    zi_train_lora_zero_grad(st);
    zi_distill_input same = c.in;
    same.neg = same.cap;
    same.Ln = same.L;
    float l2 = zi_distill_student(c.dit, &c.s, 2.0f, &same, traj, 1.0f, 0, NULL, NULL);
    CHECK(l1 == l2, "loss %.9g (cfg 1) vs %.9g (cfg 2, negative = prompt)", l1, l2);
    CHECK_CLOSE("gradients, cfg 2 vs cfg 1", st->g, g1, (size_t)st->n_params, 1e-4);
    free(g1);
    free(traj);
    zi_train_lora_free(st);
    distill_case_free(&c);
}

TEST(distill_bad_sched) {
    zi_distill_cfg cfg = zi_distill_default();
    zi_distill_sched s;
    cfg.teacher_steps = 4;
    CHECK(zi_distill_sched_init(&s, &cfg) < 0 && strstr(zi_err(), "teacher"), "fewer teacher steps: %s", zi_err());
    cfg.student_steps = 0;
    CHECK(zi_distill_sched_init(&s, &cfg) < 0, "zero student steps");
}

/* ---------------------------------------------------------------- scheme 2 */

/* Scheme 2 with the library calls train uses: a preset LoRA (here with an adaLN module, as
 * ostris' adapter has) merged into the frozen weights, a new LoRA trained on top, saved alone,
 * the preset removed: every weight is the original again, bit for bit and in place. */
TEST(preset_lora_differential) {
    zi_dit *dit = zi_dit_load(TINY_DIT);
    CHECK(dit, "%s", zi_err());
    int nlin;
    zi_lin **lins = dit_lins(dit, &nlin);
    const void **orig = malloc((size_t)nlin * sizeof *orig);
    void **copy = malloc((size_t)nlin * sizeof *copy);
    for (int i = 0; i < nlin; i++) {
        size_t nb = (size_t)lins[i]->W.rows * lins[i]->W.cols * zi_dtype_size(lins[i]->W.dtype);
        orig[i] = lins[i]->W.data;
        copy[i] = memcpy(malloc(nb), lins[i]->W.data, nb);
    }
    /* the preset: lora-b plus a module on layers.0.adaLN_modulation.0, written as ai-toolkit
     * does (diffusion_model. prefix) */
    zi_lora *b = zi_lora_load(zt_golden("lora-b-aitoolkit.safetensors"));
    CHECK(b, "%s", zi_err());
    zi_lin *ada = zi_dit_linear(dit, "layers.0.adaLN_modulation.0");
    CHECK(ada, "no adaLN layer");
    int r = b->m[0].rank;
    float *A = malloc((size_t)r * ada->W.cols * sizeof(float)), *B = malloc((size_t)ada->W.rows * r * sizeof(float));
    for (int64_t k = 0; k < r * ada->W.cols; k++) A[k] = (float)sin(0.37 * (double)k) * 0.2f;
    for (int64_t k = 0; k < ada->W.rows * r; k++) B[k] = (float)cos(0.11 * (double)k) * 0.05f;
    b->m = realloc(b->m, (size_t)(b->n + 1) * sizeof *b->m);
    b->m[b->n++] = (zi_lora_module){ .name = zi_strdup("layers.0.adaLN_modulation.0"), .rank = r,
                                     .in = (int)ada->W.cols, .out = (int)ada->W.rows, .A = A, .B = B, .alpha = NAN };
    char preset_path[600], saved[600];
    snprintf(preset_path, sizeof preset_path, "%s/preset.safetensors", zt_tmpdir());
    snprintf(saved, sizeof saved, "%s/differential.safetensors", zt_tmpdir());
    CHECK(zi_lora_save(b, preset_path, "comfyui", ZI_BF16, NULL) == 0, "%s", zi_err());
    int npreset = b->n;             /* lora-b's modules (a target of every block) and the adaLN one */
    zi_lora_free(b);

    /* one training sample: x0, noise, σ, caption from the golden train-0 */
    zi_st *in = zi_st_open(zt_golden("train-0.safetensors"));
    CHECK(in, "%s", zi_err());
    const zi_tensor *tx = zi_st_get(in, "train.x0"), *tc = zi_st_get(in, "train.cap");
    float *x0 = zi_tensor_f32(tx), *noise = zi_tensor_f32(zi_st_get(in, "train.noise")), *cap = zi_tensor_f32(tc);
    int h = (int)tx->shape[2], w = (int)tx->shape[3], L = (int)tc->shape[0];
    int64_t n = tx->numel;
    float *xt = malloc(n * sizeof(float)), *out = malloc(n * sizeof(float)), *dout = malloc(n * sizeof(float));
    float sigma = 0.7f, t = zi_flow_t(sigma);
    zi_train_noisy(xt, x0, noise, sigma, n);
    const float *xp = xt, *cp = cap;

    zi_train_lora *user = zi_train_lora_new(lins, nlin, "to_q,to_k,to_v,to_out.0,w1,w2,w3", 4, 7);
    CHECK(user, "%s", zi_err());
    /* the 7 targets of every block */
    int blocks = zt_dit_blocks(zi_dit_config(dit));
    CHECK(user->lora.n == 7 * blocks, "%d trained modules, want 7 x %d blocks", user->lora.n, blocks);
    /* B = 0 at the start: the loss is the (preset-merged) base's */
    zi_dit_set_training(dit, 1, 0);
    CHECK(zi_dit_forward(dit, 1, &xp, &h, &w, &t, &cp, &L, &out) == 0, "%s", zi_err());
    float loss_plain = zi_train_loss(out, x0, noise, n, 1.0f, 1.0f, dout);
    CHECK(zi_dit_backward(dit, dout) == 0, "%s", zi_err());

    zi_lora *preset = zi_lora_load(preset_path);
    CHECK(preset, "%s", zi_err());
    int merged = zi_lora_apply(preset, lins, nlin, 1.0f, 1, 0);
    CHECK(merged == npreset, "merged %d modules of the preset's %d", merged, npreset);
    const void *ada_orig = NULL;
    for (int i = 0; i < nlin; i++)
        if (lins[i] == ada) ada_orig = orig[i];
    CHECK(ada->W.data != ada_orig, "the adaLN module was not merged");
    float loss_preset = NAN;
    for (int k = 0; k < 3; k++) {
        zi_train_lora_zero_grad(user);
        CHECK(zi_dit_forward(dit, 1, &xp, &h, &w, &t, &cp, &L, &out) == 0, "%s", zi_err());
        float l = zi_train_loss(out, x0, noise, n, 1.0f, 1.0f, dout);
        CHECK(zi_dit_backward(dit, dout) == 0, "%s", zi_err());
        if (k == 0) loss_preset = l;
        zi_train_lora_step(user, 1e-3, 0.01);
    }
    fprintf(stderr, "    loss without the preset %.6f, with it %.6f\n", loss_plain, loss_preset);
    CHECK(fabsf(loss_preset - loss_plain) > 1e-3f * loss_plain, "the preset does not change the loss");
    CHECK(zi_lora_save(&user->lora, saved, "diffsynth", ZI_BF16, NULL) == 0, "%s", zi_err());

    /* previews and the end of training: the preset comes out exactly */
    int nuser = user->lora.n;
    zi_lora_free(preset);
    zi_train_lora_free(user);
    for (int i = 0; i < nlin; i++) {
        size_t nb = (size_t)lins[i]->W.rows * lins[i]->W.cols * zi_dtype_size(lins[i]->W.dtype);
        CHECK(lins[i]->W.data == orig[i] && !memcmp(lins[i]->W.data, copy[i], nb), "%s: weight not restored",
              lins[i]->name);
        CHECK(!lins[i]->lora, "%s: an adapter is still attached", lins[i]->name);
    }
    /* the saved file: the trained LoRA alone (rank 4, the targets, no adaLN, no preset keys) */
    zi_st *sv = zi_st_open(saved);
    CHECK(sv && zi_st_count(sv) == 2 * nuser, "saved file: %d tensors, want A and B of the %d trained modules",
          sv ? zi_st_count(sv) : -1, nuser);
    for (int i = 0; i < zi_st_count(sv); i++) {
        const zi_tensor *tt = zi_st_at(sv, i);
        CHECK(!strstr(tt->name, "adaLN") && !strstr(tt->name, "diffusion_model.") &&
              (tt->shape[0] == 4 || tt->shape[1] == 4), "unexpected tensor %s in the saved LoRA", tt->name);
    }
    zi_st_close(sv);
    zi_st_close(in);
    for (int i = 0; i < nlin; i++) free(copy[i]);
    free(copy); free(orig); free(lins);
    free(x0); free(noise); free(cap); free(xt); free(out); free(dout);
    zi_dit_free(dit);
}
