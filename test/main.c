/* The test runner: runs every registered test (or those whose name contains argv[1]) and
 * ends with the line "N passed, N failed". */
#include "test.h"
#include "../tensor.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <unistd.h>
#include <sys/wait.h>

typedef struct { const char *name; void (*fn)(void); } zt_case;
static zt_case cases[1024];
static int ncases, cur_failed;

void zt_register(const char *name, void (*fn)(void)) {
    if (ncases == (int)(sizeof cases / sizeof cases[0])) { fprintf(stderr, "too many tests\n"); exit(2); }
    cases[ncases++] = (zt_case){ name, fn };
}

void zt_fail(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "    FAIL %s:%d: ", file, line);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    cur_failed = 1;
}

int zt_close(const char *what, const float *got, const float *ref, size_t n, double tol) {
    double maxref = 0, maxerr = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double r = fabs((double)ref[i]), e = fabs((double)got[i] - (double)ref[i]);
        if (r > maxref) maxref = r;
        if (!(e <= maxerr)) { maxerr = e; at = i; }     /* NaN counts as the worst error */
    }
    double rel = maxref > 0 ? maxerr / maxref : maxerr;
    int ok = rel <= tol;
    fprintf(stderr, "    %-28s n=%-8zu max|ref|=%-10.4g max err=%-10.3g rel=%.3g%s\n", what, n, maxref,
            maxerr, rel, ok ? "" : "  <-- over tolerance");
    if (!ok) fprintf(stderr, "    worst at %zu: got %.8g want %.8g\n", at, got[at], ref[at]);
    return ok;
}

const char *zt_golden(const char *name) {
    static char buf[4096];
    snprintf(buf, sizeof buf, "test/golden/%s", name);
    return buf;
}

const char *zt_tmpdir(void) {
    static char dir[256];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/zitest.XXXXXX");
        if (!mkdtemp(dir)) { perror("mkdtemp"); exit(2); }
    }
    return dir;
}

int zt_tensor_file(char *out, size_t cap, const char *dir_in, const char *name) {
    static const char *indexes[] = {"diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"};
    char dir[1024], path[1100];
    snprintf(dir, sizeof dir, "%s", dir_in);    /* out may be dir_in */
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, indexes[i]);
        if (access(path, F_OK)) continue;
        zj *ix = zj_load(path);
        const char *file = zj_str(zj_get(ix, "weight_map"), name, NULL);
        snprintf(out, cap, "%s/%s", dir, file ? file : "(not in the index)");
        zj_free(ix);
        return file ? 0 : -1;
    }
    snprintf(out, cap, "%s/diffusion_pytorch_model.safetensors", dir);
    return 0;
}

const char *zt_bin(void) {
    const char *b = getenv("ZI_BIN");
    return b && *b ? b : ".";
}

int zt_sh(char *out, size_t cap, const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char full[8400];
    snprintf(full, sizeof full, "(%s) 2>&1", cmd);
    FILE *p = popen(full, "r");
    if (!p) return -1;
    size_t len = 0;
    char buf[4096];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, p)) > 0) {
        if (out && len + 1 < cap) {
            size_t c = k < cap - 1 - len ? k : cap - 1 - len;
            memcpy(out + len, buf, c);
            len += c;
        }
    }
    if (out && cap) out[len] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : NULL;
    int passed = 0, failed = 0;
    for (int i = 0; i < ncases; i++) {
        if (filter && !strstr(cases[i].name, filter)) continue;
        fprintf(stderr, "%s\n", cases[i].name);
        cur_failed = 0;
        double t0 = zi_now();
        cases[i].fn();
        fprintf(stderr, "  %s (%.2fs)\n", cur_failed ? "FAILED" : "ok", zi_now() - t0);
        if (cur_failed) failed++; else passed++;
    }
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", zt_tmpdir());
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", zt_tmpdir());
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
