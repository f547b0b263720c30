/* tensor.c: dtypes, errors, the thread pool and the numeric kernels. See tensor.h. */
#include "tensor.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---------------------------------------------------------------- dtypes */
static const struct { const char *name; size_t size; } dtypes[ZI_NDTYPES] = {
    [ZI_F32] = {"F32", 4},  [ZI_F16] = {"F16", 2},  [ZI_BF16] = {"BF16", 2}, [ZI_F64] = {"F64", 8},
    [ZI_I64] = {"I64", 8},  [ZI_I32] = {"I32", 4},  [ZI_I16] = {"I16", 2},   [ZI_I8] = {"I8", 1},
    [ZI_U8] = {"U8", 1},    [ZI_BOOL] = {"BOOL", 1}, [ZI_F8_E4M3] = {"F8_E4M3", 1},
    [ZI_F8_E5M2] = {"F8_E5M2", 1},
};

size_t zi_dtype_size(zi_dtype t) { return (unsigned)t < ZI_NDTYPES ? dtypes[t].size : 0; }
const char *zi_dtype_name(zi_dtype t) { return (unsigned)t < ZI_NDTYPES ? dtypes[t].name : "?"; }

int zi_dtype_parse(const char *s, zi_dtype *out) {
    for (int i = 0; i < ZI_NDTYPES; i++)
        if (!strcmp(s, dtypes[i].name)) { *out = (zi_dtype)i; return 0; }
    return -1;
}

/* ---------------------------------------------------------------- errors and memory */
static _Thread_local char errbuf[1024];

void zi_seterr(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, sizeof errbuf, fmt, ap);
    va_end(ap);
}

const char *zi_err(void) { return errbuf[0] ? errbuf : "unknown error"; }

void zi_die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

void *zi_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) zi_die("out of memory (%zu bytes)", n);
    return p;
}

void *zi_calloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) zi_die("out of memory (%zu x %zu bytes)", n, size);
    return p;
}

void *zi_realloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) zi_die("out of memory (%zu bytes)", n);
    return q;
}

char *zi_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    return memcpy(zi_malloc(n), s, n);
}

double zi_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
