/* Crash safety of ./train: SIGKILL at pseudo-random moments and inside checkpoint writes,
 * after which every file present must load and --resume must finish with the same bytes as an
 * uninterrupted run; and a diverging run (NaN in the loss or a gradient) must stop with a
 * one-line error, leaving the last good checkpoint and state as they were.
 *
 * The kills inside a write use the hook ZIMAGE_TEST_SLOW_WRITE=MS (safetensors.c): every
 * zi_stw_write sleeps MS milliseconds between its fsync'd temporary and the rename, and the
 * test kills train as soon as the temporary it waits for appears. */
#include "test.h"
#include "../zimage.h"

#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define TINY "test/golden/tiny-zimage"
#define TARGETS "to_q,to_k,to_v,to_out.0,w1,w2,w3"

/* The run: 3 rows x 4 = 12 samples an epoch, 3 epochs, optimizer steps of 2 samples, a
 * checkpoint every 3 samples (so half of them in the middle of an accumulation, and one at
 * each epoch's end next to epoch-K), float32 checkpoints so that they equal the state's
 * weights bit for bit. */
enum { PER_EPOCH = 12, EPOCHS = 3, SAVE_STEPS = 3, TOTAL = PER_EPOCH * EPOCHS };
static const char *const run_args[] = {
    "--lora-rank", "4", "--dataset-repeat", "4", "--num-epochs", "3", "--gradient-accumulation-steps", "2",
    "--save-steps", "3", "--save-dtype", "f32", "--seed", "5", "-t", "1", "-q", NULL,
};

/* Three 32x32 PNGs and a CSV naming them. */
static int write_dataset(const char *dir) {
    if (mkdir(dir, 0777)) return -1;
    uint8_t rgb[32 * 32 * 3];
    char path[600];
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < 32 * 32 * 3; i++) rgb[i] = (uint8_t)(127 + 120 * sin(0.05 * i * (k + 1) + k));
        snprintf(path, sizeof path, "%s/%c.png", dir, 'a' + k);
        if (zi_png_write(path, rgb, 32, 32, NULL, 0)) return -1;
    }
    snprintf(path, sizeof path, "%s/meta.csv", dir);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fputs("image,prompt\na.png,waves\nb.png,\"finer waves, shifted\"\nc.png,the finest\n", f);
    return fclose(f);
}

/* Starts ./train on data into out (--resume out when resume is set), its stdout and stderr
 * appended to log; slow_ms > 0 sets ZIMAGE_TEST_SLOW_WRITE. Returns the child's pid. */
static pid_t start_train(const char *data, const char *out, int resume, int slow_ms, const char *log) {
    char bin[600], meta[600], slow[32];
    snprintf(bin, sizeof bin, "%s/train", zt_bin());
    snprintf(meta, sizeof meta, "%s/meta.csv", data);
    const char *argv[64] = { bin, TINY, "--dataset-base-path", data, "--dataset-metadata-path", meta,
                             "--output-path", out };
    int n = 8;
    for (int i = 0; run_args[i]; i++) argv[n++] = run_args[i];
    if (resume) { argv[n++] = "--resume"; argv[n++] = out; }
    argv[n] = NULL;
    fflush(NULL);
    pid_t pid = fork();
    if (pid) return pid;
    int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) { dup2(fd, 1); dup2(fd, 2); }
    snprintf(slow, sizeof slow, "%d", slow_ms);
    if (slow_ms > 0) setenv("ZIMAGE_TEST_SLOW_WRITE", slow, 1);
    execv(bin, (char *const *)argv);
    _exit(127);
}

/* 1 when dir holds a temporary (NAME.tmp) whose name starts with prefix */
static int has_tmp(const char *dir, const char *prefix) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    struct dirent *e;
    int found = 0;
    while (!found && (e = readdir(d))) {
        size_t n = strlen(e->d_name);
        found = n > 4 && !strcmp(e->d_name + n - 4, ".tmp") && !strncmp(e->d_name, prefix, strlen(prefix));
    }
    closedir(d);
    return found;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* Where a run saves: step-N every save_steps samples and at total, epoch-K every per_epoch. */
typedef struct { int64_t save_steps, per_epoch, total; } run_shape;
static const run_shape crash_run = { SAVE_STEPS, PER_EPOCH, TOTAL }, nan_run = { 1, 30, 30 };

/* The DiT's trainable LoRA, to load training states into. */
typedef struct {
    zi_dit *dit;
    zi_train_lora *lora;
} state_loader;

static int loader_open(state_loader *sl) {
    sl->dit = zi_dit_load(TINY "/transformer");
    if (!sl->dit) return -1;
    int n = zi_dit_nlin(sl->dit);
    zi_lin *lins[1024];
    if (n > 1024) return -1;
    for (int i = 0; i < n; i++) lins[i] = zi_dit_lin_at(sl->dit, i);
    sl->lora = zi_train_lora_new(lins, n, TARGETS, 4, 5);
    return sl->lora ? 0 : -1;
}

static void loader_close(state_loader *sl) {
    zi_train_lora_free(sl->lora);
    zi_dit_free(sl->dit);
}

/* 1 when the LoRA file at path holds exactly the weights of t */
static int same_weights(const char *path, const zi_train_lora *t) {
    zi_lora *l = zi_lora_load(path);
    int ok = l && l->n == t->lora.n;
    for (int i = 0; ok && i < t->lora.n; i++) {
        const zi_lora_module *m = &t->lora.m[i], *s = NULL;
        for (int j = 0; j < l->n && !s; j++)
            if (!strcmp(l->m[j].name, m->name)) s = &l->m[j];
        ok = s && s->rank == m->rank && s->in == m->in && s->out == m->out &&
             !memcmp(s->A, m->A, (size_t)m->rank * m->in * sizeof(float)) &&
             !memcmp(s->B, m->B, (size_t)m->out * m->rank * sizeof(float));
    }
    zi_lora_free(l);
    return ok;
}

/* After a kill: every checkpoint in out loads, every cache entry opens, and the training state
 * (when there is one) loads and equals the checkpoints saved with it; *at = its sample (0 when
 * there is none). Returns NULL or what is wrong (static buffer). */
static const char *check_dir(const char *out, state_loader *sl, const run_shape *r, int64_t *at) {
    static char why[1200];
    char path[900];
    DIR *d = opendir(out);
    if (!d) return "no output directory";
    struct dirent *e;
    why[0] = 0;
    while (!why[0] && (e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (n < 12 || strcmp(e->d_name + n - 12, ".safetensors") || !strcmp(e->d_name, "training-state.safetensors"))
            continue;
        snprintf(path, sizeof path, "%s/%s", out, e->d_name);
        zi_lora *l = zi_lora_load(path);
        if (!l) snprintf(why, sizeof why, "checkpoint does not load: %s", zi_err());
        zi_lora_free(l);
    }
    closedir(d);
    snprintf(path, sizeof path, "%s/cache", out);
    d = opendir(path);
    while (d && !why[0] && (e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (n < 12 || strcmp(e->d_name + n - 12, ".safetensors")) continue;
        snprintf(path, sizeof path, "%s/cache/%s", out, e->d_name);
        zi_st *st = zi_st_open(path);
        if (!st) snprintf(why, sizeof why, "cache entry does not open: %s", zi_err());
        zi_st_close(st);
    }
    if (d) closedir(d);
    if (why[0]) return why;

    snprintf(path, sizeof path, "%s/training-state.safetensors", out);
    *at = 0;
    if (!file_exists(path)) return NULL;
    zi_st *st = zi_st_open(path);
    const char *c = st ? zi_st_meta(st, "config") : NULL;
    char *config = c ? zi_strdup(c) : NULL;
    zi_st_close(st);
    zi_train_pos pos;
    if (!config || zi_train_state_load(sl->lora, &pos, config, path)) {
        free(config);
        snprintf(why, sizeof why, "the state does not load: %s", zi_err());
        return why;
    }
    free(config);
    /* the checkpoints due at the state's position were all written before it */
    int64_t s = *at = pos.sample, due = 0;
    for (int k = 0; k < 2; k++) {
        if (k == 0 && (s % r->save_steps == 0 || s == r->total))
            snprintf(path, sizeof path, "%s/step-%lld.safetensors", out, (long long)s);
        else if (k == 1 && s % r->per_epoch == 0)
            snprintf(path, sizeof path, "%s/epoch-%lld.safetensors", out, (long long)(s / r->per_epoch - 1));
        else continue;
        due++;
        if (!same_weights(path, sl->lora)) {
            snprintf(why, sizeof why, "the state at sample %lld does not match %s", (long long)s, path);
            return why;
        }
    }
    if (!due) { snprintf(why, sizeof why, "a state at sample %lld, where nothing is saved", (long long)s); return why; }
    return NULL;
}

/* 1 when the files a and b hold the same bytes */
static int same_bytes(const char *a, const char *b) {
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int same = fa && fb;
    while (same) {
        int ca = getc(fa), cb = getc(fb);
        same = ca == cb;
        if (ca == EOF) break;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return same;
}

/* One kill: after delay_ms, or as soon as a temporary starting with tmp_prefix shows up in
 * OUTPUT/tmp_dir (with every write slowed down by 40 ms, so that the kill lands inside it). */
typedef struct {
    int delay_ms;
    const char *tmp_dir, *tmp_prefix;   /* tmp_dir: "" for OUTPUT, "cache" */
} kill_at;

/* Runs one round; returns 1 when train was killed, 0 when it exited by itself first. */
static int round_once(const char *data, const char *out, const char *log, const kill_at *k) {
    char state[700], dir[700];
    snprintf(state, sizeof state, "%s/training-state.safetensors", out);
    snprintf(dir, sizeof dir, "%s/%s", out, k->tmp_dir ? k->tmp_dir : "");
    pid_t pid = start_train(data, out, file_exists(state), k->tmp_prefix ? 40 : 0, log);
    int status, exited = 0;
    if (k->tmp_prefix) {
        /* poll every 0.2 ms, for at most 20 s */
        for (int i = 0; i < 100000 && !exited && !has_tmp(dir, k->tmp_prefix); i++) {
            usleep(200);
            exited = waitpid(pid, &status, WNOHANG) == pid;
        }
    } else {
        usleep((useconds_t)k->delay_ms * 1000);
    }
    if (!exited) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
    }
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
}

TEST(train_crash_resume) {
    char data[600], ref[600], out[600], log[700], a[900], b[900], sh[4096];
    snprintf(data, sizeof data, "%s/crash-data", zt_tmpdir());
    snprintf(ref, sizeof ref, "%s/crash-ref", zt_tmpdir());
    snprintf(out, sizeof out, "%s/crash-out", zt_tmpdir());
    snprintf(log, sizeof log, "%s/crash.log", zt_tmpdir());
    CHECK(write_dataset(data) == 0, "could not write the dataset in %s", data);

    /* the uninterrupted run, timed to spread the random kills over it */
    double t0 = zi_now();
    int status;
    waitpid(start_train(data, ref, 0, 0, log), &status, 0);
    double run_s = zi_now() - t0;
    zt_sh(sh, sizeof sh, "cat %s", log);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the uninterrupted run failed:\n%s", sh);

    /* the kills: inside a cache write while encoding, right at the start, inside each kind of
     * checkpoint write, between the checkpoints and the state, and at pseudo-random moments
     * (RND: a delay from a fixed LCG, so that a failure reproduces, over a third of the time the
     * uninterrupted run took for what is left to do) */
#define RND {-1, NULL, NULL}
    kill_at kills[] = {
        {0, "cache", ""}, {0, NULL, NULL}, {0, "", "step-"}, {0, "", "training-state"}, {0, "", "epoch-"},
        {1, NULL, NULL}, {0, "", "training-state"}, RND, RND, RND, RND, RND, RND,
        {0, "", "step-"}, {0, "", "epoch-"}, {0, "", "training-state"}, RND, RND, RND, RND, RND, RND,
    };
#undef RND
    enum { NK = sizeof kills / sizeof kills[0] };
    state_loader sl;
    CHECK(loader_open(&sl) == 0, "%s", zi_err());
    int killed = 0;
    int64_t at = 0;
    uint32_t lcg = 12345;
    char trace[NK * 24] = "";
    for (int i = 0; i < NK; i++) {
        if (kills[i].delay_ms < 0) {
            lcg = lcg * 1664525u + 1013904223u;
            kills[i].delay_ms = (int)((lcg >> 8) % (uint32_t)(run_s * 1000 * (double)(TOTAL - at) / TOTAL / 3 + 1));
        }
        int k = round_once(data, out, log, &kills[i]);
        killed += k;
        const char *why = check_dir(out, &sl, &crash_run, &at);
        snprintf(trace + strlen(trace), sizeof trace - strlen(trace), " %s%lld", k ? "" : "(exited)", (long long)at);
        if (why) {
            loader_close(&sl);
            CHECK(0, "after kill %d (%s%s, %d ms): %s", i, kills[i].tmp_dir ? kills[i].tmp_dir : "",
                  kills[i].tmp_prefix ? kills[i].tmp_prefix : "delay", kills[i].delay_ms, why);
        }
    }
    loader_close(&sl);
    fprintf(stderr, "    %d of %d rounds killed (uninterrupted run %.2f s); the state after each:%s\n", killed, NK,
            run_s, trace);
    CHECK(killed >= NK / 2, "only %d of %d rounds were killed before they finished", killed, NK);

    /* resume to the end; the same files, the same bytes */
    snprintf(a, sizeof a, "%s/training-state.safetensors", out);
    waitpid(start_train(data, out, file_exists(a), 0, log), &status, 0);
    zt_sh(sh, sizeof sh, "tail -5 %s", log);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the last resume failed:\n%s", sh);
    DIR *d = opendir(ref);
    CHECK(d, "%s", ref);
    struct dirent *e;
    int nfiles = 0, ok = 1;
    while ((e = readdir(d))) {
        if (!strstr(e->d_name, ".safetensors")) continue;
        snprintf(a, sizeof a, "%s/%s", ref, e->d_name);
        snprintf(b, sizeof b, "%s/%s", out, e->d_name);
        nfiles++;
        if (!same_bytes(a, b)) { fprintf(stderr, "    %s differs\n", e->d_name); ok = 0; }
    }
    closedir(d);
    CHECK(ok && nfiles == TOTAL / SAVE_STEPS + EPOCHS + 1, "%d files compared; the resumed run differs", nfiles);
    /* every write a kill interrupted was done again, over the same temporary */
    snprintf(a, sizeof a, "%s/cache", out);
    CHECK(!has_tmp(out, "") && !has_tmp(a, ""), "temporaries left in %s", out);
}

/* NULL when zi_train_lora_step refuses a NaN and an infinite gradient, changing nothing;
 * else what went wrong (static buffer). */
static const char *nonfinite_refused(zi_train_lora *t) {
    static char why[300];
    size_t nb = (size_t)t->n_params * sizeof(float);
    float *before = malloc(3 * nb);
    why[0] = 0;
    for (int k = 0; k < 2 && !why[0]; k++) {
        for (int64_t i = 0; i < t->n_params; i++) t->g[i] = 1e-3f * (float)(i % 7);
        if (zi_train_lora_step(t, 1e-3, 0.01)) { snprintf(why, sizeof why, "a good step failed: %s", zi_err()); break; }
        memcpy(before, t->w, nb);
        memcpy((char *)before + nb, t->m, nb);
        memcpy((char *)before + 2 * nb, t->v, nb);
        t->g[t->n_params / 2] = k ? -INFINITY : NAN;
        int rc = zi_train_lora_step(t, 1e-3, 0.01);
        int same = !memcmp(before, t->w, nb) && !memcmp((char *)before + nb, t->m, nb) &&
                   !memcmp((char *)before + 2 * nb, t->v, nb);
        if (rc == 0 || !same || t->step != k + 1 || !strstr(zi_err(), k ? "a gradient is infinite" : "a gradient is NaN"))
            snprintf(why, sizeof why, "a %s gradient: rc %d, step %lld, weights and moments %s, error '%s'",
                     k ? "-inf" : "NaN", rc, (long long)t->step, same ? "unchanged" : "changed", zi_err());
    }
    free(before);
    return why[0] ? why : NULL;
}

/* The optimizer refuses a NaN or an infinite gradient and changes nothing. Then a learning
 * rate far too large makes ./train diverge: at 1e10 the loss of the second sample is NaN; at
 * 1e3 the loss or a gradient of a later step (step 8, seed 0, with this model and data). Either
 * way train stops with one line naming the step, and the last checkpoint and state are those
 * of the step before (nothing saved after it). */
TEST(train_nan_stops) {
    char data[600], out[700], sh[8192], path[900];
    snprintf(data, sizeof data, "%s/nan-data", zt_tmpdir());
    CHECK(write_dataset(data) == 0, "could not write the dataset in %s", data);
    state_loader sl;
    CHECK(loader_open(&sl) == 0, "%s", zi_err());
    const char *refused = nonfinite_refused(sl.lora);
    if (refused) { loader_close(&sl); CHECK(0, "%s", refused); }
    static const struct { const char *lr; int seed; } cases[] = { {"1e10", 5}, {"1e3", 0} };
    for (int k = 0; k < 2; k++) {
        snprintf(out, sizeof out, "%s/nan-%d", zt_tmpdir(), k);
        int rc = zt_sh(sh, sizeof sh, "%s/train " TINY " --dataset-base-path %s --dataset-metadata-path %s/meta.csv "
                       "--output-path %s --lora-rank 4 --dataset-repeat 10 --save-steps 1 --save-dtype f32 --seed %d "
                       "-q --learning-rate %s", zt_bin(), data, data, out, cases[k].seed, cases[k].lr);
        long long step = 0, sample = 0;
        const char *at = strstr(sh, "error: step ");
        int n = at ? sscanf(at, "error: step %lld (sample %lld)", &step, &sample) : 0;
        int what = strstr(sh, "the loss is") || strstr(sh, "a gradient is");
        if (rc != 1 || n != 2 || !what || strchr(sh, '\n') != sh + strlen(sh) - 1 || (k == 0 && sample != 2)) {
            loader_close(&sl);
            CHECK(0, "--learning-rate %s: want exit 1 and one line 'error: step N (sample N): the loss is NaN ...' "
                  "(or 'a gradient is'), sample 2 at 1e10; got %d:\n%s", cases[k].lr, rc, sh);
        }
        /* the state is that of the sample before, and matches its checkpoint */
        int64_t saved;
        const char *why = check_dir(out, &sl, &nan_run, &saved);
        snprintf(path, sizeof path, "%s/step-%lld.safetensors", out, sample);
        int after = file_exists(path);
        if (why || saved != sample - 1 || after) {
            loader_close(&sl);
            CHECK(0, "--learning-rate %s: stopped at sample %lld; state at sample %lld%s%s", cases[k].lr, sample,
                  (long long)saved, after ? ", and the bad sample's checkpoint was written" : "", why ? why : "");
        }
    }
    loader_close(&sl);
}

/* A safetensors write that fails (here the rename: the target is a directory) names the file
 * and leaves no temporary behind (test_image checks the same of the PNG writer). */
TEST(st_write_failure_leaves_no_temporary) {
    char dir[600], target[700];
    snprintf(dir, sizeof dir, "%s/wfail", zt_tmpdir());
    snprintf(target, sizeof target, "%s/out.safetensors", dir);
    CHECK(mkdir(dir, 0777) == 0 && mkdir(target, 0777) == 0, "cannot make %s", target);
    zi_stw *w = zi_stw_new();
    float x[2] = {1, 2};
    zi_stw_add_f32(w, "x", 1, (int64_t[]){2}, x);
    int rc = zi_stw_write(w, target);
    zi_stw_free(w);
    CHECK(rc < 0 && strstr(zi_err(), target) && strstr(zi_err(), "rename"), "rc %d, '%s'", rc, zi_err());
    CHECK(!has_tmp(dir, ""), "a temporary is left in %s", dir);
}
