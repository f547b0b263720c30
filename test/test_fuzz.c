/* test_fuzz.c: replays the fuzz corpora (fuzz/corpus/NAME/: seeds; fuzz/crashes/NAME/: every
 * input that once crashed a parser) through the same targets that `make fuzz` runs under
 * libFuzzer (fuzz/NAME.c, linked into this runner), so found bugs stay fixed. */
#include "test.h"
#include "../fuzz/fuzz.h"
#include "../tensor.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct { const char *name; zi_fuzz_fn fn; } targets[32];
static int ntargets;

void zi_fuzz_register(const char *name, zi_fuzz_fn fn) {
    if (ntargets == 32) { fprintf(stderr, "test_fuzz: too many fuzz targets\n"); abort(); }
    targets[ntargets].name = name;
    targets[ntargets++].fn = fn;
}

/* Reads a whole file (malloc'd, at least 1 byte allocated); NULL when unreadable. */
static uint8_t *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096;
    uint8_t *buf = zi_malloc(cap);
    *n = 0;
    for (size_t k; (k = fread(buf + *n, 1, cap - *n, f)) > 0;)
        if ((*n += k) == cap) buf = zi_realloc(buf, cap *= 2);
    fclose(f);
    return buf;
}

/* Runs every file of fuzz/KIND/NAME/ through fn: the number run, or -1 (with the file named)
 * when the target reported a broken invariant. */
static int replay_dir(const char *kind, const char *name, zi_fuzz_fn fn, char *failed, size_t cap) {
    char dir[256];
    snprintf(dir, sizeof dir, "fuzz/%s/%s", kind, name);
    DIR *d = opendir(dir);
    if (!d) return 0;
    int count = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        char path[512];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        size_t n;
        uint8_t *buf = read_all(path, &n);
        if (!buf) continue;
        int rc = fn(buf, n);
        free(buf);
        if (rc) { snprintf(failed, cap, "%s", path); count = -1; break; }
        count++;
    }
    closedir(d);
    return count;
}

TEST(fuzz_replay) {
    CHECK(ntargets >= 7, "only %d fuzz targets registered", ntargets);
    for (int i = 0; i < ntargets; i++) {
        char failed[512] = "";
        int seeds = replay_dir("corpus", targets[i].name, targets[i].fn, failed, sizeof failed);
        int crashes = seeds < 0 ? 0 : replay_dir("crashes", targets[i].name, targets[i].fn, failed, sizeof failed);
        CHECK(seeds >= 0 && crashes >= 0, "fuzz target %s fails on %s", targets[i].name, failed);
        CHECK(seeds > 0, "fuzz target %s has no seed corpus in fuzz/corpus/%s", targets[i].name, targets[i].name);
        fprintf(stderr, "    %-12s %3d seeds, %3d past crashes: ok\n", targets[i].name, seeds, crashes);
    }
}
