/* Tests of sampler.c: schedules (scheduler.json), torch-compatible noise (rng.safetensors),
 * the samplers against diffusers on a synthetic velocity field (sampler-*.safetensors) and the
 * classifier-free guidance arithmetic. */
#include "test.h"
#include "../zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Number of positions where got and ref differ in any bit (+0 and -0 count as equal). */
static int64_t bit_diffs(const float *got, const float *ref, int64_t n) {
    int64_t d = 0;
    for (int64_t i = 0; i < n; i++) d += got[i] != ref[i];
    return d;
}

/* A float32 copy of golden tensor NAME, or NULL (with a failure reported by the caller). */
static float *golden_f32(const zi_st *st, const char *name, int64_t *n) {
    const zi_tensor *t = zi_st_get(st, name);
    if (!t) return NULL;
    if (n) *n = t->numel;
    return zi_tensor_f32(t);
}

/* ---------------------------------------------------------------- schedule */

TEST(sampler_schedule_matches_diffusers) {
    zj *cases = zj_load(zt_golden("scheduler.json"));
    CHECK(cases && cases->type == ZJ_ARR, "%s", zi_err());
    int checked = 0;
    for (int c = 0; c < cases->n; c++) {
        const zj *cs = zj_at(cases, c);
        int steps = (int)zj_num(cs, "steps", 0);
        double shift = zj_num(cs, "shift", 0);
        const zj *sig = zj_get(cs, "sigmas"), *ts = zj_get(cs, "timesteps");
        CHECK(steps > 0 && sig && sig->n == steps + 1 && ts && ts->n == steps, "case %d malformed", c);
        float *s = zi_malloc((size_t)(steps + 1) * sizeof(float));
        zi_flow_sigmas(steps, shift, s);
        int bad = 0;
        for (int i = 0; i <= steps; i++) {
            bad += s[i] != (float)zj_at(sig, i)->num;
            if (i < steps) bad += zi_flow_timestep(s[i]) != (float)zj_at(ts, i)->num;
        }
        free(s);
        CHECK(!bad, "steps %d shift %g: %d sigmas/timesteps differ from diffusers", steps, shift, bad);
        checked++;
    }
    zj_free(cases);
    fprintf(stderr, "    %d schedules, every sigma and timestep bit-identical\n", checked);
}

TEST(sampler_schedule_worked_example) {
    /* zimage-arch.md §5.2: N = 8, shift 3 gives σ = 1, 21/22, 9/10, 5/6, 3/4, 9/14, 1/2, 3/10, 0
     * and the DiT time input t_1 = 0.0454546 (45.4546 after the DiT's ·1000). */
    float s[9];
    zi_flow_sigmas(8, 3.0, s);
    const double exact[9] = { 1, 21.0 / 22, 0.9, 5.0 / 6, 0.75, 9.0 / 14, 0.5, 0.3, 0 };
    for (int i = 0; i < 9; i++) CHECK(fabs(s[i] - exact[i]) < 1e-7, "sigma %d = %.9g", i, s[i]);
    CHECK(zi_flow_t(s[0]) == 0.0f && zi_flow_t(s[6]) == 0.5f, "t at sigma 1 and 1/2");
    CHECK(fabsf(zi_flow_t(s[1]) * 1000.0f - 45.4546f) < 1e-4f, "t_1 = %.9g", zi_flow_t(s[1]));
}

/* ---------------------------------------------------------------- noise */

static const int rng_seeds[] = { 0, 42, 1234 };
static const char *const rng_shapes[] = { "16", "1x16x8x8", "1x16x64x64", "3x5" };

/* zi_randn of kind against every seed and shape of rng.safetensors ("PREFIX.SEED.SHAPE"):
 * within tol of the largest value, and with tol = 0 bit for bit. */
static int randn_matches(const char *prefix, zi_rng kind, double tol) {
    zi_st *st = zi_st_open(zt_golden("rng.safetensors"));
    if (!st) { fprintf(stderr, "    %s\n", zi_err()); return 0; }
    int all = 1;
    for (int s = 0; s < 3; s++)
        for (int k = 0; k < 4; k++) {
            char name[64];
            snprintf(name, sizeof name, "%s.%d.%s", prefix, rng_seeds[s], rng_shapes[k]);
            int64_t n = 0;
            float *ref = golden_f32(st, name, &n);
            if (!ref) { fprintf(stderr, "    %s missing\n", name); all = 0; continue; }
            float *got = zi_malloc((size_t)n * sizeof(float));
            zi_randn(got, n, (uint64_t)rng_seeds[s], kind);
            int64_t d = bit_diffs(got, ref, n);
            int ok = zt_close(name, got, ref, (size_t)n, tol) && (tol > 0 || d == 0);
            if (!ok) fprintf(stderr, "    %s: %lld of %lld values differ\n", name, (long long)d, (long long)n);
            all &= ok;
            free(ref);
            free(got);
        }
    zi_st_close(st);
    return all;
}

TEST(sampler_randn_cpu_bitwise) {
    CHECK(randn_matches("cpu", ZI_RNG_CPU, 0), "torch's CPU normals differ");
}

TEST(sampler_randn_cuda) {
    /* Exact up to the GPU's hardware sin/cos approximation (see sampler.c): measured max error
     * 2.9e-7 of the largest value. */
    CHECK(randn_matches("cuda", ZI_RNG_CUDA, 1e-6), "torch's CUDA normals differ");
}

TEST(sampler_randn_cuda_grid_cap) {
    /* With the grid capped, element i comes from thread i % threads; the first `threads`
     * elements are those of an uncapped grid, the rest come from later normals of those threads. */
    int64_t n = 4096;
    float *a = zi_malloc(n * sizeof(float)), *b = zi_malloc(n * sizeof(float));
    zi_randn_cuda(a, n, 7, 1 << 20);
    zi_randn_cuda(b, n, 7, 4);                              /* 1024 threads */
    int64_t same = bit_diffs(a, b, 1024), rest = bit_diffs(a + 1024, b + 1024, n - 1024);
    free(a);
    free(b);
    CHECK(same == 0 && rest > 3000, "%lld / %lld", (long long)same, (long long)rest);
}

/* ---------------------------------------------------------------- samplers */

/* The synthetic model of oracle/gen_golden.py: v = (a·x + t·c) + d, float32, one rounding per
 * operation (volatile keeps the compiler from fusing a product into the addition). It also
 * checks the time inputs the sampler passes against the oracle's. */
typedef struct {
    const float *a, *c, *d, *t_ref;
    int64_t n;
    int evals, t_bad;
    const zi_st *st;
    int case_k;
    int64_t step_bad;
    double max_err;
    int missing;
} field_ctx;

static int field_velocity(void *p, const float *x, float sigma, float t, float *v) {
    field_ctx *f = p;
    if (t != zi_flow_t(sigma) || t != f->t_ref[f->evals]) f->t_bad++;
    for (int64_t j = 0; j < f->n; j++) {
        volatile float ax = f->a[j] * x[j], tc = t * f->c[j];
        v[j] = (ax + tc) + f->d[j];
    }
    return 0;
}

static void field_step(void *p, int step, const float *x) {
    field_ctx *f = p;
    char name[64];
    snprintf(name, sizeof name, "case%d.step%d", f->case_k, step);
    float *ref = golden_f32(f->st, name, NULL);
    if (!ref) { f->missing++; return; }
    f->step_bad += bit_diffs(x, ref, f->n);
    for (int64_t j = 0; j < f->n; j++) f->max_err = fmax(f->max_err, fabs((double)x[j] - ref[j]));
    free(ref);
    f->evals = step + 1;
}

static void check_sampler(const char *name) {
    char file[64];
    snprintf(file, sizeof file, "sampler-%s.safetensors", name);
    zi_st *st = zi_st_open(zt_golden(file));
    CHECK(st, "%s", zi_err());
    zi_sampler kind;
    CHECK(zi_sampler_parse(name, &kind) == 0 && !strcmp(zi_sampler_name(kind), name), "%s", name);
    const char *meta = zi_st_meta(st, "cases");
    zj *cases = meta ? zj_parse(meta, strlen(meta), file) : NULL;
    CHECK(cases && cases->type == ZJ_ARR && cases->n > 0, "%s: no cases metadata", file);
    int64_t n = 0;
    float *x0 = golden_f32(st, "x.init", &n), *a = golden_f32(st, "field.a", NULL),
          *c = golden_f32(st, "field.c", NULL), *d = golden_f32(st, "field.d", NULL);
    CHECK(x0 && a && c && d, "%s: inputs missing", file);
    float *x = zi_malloc((size_t)n * sizeof(float));
    for (int k = 0; k < cases->n; k++) {
        int steps = (int)zj_num(zj_at(cases, k), "steps", 0);
        double shift = zj_num(zj_at(cases, k), "shift", 0);
        char key[64];
        snprintf(key, sizeof key, "case%d.sigmas", k);
        float *sig_ref = golden_f32(st, key, NULL), *sig = zi_malloc((size_t)(steps + 1) * sizeof(float));
        snprintf(key, sizeof key, "case%d.t", k);
        int64_t nt = 0;
        float *t_ref = golden_f32(st, key, &nt);
        zi_flow_sigmas(steps, shift, sig);
        int sig_bad = sig_ref ? (int)bit_diffs(sig, sig_ref, steps + 1) : -1;
        field_ctx f = { a, c, d, t_ref, n, 0, 0, st, k, 0, 0, 0 };
        memcpy(x, x0, (size_t)n * sizeof(float));
        int rc = t_ref && nt == zi_sampler_evals(kind, steps)
                 ? zi_sample(kind, sig, steps, x, n, field_velocity, field_step, &f) : -1;
        fprintf(stderr, "    %-9s steps %d shift %g: %d evaluations, max err %.3g, %lld values differ\n",
                name, steps, shift, f.evals, f.max_err, (long long)f.step_bad);
        free(sig_ref);
        free(sig);
        free(t_ref);
        CHECK(rc == 0 && sig_bad == 0 && f.t_bad == 0 && f.missing == 0, "%s case %d: rc %d, sigmas %d, "
              "t %d, missing steps %d", name, k, rc, sig_bad, f.t_bad, f.missing);
        CHECK(f.evals == zi_sampler_evals(kind, steps), "%d evaluations", f.evals);
        CHECK(f.step_bad == 0, "%s case %d: %lld values differ from diffusers", name, k, (long long)f.step_bad);
    }
    free(x);
    free(x0); free(a); free(c); free(d);
    zj_free(cases);
    zi_st_close(st);
}

TEST(sampler_euler_matches_diffusers) { check_sampler("euler"); }
TEST(sampler_heun_matches_diffusers) { check_sampler("heun"); }
TEST(sampler_dpmpp_2m_matches_diffusers) { check_sampler("dpmpp_2m"); }

static int failing_velocity(void *p, const float *x, float sigma, float t, float *v) {
    (void)x; (void)sigma; (void)t; (void)v;
    int *calls = p;
    if (++*calls == 2) { zi_seterr("model failed"); return -1; }
    memset(v, 0, 4 * sizeof(float));
    return 0;
}

TEST(sampler_stops_on_model_error) {
    float s[6], x[4] = { 0 };
    zi_flow_sigmas(5, 3.0, s);
    for (int k = ZI_EULER; k <= ZI_DPMPP_2M; k++) {
        int calls = 0;
        CHECK(zi_sample((zi_sampler)k, s, 5, x, 4, failing_velocity, NULL, &calls) == -1 && calls == 2,
              "%s: %d calls", zi_sampler_name((zi_sampler)k), calls);
    }
}

TEST(sampler_names) {
    zi_sampler s;
    zi_rng r;
    CHECK(zi_sampler_parse("dpmpp_2m", &s) == 0 && s == ZI_DPMPP_2M, "dpmpp_2m");
    CHECK(zi_sampler_parse("heun", &s) == 0 && s == ZI_HEUN, "heun");
    CHECK(zi_sampler_parse("ddim", &s) == -1 && strstr(zi_err(), "ddim"), "unknown sampler: %s", zi_err());
    CHECK(zi_rng_parse("cuda", &r) == 0 && r == ZI_RNG_CUDA, "cuda");
    CHECK(zi_rng_parse("mps", &r) == -1 && strstr(zi_err(), "mps"), "unknown rng: %s", zi_err());
    CHECK(zi_sampler_evals(ZI_HEUN, 8) == 15 && zi_sampler_evals(ZI_EULER, 8) == 8, "evals");
}

/* ---------------------------------------------------------------- guidance */

TEST(sampler_cfg_scale_truncation) {
    CHECK(zi_cfg_scale(0.0, 1.0, 0.5f) == 0, "G = 0 is off");
    CHECK(zi_cfg_scale(-1.0, 1.0, 0.5f) == 0, "G < 0 is off");
    CHECK(zi_cfg_scale(4.0, 1.0, 0.999f) == 4.0, "truncation 1 never triggers");
    CHECK(zi_cfg_scale(4.0, 0.6, 0.6f) == 0, "float32 0.6 > double 0.6: truncated, as in diffusers");
    CHECK(zi_cfg_scale(4.0, 0.6, 0.5f) == 4.0, "t below the threshold");
    CHECK(zi_cfg_scale(4.0, 1.5, 1.0f) == 4.0, "truncation > 1 is off");
}

TEST(sampler_cfg_combine) {
    enum { N = 512 };
    float pos[N], neg[N], pred[N], ref[N];
    uint32_t st = 12345;
    for (int i = 0; i < N; i++) {                           /* small LCG: any numbers will do */
        st = st * 1664525u + 1013904223u;
        pos[i] = (float)((st >> 8) & 0xffff) / 32768.0f - 1.0f;
        neg[i] = 0.8f * pos[i] + (float)(st & 0xff) / 1024.0f;
    }
    /* plain guidance: pos + G·(pos − neg), one rounding per operation */
    for (int i = 0; i < N; i++) { volatile float g = 2.5f * (pos[i] - neg[i]); ref[i] = pos[i] + g; }
    zi_cfg_combine(pred, pos, neg, N, 2.5, 0);
    CHECK(bit_diffs(pred, ref, N) == 0, "guidance arithmetic");
    /* classic scale S = G + 1 is neg + S·(pos − neg) */
    for (int i = 0; i < N; i++) ref[i] = neg[i] + 3.5f * (pos[i] - neg[i]);
    CHECK_CLOSE("cfg vs classic scale", pred, ref, N, 1e-6);
    /* normalization above the cap: ‖pred‖ becomes 1.1·‖pos‖, direction kept */
    double np = 0, nr = 0, npred = 0;
    for (int i = 0; i < N; i++) { np += (double)pos[i] * pos[i]; nr += (double)ref[i] * ref[i]; }
    CHECK(sqrt(nr) > 1.1 * sqrt(np), "the test needs a prediction above the cap");
    memcpy(pred, pos, sizeof pos);                          /* also: pred aliasing pos */
    zi_cfg_combine(pred, pred, neg, N, 2.5, 1.1);
    for (int i = 0; i < N; i++) npred += (double)pred[i] * pred[i];
    CHECK(fabs(sqrt(npred) / sqrt(np) - 1.1) < 1e-6, "norm ratio %.9g", sqrt(npred) / sqrt(np));
    for (int i = 0; i < N; i++) ref[i] = (float)(ref[i] * (1.1 * sqrt(np) / sqrt(nr)));
    CHECK_CLOSE("renormalized", pred, ref, N, 1e-6);
    /* below the cap nothing changes */
    zi_cfg_combine(pred, pos, neg, N, 2.5, 100.0);
    zi_cfg_combine(ref, pos, neg, N, 2.5, 0);
    CHECK(bit_diffs(pred, ref, N) == 0, "a generous cap leaves pred alone");
}
