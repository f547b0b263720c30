/* sampler.c: flow-matching schedules, samplers, classifier-free guidance and torch-compatible
 * noise. See the sampler.c section of zimage.h.
 *
 * The point of this file is to reproduce PyTorch's float32 arithmetic exactly, so every
 * expression below follows the operation order of the Python code it mirrors (diffusers'
 * schedulers, pipeline_z_image.py, torch's random kernels), and every product that PyTorch rounds
 * on its own goes through zi_rnd() (tensor.h). */
#include "zimage.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ================================================================ schedule */

/* torch.linspace(start, end, steps) in float32 (aten RangeFactoriesKernel.cpp): the first half
 * counts up from start, the second half down from end, both with the float32 step. PyTorch's
 * CPU kernels are built with FMA contraction, so start + step·i is one fused operation. */
void zi_linspace_f32(float start, float end, int steps, float *out) {
    if (steps == 1) { out[0] = start; return; }
    float step = (end - start) / (float)(steps - 1);
    int halfway = steps / 2;
    for (int i = 0; i < steps; i++)
        out[i] = i < halfway ? fmaf(step, (float)i, start) : fmaf(-step, (float)(steps - i - 1), end);
}

void zi_flow_sigmas(int steps, double shift, float *sigmas) {
    /* pipeline_z_image.get_default_z_image_sigmas: torch.linspace(1.0, 1 / N, N); then
     * FlowMatchEulerDiscreteScheduler.set_timesteps shifts them with numpy in float32:
     * shift * s / (1 + (shift - 1) * s), the Python float operands cast to float32. */
    zi_linspace_f32(1.0f, (float)(1.0 / steps), steps, sigmas);
    float a = (float)shift, b = (float)(shift - 1.0);
    for (int i = 0; i < steps; i++) {
        float s = sigmas[i];
        sigmas[i] = (a * s) / (1.0f + zi_rnd(b * s));
    }
    sigmas[steps] = 0.0f;
}

float zi_flow_timestep(float sigma) { return sigma * 1000.0f; }

/* The pipeline: timestep = (1000 - t) / 1000 with t = σ·1000, a division (on the CPU; CUDA
 * multiplies by the float32 reciprocal of 1000 instead, which can differ in the last bit). */
float zi_flow_t(float sigma) { return (1000.0f - zi_rnd(zi_flow_timestep(sigma))) / 1000.0f; }

/* ================================================================ samplers */

static const char *const sampler_names[] = { [ZI_EULER] = "euler", [ZI_HEUN] = "heun",
                                             [ZI_DPMPP_2M] = "dpmpp_2m" };

int zi_sampler_parse(const char *name, zi_sampler *out) {
    for (int i = 0; i < (int)(sizeof sampler_names / sizeof *sampler_names); i++)
        if (!strcmp(name, sampler_names[i])) { *out = (zi_sampler)i; return 0; }
    zi_seterr("--sampler %s: unknown sampler (euler, heun, dpmpp_2m)", name);
    return -1;
}

const char *zi_sampler_name(zi_sampler s) { return sampler_names[s]; }

int zi_sampler_evals(zi_sampler s, int steps) { return s == ZI_HEUN ? 2 * steps - 1 : steps; }

/* What every sampler carries around: the model and the latents. */
typedef struct {
    zi_velocity_fn velocity;
    zi_step_fn on_step;
    void *ctx;
    float *x, *v;       /* latents [n] (updated in place), model output [n] */
    int64_t n;
    int evals;          /* model evaluations so far */
} run;

static int eval_model(run *r, float sigma) {
    return r->velocity(r->ctx, r->x, sigma, zi_flow_t(sigma), r->v);
}

static void step_done(run *r) {
    if (r->on_step) r->on_step(r->ctx, r->evals, r->x);
    r->evals++;
}

/* FlowMatchEulerDiscreteScheduler.step: prev_sample = sample + dt * model_output. */
static int euler(run *r, const float *sigmas, int steps) {
    for (int i = 0; i < steps; i++) {
        if (eval_model(r, sigmas[i])) return -1;
        float dt = sigmas[i + 1] - sigmas[i];
        for (int64_t j = 0; j < r->n; j++) r->x[j] = r->x[j] + zi_rnd(dt * r->v[j]);
        step_done(r);
    }
    return 0;
}

/* FlowMatchHeunDiscreteScheduler (s_churn = 0, so sigma_hat = sigma). Its schedule repeats every
 * inner sigma: [σ0, σ1, σ1, σ2, σ2, ..., σ_{N-1}, σ_{N-1}, 0], and step() alternates between a
 * first-order (Euler) predictor at σ_i and a second-order corrector evaluated at σ_{i+1} that
 * averages the two derivatives. The last interval, ending at σ = 0, is a plain Euler step.
 * The derivative is computed the long way, as diffusers does: denoised = x − v·σ,
 * d = (x − denoised)/σ, which is not bitwise v. */
static int heun(run *r, const float *sigmas, int steps) {
    int64_t n = r->n;
    float *x = r->x, *v = r->v;
    float *x_prev = zi_malloc((size_t)n * sizeof(float)), *d_prev = zi_malloc((size_t)n * sizeof(float));
    int rc = 0;
    for (int i = 0; i < steps; i++) {
        float sigma = sigmas[i], sigma_next = sigmas[i + 1], dt = sigma_next - sigma;
        if ((rc = eval_model(r, sigma))) break;
        for (int64_t j = 0; j < n; j++) {               /* predictor */
            float denoised = x[j] - zi_rnd(v[j] * sigma);
            float d = (x[j] - denoised) / sigma;
            x_prev[j] = x[j];
            d_prev[j] = d;
            x[j] = x[j] + zi_rnd(d * dt);
        }
        step_done(r);
        if (i == steps - 1) break;                      /* the last step stays first order */
        if ((rc = eval_model(r, sigma_next))) break;
        for (int64_t j = 0; j < n; j++) {               /* corrector */
            float denoised = x[j] - zi_rnd(v[j] * sigma_next);
            float d = (x[j] - denoised) / sigma_next;
            d = 0.5f * (d_prev[j] + d);
            x[j] = x_prev[j] + zi_rnd(d * dt);
        }
        step_done(r);
    }
    free(x_prev);
    free(d_prev);
    return rc;
}

/* log and exp of a float32 scalar, correctly rounded in practice (torch's own float32 log/exp
 * are within an ulp of this). */
static float logf_(float x) { return (float)log((double)x); }
static float expf_(float x) { return (float)exp((double)x); }

/* DPM-Solver++ λ = log(α) − log(σ) for flow sigmas: α = 1 − σ. λ(1) = −inf, λ(0) = +inf. */
static float dpm_lambda(float sigma) { return logf_(1.0f - sigma) - logf_(sigma); }

/* DPMSolverMultistepScheduler with algorithm_type="dpmsolver++", solver_order=2,
 * solver_type="midpoint", use_flow_sigmas=True, prediction_type="flow_prediction",
 * final_sigmas_type="zero" (so the last step is first order, as is the first). It works on the
 * data prediction x0 = x − σ·v. All scalar coefficients are float32, like diffusers' 0-dim
 * tensors; at σ = 1 (α = 0) λ is −inf and the formulas degenerate exactly as they do there
 * (exp(−inf) = 0, 1/inf = 0). */
static int dpmpp_2m(run *r, const float *sigmas, int steps) {
    int64_t n = r->n;
    float *x = r->x, *v = r->v;
    float *m0 = zi_malloc((size_t)n * sizeof(float)), *m1 = zi_malloc((size_t)n * sizeof(float));
    int rc = 0;
    for (int i = 0; i < steps; i++) {
        float sigma_s0 = sigmas[i], sigma_t = sigmas[i + 1];
        if ((rc = eval_model(r, sigma_s0))) break;
        float *prev = m0; m0 = m1; m1 = prev;           /* m1: the previous step's x0 */
        for (int64_t j = 0; j < n; j++) m0[j] = x[j] - zi_rnd(sigma_s0 * v[j]);

        float alpha_t = 1.0f - sigma_t;
        float lambda_t = dpm_lambda(sigma_t), lambda_s0 = dpm_lambda(sigma_s0);
        float h = lambda_t - lambda_s0;
        float a = sigma_t / sigma_s0;                   /* x_t = a·x − b·D0 (− c·D1) */
        float b = alpha_t * (expf_(-h) - 1.0f);
        if (i == 0 || i == steps - 1) {                 /* first order (DDIM) */
            for (int64_t j = 0; j < n; j++) x[j] = zi_rnd(a * x[j]) - zi_rnd(b * m0[j]);
        } else {                                        /* second order, midpoint */
            float h_0 = lambda_s0 - dpm_lambda(sigmas[i - 1]);
            float r0 = h_0 / h;
            float inv_r0 = 1.0f / r0, c = 0.5f * b;
            for (int64_t j = 0; j < n; j++) {
                float D1 = inv_r0 * (m0[j] - m1[j]);
                x[j] = (zi_rnd(a * x[j]) - zi_rnd(b * m0[j])) - zi_rnd(c * D1);
            }
        }
        step_done(r);
    }
    free(m0);
    free(m1);
    return rc;
}

int zi_sample(zi_sampler s, const float *sigmas, int steps, float *x, int64_t n,
              zi_velocity_fn velocity, zi_step_fn on_step, void *ctx) {
    run r = { velocity, on_step, ctx, x, zi_malloc((size_t)n * sizeof(float)), n, 0 };
    int rc = s == ZI_HEUN ? heun(&r, sigmas, steps)
           : s == ZI_DPMPP_2M ? dpmpp_2m(&r, sigmas, steps) : euler(&r, sigmas, steps);
    free(r.v);
    return rc;
}

/* ================================================================ classifier-free guidance */

double zi_cfg_scale(double guidance, double cfg_truncation, float t) {
    /* pipeline_z_image.py: truncation compares the Python float of the float32 t_norm with
     * cfg_truncation, and only when cfg_truncation <= 1. */
    if (!(guidance > 0)) return 0;
    if (cfg_truncation <= 1 && (double)t > cfg_truncation) return 0;
    return guidance;
}

/* ‖x‖₂ in double (torch reduces in float32 in its own order: the results agree to ~1 ulp). */
static float norm2(const float *x, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return (float)sqrt(s);
}

void zi_cfg_combine(float *pred, const float *pos, const float *neg, int64_t n, double guidance,
                    double cfg_normalization) {
    float g = (float)guidance;
    float pos_norm = cfg_normalization > 0 ? norm2(pos, n) : 0;   /* before pred overwrites pos */
    for (int64_t i = 0; i < n; i++) pred[i] = pos[i] + zi_rnd(g * (pos[i] - neg[i]));
    if (cfg_normalization > 0) {
        float max_norm = pos_norm * (float)cfg_normalization;
        float new_norm = norm2(pred, n);
        if (new_norm > max_norm) {
            float scale = max_norm / new_norm;
            for (int64_t i = 0; i < n; i++) pred[i] *= scale;
        }
    }
}

/* ================================================================ torch.randn, CPU
 * torch.Generator("cpu") is a 32-bit Mersenne Twister (mt19937) seeded with the low 32 bits of
 * the seed. randn on a contiguous float32 tensor of n >= 16 elements (aten/src/ATen/native/cpu/
 * DistributionTemplates.h, normal_fill_AVX2; the AVX2 kernel is also used on AVX-512 CPUs):
 *   1. fill the tensor with uniforms u = (r & 0xffffff)·2^-24, one 32-bit draw each;
 *   2. for each block of 16: Box-Muller on the pairs (u[j], u[j+8]), j < 8:
 *        radius = sqrt(−2·log(1 − u[j])), θ = 2π·u[j+8]
 *        out[j] = radius·cos θ,  out[j+8] = radius·sin θ
 *      with log/sin/cos from avx_mathfun.h (Cephes polynomials, ported below);
 *   3. if 16 does not divide n, draw 16 fresh uniforms into the last 16 slots and redo them.
 * For n < 16 it draws one double normal per element instead (at::normal_distribution<double>:
 * 53-bit uniforms from two draws, Box-Muller in double, the sine kept for the next element). */

typedef struct { uint32_t s[624]; int next; } mt19937;

static void mt_seed(mt19937 *m, uint32_t seed) {
    m->s[0] = seed;
    for (uint32_t i = 1; i < 624; i++) m->s[i] = 1812433253u * (m->s[i - 1] ^ (m->s[i - 1] >> 30)) + i;
    m->next = 624;
}

static uint32_t mt_next(mt19937 *m) {
    if (m->next == 624) {                           /* regenerate the whole state */
        for (int i = 0; i < 624; i++) {
            uint32_t y = (m->s[i] & 0x80000000u) | (m->s[(i + 1) % 624] & 0x7fffffffu);
            m->s[i] = m->s[(i + 397) % 624] ^ (y >> 1) ^ ((y & 1) ? 0x9908b0dfu : 0);
        }
        m->next = 0;
    }
    uint32_t y = m->s[m->next++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

static float mt_uniform_f32(mt19937 *m) { return (float)(mt_next(m) & 0xffffffu) * (1.0f / 16777216.0f); }

static double mt_uniform_f64(mt19937 *m) {
    uint64_t hi = mt_next(m), lo = mt_next(m);
    return (double)(((hi << 32) | lo) & ((1ull << 53) - 1)) * (1.0 / 9007199254740992.0);
}

static float f32_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t bits_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* The two functions below port avx_mathfun.h's log256_ps and sincos256_ps to one lane.
 * PyTorch's binaries compile them with GCC, -mfma and floating-point contraction, so several
 * `a*b + c` pairs of the source became one FMA: the fmaf() calls mark exactly those (found by
 * matching torch's output bit for bit). Products that only feed an fmaf() or another product
 * cannot be fused by the compiler, so they need no zi_rnd(). */

/* log(x) for a normal positive float: x = m·2^e with m in [√½, √2), then a degree-9
 * polynomial in m − 1 (Cephes logf). */
static float cephes_logf(float x) {
    uint32_t bits = bits_f32(x);
    float e = (float)((int32_t)(bits >> 23) - 0x7f) + 1.0f;
    x = f32_bits((bits & ~0x7f800000u) | 0x3f000000u);        /* mantissa in [0.5, 1) */
    if (x < 0.707106781186547524f) {
        e = e - 1.0f;
        x = (x - 1.0f) + x;
    } else {
        x = x - 1.0f;
    }
    float z = x * x;
    static const float p[9] = { 7.0376836292E-2f, -1.1514610310E-1f, 1.1676998740E-1f,
                                -1.2420140846E-1f, 1.4249322787E-1f, -1.6668057665E-1f,
                                2.0000714765E-1f, -2.4999993993E-1f, 3.3333331174E-1f };
    float y = p[0];
    for (int i = 1; i < 9; i++) y = fmaf(y, x, p[i]);
    y = fmaf(y * x, z, e * -2.12194440e-4f);
    y = y - z * 0.5f;                                         /* exact product */
    x = x + y;
    return x + e * 0.693359375f;                              /* exact product */
}

/* sin and cos of x >= 0 (Cephes sinf/cosf): reduce by the multiple j of π/4 in three parts
 * ("extended precision modular arithmetic"), then evaluate a sine and a cosine polynomial;
 * j decides which polynomial and which sign each output takes. */
static void cephes_sincosf(float x, float *s, float *c) {
    int32_t j = (int32_t)(x * 1.27323954473516f);           /* truncation, as cvttps */
    j = (j + 1) & ~1;
    float y = (float)j;
    uint32_t sign_sin = (uint32_t)(j & 4) << 29;
    uint32_t sign_cos = (uint32_t)(~(j - 2) & 4) << 29;
    int swap = (j & 2) != 0;                                /* sine from the cosine polynomial */

    x = fmaf(y, -0.78515625f, x);
    x = fmaf(y, -2.4187564849853515625e-4f, x);
    x = fmaf(y, -3.77489497744594108e-8f, x);

    float z = x * x;
    float yc = 2.443315711809948E-005f;                     /* cosine polynomial */
    yc = fmaf(yc, z, -1.388731625493765E-003f);
    yc = fmaf(yc, z, 4.166664568298827E-002f);
    yc = fmaf(yc * z, z, -(z * 0.5f));
    yc = yc + 1.0f;
    float ys = -1.9515295891E-4f;                           /* sine polynomial */
    ys = fmaf(ys, z, 8.3321608736E-3f);
    ys = fmaf(ys, z, -1.6666654611E-1f);
    ys = fmaf(ys * z, x, x);

    *s = f32_bits(bits_f32(swap ? yc : ys) ^ sign_sin);
    *c = f32_bits(bits_f32(swap ? ys : yc) ^ sign_cos);
}

/* normal_fill_16_AVX2 (mean 0, std 1): data[0..16) holds uniforms on entry. */
static void normal_fill_16(float *data) {
    const float two_pi = (float)(2.0 * 3.14159265358979323846);
    for (int j = 0; j < 8; j++) {
        float u1 = 1.0f - data[j], u2 = data[j + 8];
        float radius = sqrtf(-2.0f * cephes_logf(u1));
        float s, c;
        cephes_sincosf(two_pi * u2, &s, &c);
        data[j] = radius * c;
        data[j + 8] = radius * s;
    }
}

static void randn_cpu(float *out, int64_t n, uint64_t seed) {
    mt19937 m;
    mt_seed(&m, (uint32_t)seed);
    if (n < 16) {
        /* at::normal_distribution<double>: u1 gives the angle, u2 the radius; the sine of each
         * pair is cached by the generator and returned by the next call. */
        for (int64_t i = 0; i < n; i += 2) {
            double u1 = mt_uniform_f64(&m), u2 = mt_uniform_f64(&m);
            double r = sqrt(-2.0 * log1p(-u2)), theta = 2.0 * 3.14159265358979323846 * u1;
            out[i] = (float)(r * cos(theta));
            if (i + 1 < n) out[i + 1] = (float)(r * sin(theta));
        }
        return;
    }
    for (int64_t i = 0; i < n; i++) out[i] = mt_uniform_f32(&m);
    for (int64_t i = 0; i + 16 <= n; i += 16) normal_fill_16(out + i);
    if (n % 16) {
        float *tail = out + n - 16;
        for (int i = 0; i < 16; i++) tail[i] = mt_uniform_f32(&m);
        normal_fill_16(tail);
    }
}

/* ================================================================ torch.randn, CUDA
 * torch.Generator("cuda") is Philox4x32-10 (curand). randn launches 256-thread blocks on
 * grid = min(ceil(n/256), max_blocks) blocks; thread `idx` runs curand_init(seed, subsequence =
 * idx, offset = 0) and, for k = 0, 1, ..., draws curand_normal4(): one Philox block
 * (counter = (k, idx), key = seed) gives four uint32 x0..x3 and two Box-Muller pairs
 *   u = x0·2^-32 + 2^-33, v = x1·2π·2^-32 + π·2^-32, s = sqrt(−2·log u): (s·sin v, s·cos v)
 * and likewise (x2, x3). Normal number q of round k of thread idx lands at element
 * idx + threads·(4k + q) (aten/src/ATen/native/cuda/DistributionTemplates.h).
 * The GPU takes sin and cos from the __sincosf intrinsic: it scales v by 1/2π rounding toward
 * zero, then the special-function unit approximates sin/cos(2π·r) (absolute error ~2^-22). The
 * first part is reproduced below, the hardware approximation is not: most values differ from
 * the GPU's in the last bits (by at most ~1e-6 for values up to 5). */

static void philox4x32_10(const uint32_t ctr_in[4], uint64_t seed, uint32_t out[4]) {
    uint32_t c[4] = { ctr_in[0], ctr_in[1], ctr_in[2], ctr_in[3] };
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c[0], p1 = (uint64_t)0xCD9E8D57u * c[2];
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0, n1 = (uint32_t)p1;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1, n3 = (uint32_t)p0;
        c[0] = n0; c[1] = n1; c[2] = n2; c[3] = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    memcpy(out, c, sizeof c);
}

/* One output of curand's _curand_box_muller: the sine (first) or cosine (second) of the pair. */
static float curand_box_muller(uint32_t x, uint32_t y, int cosine) {
    const float inv32 = 2.3283064e-10f, inv32_2pi = 2.3283064e-10f * 6.2831855f;
    float u = (float)x * inv32 + inv32 / 2;
    float v = fmaf((float)y, inv32_2pi, inv32_2pi / 2);     /* nvcc fuses this into one FMA */
    float s = sqrtf(-2.0f * logf_(u));
    double prod = (double)v * 0.15915494f;                  /* exact: v / 2π in turns */
    float turns = (float)prod;
    if (fabs((double)turns) > fabs(prod)) turns = nextafterf(turns, 0.0f);   /* round toward zero */
    double angle = 2.0 * 3.14159265358979323846 * turns;
    return (float)(cosine ? cos(angle) : sin(angle)) * s;
}

void zi_randn_cuda(float *out, int64_t n, uint64_t seed, int64_t max_blocks) {
    if (n <= 0) return;
    int64_t blocks = (n + 255) / 256;
    if (blocks > max_blocks) blocks = max_blocks;
    int64_t threads = 256 * blocks;
    for (int64_t i = 0; i < n; i++) {
        int64_t idx = i % threads, q = i / threads, k = q / 4;
        uint32_t ctr[4] = { (uint32_t)k, (uint32_t)((uint64_t)k >> 32), (uint32_t)idx,
                            (uint32_t)((uint64_t)idx >> 32) }, x[4];
        philox4x32_10(ctr, seed, x);
        int pair = (int)(q % 4) / 2;
        out[i] = curand_box_muller(x[2 * pair], x[2 * pair + 1], (int)(q % 2));
    }
}

int zi_rng_parse(const char *name, zi_rng *out) {
    if (!strcmp(name, "cpu")) { *out = ZI_RNG_CPU; return 0; }
    if (!strcmp(name, "cuda")) { *out = ZI_RNG_CUDA; return 0; }
    zi_seterr("--rng %s: unknown generator (cpu, cuda)", name);
    return -1;
}

void zi_randn(float *out, int64_t n, uint64_t seed, zi_rng dev) {
    if (dev == ZI_RNG_CUDA) zi_randn_cuda(out, n, seed, 132 * 8);   /* H100: 132 SMs × 2048/256 */
    else randn_cpu(out, n, seed);
}
