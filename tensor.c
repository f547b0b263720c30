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

/* ---------------------------------------------------------------- dtype conversion */
static float bits_to_f32(uint32_t u) { union { uint32_t u; float f; } v = { u }; return v.f; }
static uint32_t f32_to_bits(float f) { union { float f; uint32_t u; } v = { f }; return v.u; }

uint16_t zi_f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)(u >> 16 | 0x40);   /* NaN stays NaN */
    u += 0x7FFF + (u >> 16 & 1);                                            /* nearest, ties to even */
    return (uint16_t)(u >> 16);
}

/* f16: 1 sign, 5 exponent (bias 15), 10 mantissa bits */
float zi_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = h >> 10 & 0x1F, m = h & 0x3FF;
    if (e == 0x1F) return bits_to_f32(sign | 0x7F800000 | m << 13);         /* inf, NaN */
    if (e == 0) {                                                           /* zero, subnormal */
        float v = (float)m * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_to_f32(sign | (e + 112) << 23 | m << 13);
}

uint16_t zi_f32_to_f16(float f) {
    uint32_t u = f32_to_bits(f), sign = u >> 16 & 0x8000, a = u & 0x7FFFFFFF;
    if (a > 0x7F800000) return (uint16_t)(sign | 0x7E00);                   /* NaN */
    if (a >= 0x477FF000) return (uint16_t)(sign | 0x7C00);                  /* rounds past 65504: inf */
    if (a < 0x38800000) {
        /* below the smallest normal (2^-14): a multiple of 2^-24, rounded to nearest even
         * by the float addition itself */
        float v = bits_to_f32(a) + 0.5f;
        return (uint16_t)(sign | (f32_to_bits(v) - f32_to_bits(0.5f)));
    }
    a += ((uint32_t)(15 - 127) << 23) + 0xFFF + (a >> 13 & 1);              /* rebias, round */
    return (uint16_t)(sign | a >> 13);
}

/* fp8 E4M3 ("fn": no infinities, S.1111.111 is NaN, bias 7) */
static float f8e4m3_to_f32(uint8_t b) {
    int e = b >> 3 & 0xF, m = b & 7;
    float v = e == 0xF && m == 7 ? NAN : e == 0 ? m * 0x1p-9f : ldexpf(1.0f + m / 8.0f, e - 7);
    return b & 0x80 ? -v : v;
}

void zi_to_f32(float *dst, const void *src, zi_dtype t, size_t n) {
    switch (t) {
    case ZI_F32: memcpy(dst, src, n * sizeof(float)); break;
    case ZI_F16: for (size_t i = 0; i < n; i++) dst[i] = zi_f16_to_f32(((const uint16_t *)src)[i]); break;
    case ZI_BF16: for (size_t i = 0; i < n; i++) dst[i] = zi_bf16_to_f32(((const uint16_t *)src)[i]); break;
    case ZI_F64: for (size_t i = 0; i < n; i++) dst[i] = (float)((const double *)src)[i]; break;
    case ZI_I64: for (size_t i = 0; i < n; i++) dst[i] = (float)((const int64_t *)src)[i]; break;
    case ZI_I32: for (size_t i = 0; i < n; i++) dst[i] = (float)((const int32_t *)src)[i]; break;
    case ZI_I16: for (size_t i = 0; i < n; i++) dst[i] = ((const int16_t *)src)[i]; break;
    case ZI_I8: for (size_t i = 0; i < n; i++) dst[i] = ((const int8_t *)src)[i]; break;
    case ZI_U8: case ZI_BOOL: for (size_t i = 0; i < n; i++) dst[i] = ((const uint8_t *)src)[i]; break;
    case ZI_F8_E4M3: for (size_t i = 0; i < n; i++) dst[i] = f8e4m3_to_f32(((const uint8_t *)src)[i]); break;
    case ZI_F8_E5M2:    /* the top byte of an f16 */
        for (size_t i = 0; i < n; i++) dst[i] = zi_f16_to_f32((uint16_t)(((const uint8_t *)src)[i] << 8));
        break;
    default: zi_die("zi_to_f32: bad dtype %d", (int)t);
    }
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
