/* bench_full.c: whole-model timings on a full-size model with random weights (`make bench-full`;
 * usage: bench_full MODEL_DIR [stage,stage,...]; the model comes from bench/make_model.c).
 *
 * Stages (default: all but dit1024cfg, in this order):
 *   machine    fp32 FMA peak and memory bandwidth (bench/machine.c), the reference of every %
 *   te         text encoder on a 32-token prompt; compared with streaming its weights once
 *   dit256     one DiT forward at 256² (cfg 1: one item), caption of 32 tokens
 *   dit512     the same at 512²
 *   vae512     VAE decode of a 512² image
 *   vae1024    VAE decode of a 1024² image
 *   train256   one LoRA training step at 256² (rank 32, default targets, gradient checkpointing), the
 *              second of two
 *   train256nc the same without gradient checkpointing (every block's activations kept)
 *   train512   the same at 512²
 *   pipe1024   the whole pipeline at 1024² with one step: its peak RSS is the inference goal
 *   dit1024cfg one DiT forward at 1024² with CFG (a batch of two): the largest activations
 *
 * With the fast path on (ZIMAGE_FAST=1) te, dit* and vae* also run once exactly, untimed, and note
 * the fast output's error against it, max |fast - exact| / max |exact|.
 *
 * Each stage runs in its own child process, so that its peak RSS (VmHWM: the weights' mapped
 * pages plus the heap) is its own and a stage's freed memory cannot hide in the next. Before a
 * stage is timed, the component's files are read once (page cache) and, for the DiT, its mapped
 * weights are faulted in: "load" is that set-up (from page cache to mapped), "run" one
 * iteration. FLOPs are counted analytically (matrix products only: Linear layers, attention,
 * convolutions); rates are per wall second and, as % of peak, also per CPU second (the machine
 * may be shared).
 */
#include "../zimage.h"
#include "machine.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <dirent.h>

#define CAPTION_TOKENS 32

/* What a stage sends back to the parent through a pipe. */
typedef struct {
    int ok;
    double load, run, cpu;      /* seconds: set-up, one iteration (wall), its CPU time */
    double flop;                /* of the run */
    double rss;                 /* peak resident bytes of the stage (VmHWM) */
    double weights;             /* bytes of the component's weight files */
    bench_machine mach;         /* stage "machine" only */
    char note[256];
} result;

/* ---------------------------------------------------------------- helpers */
static double vm_hwm(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) kb = atof(line + 6);
    if (f) fclose(f);
    return kb * 1024;
}

/* Reads every file of dir (one level) so that the timed part finds them in the page cache;
 * returns their total size. */
static double warm_files(const char *dir) {
    DIR *d = opendir(dir);
    double total = 0;
    static char buf[1 << 20];
    for (struct dirent *e; d && (e = readdir(d));) {
        if (!strstr(e->d_name, ".safetensors") || strstr(e->d_name, ".json")) continue;
        char *p = zi_path("%s/%s", dir, e->d_name);
        int fd = open(p, O_RDONLY);
        for (ssize_t n; fd >= 0 && (n = read(fd, buf, sizeof buf)) > 0;) total += n;
        if (fd >= 0) close(fd);
        free(p);
    }
    if (d) closedir(d);
    return total;
}

/* Maps in the pages of every weight of the layers (MADV_POPULATE_READ where the kernel has
 * it, else one read per page), as the first forward would. */
static void fault_in(zi_lin *(*at)(void *, int), void *model) {
    long page = sysconf(_SC_PAGESIZE);
    volatile unsigned char sink = 0;
    for (int i = 0;; i++) {
        zi_lin *l = at(model, i);
        if (!l) break;
        uintptr_t a = (uintptr_t)l->W.data & ~(uintptr_t)(page - 1);
        size_t n = (uintptr_t)l->W.data + (size_t)(l->W.rows * l->W.cols * zi_dtype_size(l->W.dtype)) - a;
#ifdef MADV_POPULATE_READ
        if (!madvise((void *)a, n, MADV_POPULATE_READ)) continue;
#endif
        for (size_t o = 0; o < n; o += (size_t)page) sink ^= ((const unsigned char *)a)[o];
    }
    (void)sink;
}

static zi_lin *dit_lin(void *m, int i) { return zi_dit_lin_at(m, i); }

static float *random_floats(int64_t n, uint64_t seed) {
    float *x = zi_malloc((size_t)n * sizeof *x);
    zi_randn(x, n, seed, ZI_RNG_CPU);
    return x;
}

static int all_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* The fast path's error on a stage's output: max |fast − exact| / max |exact|. */
static double rel_error(const float *fast, const float *exact, int64_t n) {
    double d = 0, m = 0;
    for (int64_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)fast[i] - exact[i]));
        m = fmax(m, fabs((double)exact[i]));
    }
    return d / m;
}

/* With the fast path on (ZIMAGE_FAST=1) a stage also runs once exactly, untimed, and appends
 * its output's rel_error to the note: the error of --fast per stage at full size. */
static void note_fast_error(result *r, double err) {
    size_t n = strlen(r->note);
    snprintf(r->note + n, sizeof r->note - n, "; --fast vs exact %.1e", err);
}

/* ---------------------------------------------------------------- FLOP counts */
/* One DiT forward of one item: latent h x w (pixels / 8), caption of L tokens. Linear layers
 * 2·rows·in·out, attention 4·S²·D per block (q·kᵀ and p·v). */
static double dit_flop(zi_dit *m, int h, int w, int L) {
    const zi_dit_cfg *c = zi_dit_config(m);
    double D = c->dim, F = (double)zi_dit_linear(m, "layers.0.feed_forward.w1")->W.rows, A = c->adaln_dim, pd = c->patch * c->patch * c->in_channels;
    double Ni = (double)(h / c->patch) * (w / c->patch), Sx = ceil(Ni / 32) * 32, Sc = ceil(L / 32.0) * 32;
    double Su = Sx + Sc;
    double per_row = 2 * (4 * D * D + 3 * D * F), attn = 4 * D;
    double blocks = c->n_refiner_layers * (Sx * per_row + Sx * Sx * attn) +
                    c->n_refiner_layers * (Sc * per_row + Sc * Sc * attn) + c->n_layers * (Su * per_row + Su * Su * attn);
    return blocks + 2 * Sx * pd * D + 2 * Sc * c->cap_feat_dim * D + 2 * Ni * D * pd +
           2 * (c->n_refiner_layers + c->n_layers) * 4 * D * A;
}

/* A training step: the forward (with gradient checkpointing twice: once more in the backward), the
 * input gradients of every Linear (as many FLOPs as its forward; frozen weights get none), the
 * attention backward at FlashAttention-2's count (2.5 forwards), the LoRA adapters' extra work
 * ignored (rank 32: < 2%). */
static double train_flop(zi_dit *m, int h, int w, int L, int checkpointing) {
    const zi_dit_cfg *c = zi_dit_config(m);
    double D = c->dim, Ni = (double)(h / c->patch) * (w / c->patch);
    double Sx = ceil(Ni / 32) * 32, Sc = ceil(L / 32.0) * 32, Su = Sx + Sc;
    double attn = 4 * D * (c->n_refiner_layers * (Sx * Sx + Sc * Sc) + c->n_layers * Su * Su);
    double fwd = dit_flop(m, h, w, L), lin = fwd - attn;
    return (1 + checkpointing) * fwd + lin + 2.5 * attn;
}

/* The text encoder on L tokens: the Linear layers of the layers run and causal attention. */
static double te_flop(const char *dir, int L, double *weight_bytes) {
    zj *c = zi_config_load(dir, "text_encoder");
    double D = zi_cfg_num(c, "hidden_size", 0), I = zi_cfg_num(c, "intermediate_size", 0);
    double Hq = zi_cfg_num(c, "num_attention_heads", 0), Hkv = zi_cfg_num(c, "num_key_value_heads", 0);
    double hd = zi_cfg_num(c, "head_dim", 0), layers = zi_cfg_num(c, "num_hidden_layers", 1) - 1;
    zj_free(c);
    double params = D * Hq * hd * 2 + 2 * D * Hkv * hd + 3 * D * I;     /* one layer's Linear weights */
    *weight_bytes = layers * params * 2;                                  /* bf16 */
    return layers * (2 * L * params + 2 * (double)L * L * Hq * hd);
}

/* VAE decode of an image H x W (pixels): every convolution 2·Cout·Cin·k²·pixels and the mid
 * attention (4 Linear layers and one head over the latent-resolution positions). */
static double vae_flop(const char *dir, int H, int W) {
    zj *c = zi_config_load(dir, "vae");
    int ch[8], n = zi_cfg_ints(c, "block_out_channels", ch, 8);
    double L = zi_cfg_num(c, "layers_per_block", 2), lat = zi_cfg_num(c, "latent_channels", 16);
    zj_free(c);
    double px = (double)(H >> (n - 1)) * (W >> (n - 1)), top = ch[n - 1];
    double conv3 = 2 * 9, f = conv3 * top * lat * px;                   /* conv_in */
    double res = 2 * conv3 * top * top * px;                              /* one resnet at width top */
    f += 2 * res + 4 * 2 * top * top * px + 4 * px * px * top;            /* mid: 2 resnets + attention */
    int cin = ch[n - 1];
    for (int i = 0; i < n; i++) {
        int co = ch[n - 1 - i];
        for (int j = 0; j < L + 1; j++, cin = co) {
            f += conv3 * co * cin * px + conv3 * co * co * px;
            if (cin != co) f += 2.0 * co * cin * px;                      /* 1x1 shortcut */
        }
        if (i < n - 1) px *= 4, f += conv3 * co * co * px;                /* upsample conv */
    }
    return f + conv3 * 3 * ch[0] * px;                                    /* conv_out */
}

/* ---------------------------------------------------------------- stages */
typedef struct {
    double t0, c0;
} timer;
static timer start(void) { return (timer){ zi_now(), bench_cpu_now() }; }
static void stop(timer t, result *r) { r->run = zi_now() - t.t0, r->cpu = bench_cpu_now() - t.c0; }

static void stage_machine(const char *dir, result *r) {
    (void)dir;
    bench_measure(&r->mach);
    r->ok = 1;
}

static void stage_te(const char *dir, result *r) {
    char *td = zi_path("%s/text_encoder", dir);
    r->weights = warm_files(td);
    double t0 = zi_now();
    zi_te *te = zi_te_load(td);
    free(td);
    if (!te) { snprintf(r->note, sizeof r->note, "%s", zi_err()); return; }
    r->load = zi_now() - t0;
    int32_t ids[CAPTION_TOKENS];
    for (int i = 0; i < CAPTION_TOKENS; i++) ids[i] = (int32_t)((i * 7919 + 13) % 150000);   /* any ids: the time does not depend on them */
    double stream;
    r->flop = te_flop(dir, CAPTION_TOKENS, &stream);
    timer t = start();                  /* first call: its mapped pages are faulted in */
    free(zi_te_encode(te, ids, CAPTION_TOKENS));
    double first = zi_now() - t.t0;
    zi_kernel_seconds k0 = zi_kernel_time();
    t = start();
    float *h = zi_te_encode(te, ids, CAPTION_TOKENS);
    stop(t, r);
    double gemm = zi_kernel_time().gemm - k0.gemm;
    int64_t n = (int64_t)CAPTION_TOKENS * zi_te_dim(te);
    r->ok = all_finite(h, n);
    snprintf(r->note, sizeof r->note, "first call %.2f s; GEMM %.3f s; weights %.2f GB streamed: %.2fx their read time%s",
             first, gemm, stream * 1e-9, r->run / (stream / r->mach.bandwidth), r->ok ? "" : "; NOT FINITE");
    if (zi_fast()) {
        zi_set_fast(0);
        float *exact = zi_te_encode(te, ids, CAPTION_TOKENS);
        zi_set_fast(1);
        note_fast_error(r, rel_error(h, exact, n));
        free(exact);
    }
    free(h);
    zi_te_free(te);
    r->rss = vm_hwm();
}

/* The DiT, loaded and faulted in. */
static zi_dit *load_dit(const char *dir, result *r) {
    char *td = zi_path("%s/transformer", dir);
    r->weights = warm_files(td);
    double t0 = zi_now();
    zi_dit *m = zi_dit_load(td);
    free(td);
    if (!m) { snprintf(r->note, sizeof r->note, "%s", zi_err()); return NULL; }
    fault_in(dit_lin, m);
    r->load = zi_now() - t0;
    return m;
}

/* One forward of B items of size px² (cfg 1: B = 1; CFG: B = 2, the pair of prompts). */
static void stage_dit(const char *dir, result *r, int px, int B) {
    zi_dit *m = load_dit(dir, r);
    if (!m) return;
    const zi_dit_cfg *c = zi_dit_config(m);
    int h = px / 8, w = px / 8, L = CAPTION_TOKENS;
    int64_t n = (int64_t)c->in_channels * h * w;
    float *x = random_floats(n, 1), *cap = random_floats((int64_t)L * c->cap_feat_dim, 2);
    float *out = zi_malloc(2 * (size_t)n * sizeof *out);
    const float *xs[2] = { x, x }, *caps[2] = { cap, cap }, ts[2] = { 0.5f, 0.5f };
    int hs[2] = { h, h }, ws[2] = { w, w }, Ls[2] = { L, L };
    float *outs[2] = { out, out + n };
    zi_kernel_seconds k0 = zi_kernel_time();
    timer t = start();
    int rc = zi_dit_forward(m, B, xs, hs, ws, ts, caps, Ls, outs);
    stop(t, r);
    zi_kernel_seconds k1 = zi_kernel_time();
    r->flop = B * dit_flop(m, h, w, L);
    r->ok = !rc && all_finite(out, B * n);
    double gemm = k1.gemm - k0.gemm, att = k1.attention - k0.attention;
    snprintf(r->note, sizeof r->note, "GEMM %.2f s + attention %.2f s; step = %.3fx their sum", gemm, att,
             r->run / (gemm + att));
    if (rc) snprintf(r->note, sizeof r->note, "%s", zi_err());
    else if (!r->ok) snprintf(r->note, sizeof r->note, "output NOT FINITE");
    else if (zi_fast()) {
        float *exact = zi_malloc(2 * (size_t)n * sizeof *exact), *exacts[2] = { exact, exact + n };
        zi_set_fast(0);
        if (!zi_dit_forward(m, B, xs, hs, ws, ts, caps, Ls, exacts)) note_fast_error(r, rel_error(out, exact, B * n));
        zi_set_fast(1);
        free(exact);
    }
    free(x); free(cap); free(out);
    zi_dit_free(m);
    r->rss = vm_hwm();
}

static void stage_dit256(const char *dir, result *r) { stage_dit(dir, r, 256, 1); }
static void stage_dit512(const char *dir, result *r) { stage_dit(dir, r, 512, 1); }
static void stage_dit1024cfg(const char *dir, result *r) { stage_dit(dir, r, 1024, 2); }

static void stage_vae(const char *dir, result *r, int px) {
    char *vd = zi_path("%s/vae", dir);
    r->weights = warm_files(vd);
    double t0 = zi_now();
    zi_vae *v = zi_vae_load(vd);
    free(vd);
    if (!v) { snprintf(r->note, sizeof r->note, "%s", zi_err()); return; }
    r->load = zi_now() - t0;
    int f = zi_vae_factor(v), h = px / f, w = px / f;
    float *z = random_floats((int64_t)zi_vae_latent_channels(v) * h * w, 3);
    timer t = start();
    float *img = zi_vae_decode(v, z, h, w);
    stop(t, r);
    r->flop = vae_flop(dir, px, px);
    r->ok = img && all_finite(img, (int64_t)3 * px * px);
    if (!r->ok) snprintf(r->note, sizeof r->note, "%s", img ? "output NOT FINITE" : zi_err());
    else if (zi_fast()) {
        zi_set_fast(0);
        float *exact = zi_vae_decode(v, z, h, w);
        zi_set_fast(1);
        if (exact) note_fast_error(r, rel_error(img, exact, (int64_t)3 * px * px));
        free(exact);
    }
    free(img); free(z);
    zi_vae_free(v);
    r->rss = vm_hwm();
}

static void stage_vae512(const char *dir, result *r) { stage_vae(dir, r, 512); }
static void stage_vae1024(const char *dir, result *r) { stage_vae(dir, r, 1024); }

/* One LoRA training step as train.c runs it: noisy latent at one grid point, forward, loss,
 * backward, AdamW. */
static void stage_train(const char *dir, result *r, int px, int checkpointing) {
    zi_dit *m = load_dit(dir, r);
    if (!m) return;
    const zi_dit_cfg *c = zi_dit_config(m);
    int nlin = zi_dit_nlin(m);
    zi_lin **lins = zi_malloc((size_t)nlin * sizeof *lins);
    for (int i = 0; i < nlin; i++) lins[i] = zi_dit_lin_at(m, i);
    zi_train_lora *lora = zi_train_lora_new(lins, nlin, "to_q,to_k,to_v,to_out.0,w1,w2,w3", 32, 7);
    zi_dit_set_training(m, 1, checkpointing);
    int h = px / 8, w = px / 8, L = CAPTION_TOKENS;
    int64_t n = (int64_t)c->in_channels * h * w;
    float *x0 = random_floats(n, 4), *noise = random_floats(n, 5), *cap = random_floats((int64_t)L * c->cap_feat_dim, 6);
    float *xt = zi_malloc((size_t)n * sizeof *xt), *out = zi_malloc((size_t)n * sizeof *out);
    float *dout = zi_malloc((size_t)n * sizeof *dout);
    const float *xp = xt, *cp = cap;
    float sigma = 0.5f, t = zi_flow_t(sigma), loss[2] = { NAN, NAN };
    /* Two steps; the second is timed. The first also touches the gradients, AdamW's moments and
     * the saved activations for the first time (page faults: 0.6 GB of optimizer state at rank
     * 32, a one-off of a training run). */
    double first = 0;
    zi_kernel_seconds k0 = zi_kernel_time();
    timer tm = start();
    int rc = 0;
    for (int step = 0; step < 2 && !rc; step++) {
        if (step == 1) {
            first = zi_now() - tm.t0;
            k0 = zi_kernel_time();
            tm = start();
        }
        zi_train_lora_zero_grad(lora);
        zi_train_noisy(xt, x0, noise, sigma, n);
        rc = zi_dit_forward(m, 1, &xp, &h, &w, &t, &cp, &L, &out);
        if (!rc) {
            loss[step] = zi_train_loss(out, x0, noise, n, 1.0f, 1.0f, dout);
            rc = zi_dit_backward(m, dout);
        }
        if (!rc) rc = zi_train_lora_step(lora, 1e-4, 0.01);
    }
    stop(tm, r);
    r->flop = train_flop(m, h, w, L, checkpointing);
    r->ok = !rc && isfinite(loss[1]) && all_finite(lora->g, lora->n_params);
    zi_kernel_seconds k1 = zi_kernel_time();
    snprintf(r->note, sizeof r->note, "%s%d LoRA modules, %.1f M parameters, losses %.4f %.4f; first step %.2f s; "
             "GEMM %.2f s + attention %.2f s", rc ? zi_err() : "", lora->lora.n, lora->n_params * 1e-6, loss[0], loss[1],
             first, k1.gemm - k0.gemm, k1.attention - k0.attention);
    free(x0); free(noise); free(cap); free(xt); free(out); free(dout); free(lins);
    zi_train_lora_free(lora);
    zi_dit_free(m);
    r->rss = vm_hwm();
}

static void stage_train256(const char *dir, result *r) { stage_train(dir, r, 256, 1); }
static void stage_train256nc(const char *dir, result *r) { stage_train(dir, r, 256, 0); }
static void stage_train512(const char *dir, result *r) { stage_train(dir, r, 512, 1); }

/* zi_generate at 1024², one step, cfg 1: text encoder, DiT, VAE one after the other. */
static void stage_pipe1024(const char *dir, result *r) {
    const char *prompt = "A red fox sitting in the snow at dawn, soft light, highly detailed photograph";
    char *sub[3] = { zi_path("%s/text_encoder", dir), zi_path("%s/transformer", dir), zi_path("%s/vae", dir) };
    for (int i = 0; i < 3; i++) {
        double b = warm_files(sub[i]);
        if (i == 1) r->weights = b;
        free(sub[i]);
    }
    char *tokdir = zi_path("%s/tokenizer", dir);
    zi_tokenizer *tok = zi_tok_load(tokdir);
    free(tokdir);
    int32_t *ids = NULL;
    int L = tok ? zi_tok_chat(tok, prompt, ZI_MAX_TOKENS, &ids) : -1;
    free(ids);
    zi_tok_free(tok);
    zi_params p = zi_params_default();
    p.prompt = prompt;
    p.steps = 1;
    p.quiet = 1;
    timer t = start();
    float *img = zi_generate(dir, &p);
    stop(t, r);
    char *td = zi_path("%s/transformer", dir);
    zi_dit *m = zi_dit_load(td);        /* only for its config: the pages it maps are not touched */
    free(td);
    double stream;
    r->flop = te_flop(dir, L, &stream) + (m ? dit_flop(m, 128, 128, L) : 0) + vae_flop(dir, 1024, 1024);
    zi_dit_free(m);
    r->ok = img && all_finite(img, 3 * 1024 * 1024);
    snprintf(r->note, sizeof r->note, "%s%d prompt tokens, text encoder + 1 DiT step + VAE decode",
             img ? "" : zi_err(), L);
    free(img);
    r->rss = vm_hwm();
}

/* ---------------------------------------------------------------- driver */
typedef struct {
    const char *name;
    void (*fn)(const char *dir, result *r);
} stage;

static const stage stages[] = {
    { "machine", stage_machine }, { "te", stage_te }, { "dit256", stage_dit256 }, { "dit512", stage_dit512 },
    { "vae512", stage_vae512 }, { "vae1024", stage_vae1024 }, { "train256", stage_train256 },
    { "train256nc", stage_train256nc }, { "train512", stage_train512 }, { "pipe1024", stage_pipe1024 }, { "dit1024cfg", stage_dit1024cfg },
};
enum { NSTAGES = sizeof stages / sizeof stages[0] };

/* Runs a stage in a child process (which starts its own thread pool) and returns its result. */
static result run_child(const stage *s, const char *dir, const bench_machine *mach) {
    result r = { .mach = *mach };
    int fd[2];
    if (pipe(fd)) zi_die("pipe failed");
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) zi_die("fork failed");
    if (pid == 0) {
        close(fd[0]);
        zi_threads_init(0);
        s->fn(dir, &r);
        if (write(fd[1], &r, sizeof r) != (ssize_t)sizeof r) _exit(1);
        _exit(0);
    }
    close(fd[1]);
    ssize_t got = read(fd[0], &r, sizeof r);
    close(fd[0]);
    int status;
    waitpid(pid, &status, 0);
    if (got != (ssize_t)sizeof r) {
        r = (result){ .mach = *mach };
        snprintf(r.note, sizeof r.note, "the stage died (%s %d)", WIFSIGNALED(status) ? "signal" : "exit status",
                 WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
    }
    return r;
}

static int wanted(const char *list, const char *name) {
    if (!list) return strcmp(name, "dit1024cfg") != 0;     /* 2 x 60 TFLOP: on request only */
    size_t n = strlen(name);
    for (const char *p = list; (p = strstr(p, name)); p += n)
        if ((p == list || p[-1] == ',') && (p[n] == ',' || !p[n])) return 1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: bench_full MODEL_DIR [stage,stage,...]\n");
        return 1;
    }
    const char *dir = argv[1], *list = argc > 2 && argv[2][0] ? argv[2] : NULL;
    for (const char *p = list; p && *p;) {      /* every name in the list must be a stage */
        size_t n = strcspn(p, ",");
        int known = 0;
        for (int i = 1; i < NSTAGES; i++) known |= strlen(stages[i].name) == n && !strncmp(stages[i].name, p, n);
        if (!known) zi_die("bench_full: unknown stage '%.*s' (see bench/bench_full.c)", (int)n, p);
        p += n + (p[n] == ',');
    }
    /* the parent never starts threads: every stage forks from a single-threaded process */
    result m = run_child(&stages[0], dir, &(bench_machine){0});
    bench_machine mach = m.mach;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    const char *env = getenv("ZIMAGE_THREADS");
    printf("model %s\n%ld cores, threads %s, fp32 FMA peak %.1f GFLOP/s (per CPU-s %.1f), memory read %.1f GB/s\n",
           dir, cores, env ? env : "all", mach.peak * 1e-9, mach.peak_cpu * 1e-9, mach.bandwidth * 1e-9);
    printf("%-10s %7s %8s %8s %9s %8s %6s %7s %8s %8s  %s\n", "stage", "load s", "run s", "cpu s", "GFLOP", "GFLOP/s",
           "%peak", "%p/cpu", "RSS GB", "-weights", "notes");
    fflush(stdout);
    int failed = 0;
    double forward[2] = {0, 0};     /* dit256, dit512 run seconds: the training steps' yardstick */
    for (int i = 1; i < NSTAGES; i++) {
        if (!wanted(list, stages[i].name)) continue;
        result r = run_child(&stages[i], dir, &mach);
        double rate = r.run > 0 ? r.flop / r.run : 0, rate_cpu = r.cpu > 0 ? r.flop / r.cpu : 0;
        printf("%-10s %7.2f %8.2f %8.2f %9.1f %8.1f %6.1f %7.1f %8.2f %8.2f  %s%s\n", stages[i].name, r.load, r.run,
               r.cpu, r.flop * 1e-9, rate * 1e-9, 100 * rate / mach.peak, 100 * rate_cpu / mach.peak_cpu, r.rss * 1e-9,
               (r.rss - r.weights) * 1e-9, r.ok ? "" : "FAILED ", r.note);
        for (int k = 0; k < 2 && r.ok; k++) {
            char dit[16], train[16];
            snprintf(dit, sizeof dit, "dit%d", 256 << k);
            snprintf(train, sizeof train, "train%d", 256 << k);
            if (!strcmp(stages[i].name, dit)) forward[k] = r.run;
            if (!strncmp(stages[i].name, train, strlen(train)) && forward[k] > 0)
                printf("%-10s a training step = %.2fx one %s forward (goal <= 3.5x; %s)\n", "", r.run / forward[k], dit,
                       strstr(stages[i].name, "nc") ? "without checkpointing" : "gradient checkpointing runs the forward twice");
        }
        fflush(stdout);
        failed |= !r.ok;
    }
    return failed;
}
