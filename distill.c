/* distill.c: training scheme 3 (train.c --task trajectory-imitation), trajectory-imitation
 * distillation (DiffSynth-Studio's TrajectoryImitationLoss, diffsynth/diffusion/loss.py), for a LoRA that was first trained
 * with plain SFT (scheme 1) and must get its 8-step, cfg-1 ability back.
 *
 * Per sample, from fresh noise x_T and the sample's prompt (the image itself is not used):
 *   teacher = frozen base + the SFT LoRA: 50 Euler steps at cfg 2 (classic scale, negative
 *             prompt ""), no gradient; the latents at 9 points of its path are kept.
 *   student = the trained LoRA: for each of its 8 steps i, its velocity v_i at the teacher's
 *             latent x_i (the teacher's path point nearest to the student's timestep) is fitted
 *             to the chord slope of the teacher's path to the next such point:
 *               L1 = Σ_i w_i · mean((v_i − (x_{i+1} − x_i) / (σ_{i+1} − σ_i))²)
 *             with the weights w_i of DiffSynth's 8-step training grid.
 * One DiT in memory: the teacher is the same model with the SFT LoRA attached as run-time
 * adapters (frozen) in place of the student's, swapped around each trajectory.
 *
 * DiffSynth's bookkeeping, kept as it is (diffsynth/diffusion/loss.py, TrajectoryImitationLoss):
 *   - the teacher grid is the 50-step schedule with the 8 student *timesteps* written into the
 *     nearest teacher timesteps (indices 0, 6, 12, 19, 25, 31, 37, 44 for shift 3); its σ's are
 *     not changed, so at those steps the teacher is conditioned on the student's time but
 *     integrates over its own σ interval;
 *   - the chord slope divides by the *student's* σ difference, while the two teacher latents
 *     are σ^T_j apart: the ratio (teacher Δσ)/(student Δσ) is 0.957, 0.949, 1.116, 0.964,
 *     0.955, 0.942, 1.114, 0.968 for steps 0..7, i.e. targets are 6 % smaller to 12 % larger
 *     than the teacher's actual slope. DiffSynth does this; so do we.
 *   - the last target runs to the teacher's final latent (σ = 0).
 * Differences from DiffSynth, all deliberate:
 *   - float32 throughout, timesteps included: DiffSynth casts t to bf16 (1000, 956, 900, 832,
 *     752, 644, 500, 300 for the student); what we compute is what its code
 *     computes with torch_dtype=float32 (oracle/gen_golden.py, ONLY=distill). The DiT's time
 *     input is (1000 − T)/1000, as in the rest of zimage.c.
 *   - no LPIPS term: DiffSynth adds LPIPS(decode(student 8-step rollout), decode(teacher final)),
 *     but the rollout uses detached velocities from the teacher's noise, so it carries no
 *     gradient to the LoRA: it only changes the logged loss.
 *   - the 8 student terms are run forward and backward one at a time (the sum's gradient is
 *     the sum of the terms' gradients), instead of keeping 8 graphs alive.
 */
#include "zimage.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

zi_distill_cfg zi_distill_default(void) {
    return (zi_distill_cfg){ .teacher_steps = 50, .student_steps = 8, .teacher_cfg = 2.0f, .student_cfg = 1.0f,
                             .shift = 3.0f };
}

/* argmin_k |a[k] − x| (the first on ties, as torch.argmin) */
static int nearest(const float *a, int n, float x) {
    int best = 0;
    for (int k = 1; k < n; k++)
        if (fabsf(a[k] - x) < fabsf(a[best] - x)) best = k;
    return best;
}

int zi_distill_sched_init(zi_distill_sched *s, const zi_distill_cfg *c) {
    memset(s, 0, sizeof *s);
    if (c->teacher_steps < 1 || c->student_steps < 1) {
        zi_seterr("--teacher-steps/--student-steps: must be at least 1 (got %d, %d)", c->teacher_steps, c->student_steps);
        return -1;
    }
    if (c->teacher_steps < c->student_steps) {
        zi_seterr("--teacher-steps %d: fewer than --student-steps %d", c->teacher_steps, c->student_steps);
        return -1;
    }
    int nt = c->teacher_steps, ns = c->student_steps;
    s->nt = nt;
    s->ns = ns;
    s->t_sigma = zi_malloc(((size_t)nt + 1) * sizeof(float));
    s->t_time = zi_malloc((size_t)nt * sizeof(float));
    s->s_sigma = zi_malloc(((size_t)ns + 1) * sizeof(float));
    s->s_time = zi_malloc((size_t)ns * sizeof(float));
    s->s_weight = zi_malloc((size_t)ns * sizeof(float));
    s->idx = zi_malloc(((size_t)ns + 1) * sizeof(int));
    /* set_timesteps_z_image(n) (+ set_training_weight for the student): T = 1000·σ */
    float *unused = zi_malloc((size_t)nt * sizeof(float));
    zi_train_grid(nt, c->shift, s->t_sigma, unused);
    free(unused);
    zi_train_grid(ns, c->shift, s->s_sigma, s->s_weight);
    s->t_sigma[nt] = 0.0f;
    s->s_sigma[ns] = 0.0f;
    for (int k = 0; k < nt; k++) s->t_time[k] = s->t_sigma[k] * 1000.0f;
    for (int i = 0; i < ns; i++) s->s_time[i] = s->s_sigma[i] * 1000.0f;
    /* set_timesteps_z_image(nt, target_timesteps = student T): each student T in turn replaces
     * the teacher T nearest to it (σ untouched) */
    for (int i = 0; i < ns; i++) s->t_time[nearest(s->t_time, nt, s->s_time[i])] = s->s_time[i];
    /* align_trajectory: student step i reads the teacher latent at the teacher step nearest to
     * its T; the last target is the final latent (index nt) */
    for (int i = 0; i < ns; i++) s->idx[i] = nearest(s->t_time, nt, s->s_time[i]);
    s->idx[ns] = nt;
    return 0;
}

void zi_distill_sched_free(zi_distill_sched *s) {
    free(s->t_sigma); free(s->t_time); free(s->s_sigma); free(s->s_time); free(s->s_weight); free(s->idx);
    memset(s, 0, sizeof *s);
}

/* The DiT time input of pipeline timestep T (0 = noise, 1 = clean). */
static float time_in(float T) { return (1000.0f - T) / 1000.0f; }

/* v = dx/dσ of the guided model at (x, T): −DiT output, DiffSynth's cfg_guided_model_fn
 * v = v_neg + cfg·(v_pos − v_neg) when cfg != 1 (positive and negative as one batch of two).
 * out2: scratch [2n]. Training must be off (a batch of two). */
static int guided(zi_dit *dit, const zi_distill_input *in, float cfg, const float *x, float T, float *out2,
                  float *v, int64_t n) {
    int B = cfg != 1.0f ? 2 : 1;
    const float *xs[2] = {x, x}, *caps[2] = {in->cap, in->neg};
    float ts[2] = {time_in(T), time_in(T)};
    int hs[2] = {in->h, in->h}, ws[2] = {in->w, in->w}, Ls[2] = {in->L, in->Ln};
    float *outs[2] = {out2, out2 + n};
    if (zi_dit_forward(dit, B, xs, hs, ws, ts, caps, Ls, outs)) return -1;
    for (int64_t j = 0; j < n; j++) {
        float pos = -out2[j];
        if (B == 1) { v[j] = pos; continue; }
        float neg = -out2[n + j];
        v[j] = neg + cfg * (pos - neg);
    }
    return 0;
}

/* ---------------------------------------------------------------- teacher */
typedef struct {
    zi_dit *dit;
    const zi_distill_sched *s;
    const zi_distill_input *in;
    float cfg;
    int64_t n;
    float *out2, *traj;
    int k;                      /* the teacher step being evaluated */
} teacher_run;

/* zi_sample's model: the σ it passes is the grid's; the time comes from the teacher's
 * timesteps, which differ from 1000σ where a student timestep was written in. */
static int teacher_velocity(void *ctx, const float *x, float sigma, float t, float *v) {
    teacher_run *r = ctx;
    (void)sigma; (void)t;
    return guided(r->dit, r->in, r->cfg, x, r->s->t_time[r->k++], r->out2, v, r->n);
}

/* after Euler step `step` x is the latent at teacher index step + 1: keep the ones used */
static void teacher_keep(void *ctx, int step, const float *x) {
    teacher_run *r = ctx;
    for (int i = 0; i <= r->s->ns; i++)
        if (r->s->idx[i] == step + 1) memcpy(r->traj + (size_t)i * r->n, x, (size_t)r->n * sizeof(float));
}

int zi_distill_teacher(zi_dit *dit, const zi_distill_sched *s, float cfg, const zi_distill_input *in,
                       const float *xT, float *traj) {
    const zi_dit_cfg *c = zi_dit_config(dit);
    int64_t n = (int64_t)c->in_channels * in->h * in->w;
    teacher_run r = { dit, s, in, cfg, n, zi_malloc(2 * (size_t)n * sizeof(float)), traj, 0 };
    float *x = zi_malloc((size_t)n * sizeof(float));
    memcpy(x, xT, (size_t)n * sizeof(float));
    teacher_keep(&r, -1, x);                         /* index 0: x_T itself */
    /* DiffSynth's scheduler.step: x + v·(σ_{k+1} − σ_k), σ_nt = 0: zi_sample's Euler */
    int rc = zi_sample(ZI_EULER, s->t_sigma, s->nt, x, n, teacher_velocity, teacher_keep, &r);
    free(x);
    free(r.out2);
    return rc;
}

/* ---------------------------------------------------------------- student */
void zi_distill_target(const zi_distill_sched *s, int i, const float *traj, int64_t n, float *target) {
    /* denom = σ_{i+1} − σ_i with |denom| >= 1e-6 (sign kept); the student's σ's, see the top */
    float d = s->s_sigma[i + 1] - s->s_sigma[i];
    d = d < 0 ? -fmaxf(-d, 1e-6f) : fmaxf(d, 1e-6f);
    const float *x = traj + (size_t)i * n, *x1 = traj + (size_t)(i + 1) * n;
    for (int64_t j = 0; j < n; j++) target[j] = (x1[j] - x[j]) / d;
}

/* mean((v − target)²) in double, and d/d v of w·that into dv (when not NULL). */
static double mse(const float *v, const float *target, int64_t n, float w, float *dv) {
    double sum = 0;
    for (int64_t j = 0; j < n; j++) {
        double e = (double)v[j] - target[j];
        sum += e * e;
        if (dv) dv[j] = (float)(2.0 * w * e / (double)n);
    }
    return sum / (double)n;
}

float zi_distill_student(zi_dit *dit, const zi_distill_sched *s, float cfg, const zi_distill_input *in,
                         const float *traj, float grad_scale, int grad_ckpt, float *terms, float *v_out) {
    const zi_dit_cfg *c = zi_dit_config(dit);
    int64_t n = (int64_t)c->in_channels * in->h * in->w;
    float *target = zi_malloc((size_t)n * sizeof(float)), *v = zi_malloc((size_t)n * sizeof(float));
    float *out2 = zi_malloc(2 * (size_t)n * sizeof(float)), *dv = zi_malloc((size_t)n * sizeof(float));
    float *dout = zi_malloc((size_t)n * sizeof(float));
    float loss = 0;
    int ok = 1;
    for (int i = 0; ok && i < s->ns; i++) {
        const float *x = traj + (size_t)i * n;
        float t = time_in(s->s_time[i]), w = s->s_weight[i];
        zi_distill_target(s, i, traj, n, target);
        /* the velocity: with cfg 1 the training forward gives it; with cfg > 1 both outputs are
         * needed before either backward, so they are computed first without training state */
        if (cfg != 1.0f) {
            zi_dit_set_training(dit, 0, 0);
            ok = guided(dit, in, cfg, x, s->s_time[i], out2, v, n) == 0;
            zi_dit_set_training(dit, 1, grad_ckpt);
        }
        const float *xp = x, *cp = in->cap;
        float *op = out2;
        ok = ok && zi_dit_forward(dit, 1, &xp, &in->h, &in->w, &t, &cp, &in->L, &op) == 0;
        if (!ok) break;
        if (cfg == 1.0f)
            for (int64_t j = 0; j < n; j++) v[j] = -out2[j];
        float term = (float)(mse(v, target, n, w, dv) * w);
        if (terms) terms[i] = term;
        if (v_out) memcpy(v_out + (size_t)i * n, v, (size_t)n * sizeof(float));
        loss += term;
        /* v = v_neg + cfg·(v_pos − v_neg), v_pos = −out_pos, v_neg = −out_neg (cfg 1: v = v_pos) */
        for (int64_t j = 0; j < n; j++) dout[j] = -cfg * dv[j] * grad_scale;
        ok = zi_dit_backward(dit, dout) == 0;
        if (ok && cfg != 1.0f) {
            cp = in->neg;
            ok = zi_dit_forward(dit, 1, &xp, &in->h, &in->w, &t, &cp, &in->Ln, &op) == 0;
            for (int64_t j = 0; ok && j < n; j++) dout[j] = -(1.0f - cfg) * dv[j] * grad_scale;
            ok = ok && zi_dit_backward(dit, dout) == 0;
        }
    }
    free(target); free(v); free(out2); free(dv); free(dout);
    return ok ? loss : NAN;
}

/* ---------------------------------------------------------------- one sample */
/* Unlinks (on = 0) or re-appends (on = 1) the trained LoRA's adapters. */
static void student_attach(zi_train_lora *t, int on) {
    for (int i = 0; i < t->lora.n; i++) {
        if (on) zi_lin_attach(t->lin[i], &t->ad[i]);
        else zi_lin_detach(t->lin[i], &t->ad[i]);
    }
}

float zi_distill_sample(zi_dit *dit, zi_train_lora *student, zi_lora *teacher, const zi_distill_sched *s,
                        const zi_distill_cfg *c, const zi_distill_input *in, const float *xT, float grad_scale,
                        int grad_ckpt) {
    const zi_dit_cfg *dc = zi_dit_config(dit);
    int64_t n = (int64_t)dc->in_channels * in->h * in->w;
    int nlin;
    zi_lin *const *lins = zi_dit_lins(dit, &nlin);
    float *traj = zi_malloc(((size_t)s->ns + 1) * (size_t)n * sizeof(float));
    /* teacher: the SFT LoRA in place of the student's adapters, no training state */
    zi_dit_set_training(dit, 0, 0);
    student_attach(student, 0);
    int rc = zi_lora_apply(teacher, lins, nlin, 1.0f, 0, 0) < 0 ? -1 : 0;
    if (!rc) rc = zi_distill_teacher(dit, s, c->teacher_cfg, in, xT, traj);
    zi_lora_remove(teacher);
    student_attach(student, 1);
    zi_dit_set_training(dit, 1, grad_ckpt);
    float loss = rc ? NAN : zi_distill_student(dit, s, c->student_cfg, in, traj, grad_scale, grad_ckpt, NULL, NULL);
    free(traj);
    return loss;
}
