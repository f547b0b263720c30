/* fuzz.h: one fuzz target per file in fuzz/. Each file defines its target with
 *
 *   FUZZ_TARGET(json) { ... parse data[0..size) ...; return 0; }
 *
 * Built with -DZI_LIBFUZZER (`make fuzz`, clang -fsanitize=fuzzer) the body becomes
 * LLVMFuzzerTestOneInput. Built into the test runner (the default) it registers itself, and
 * test/test_fuzz.c replays every file of fuzz/corpus/NAME/ and fuzz/crashes/NAME/ through
 * it, so an input that once crashed a parser stays a test.
 *
 * A target only has to survive its input: the parsers must reject bad bytes with an error
 * rather than crash, leak or read out of bounds (the sanitizers see to the last two).
 * FUZZ_CHECK states what must hold for an input that was accepted. */
#ifndef ZIMAGE_FUZZ_H
#define ZIMAGE_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

typedef int (*zi_fuzz_fn)(const uint8_t *data, size_t size);

#ifdef ZI_LIBFUZZER
#define FUZZ_TARGET(name) \
    static int name##_target(const uint8_t *data, size_t size); \
    int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size); \
    int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { name##_target(data, size); return 0; } \
    static int name##_target(const uint8_t *data, size_t size)
/* a broken invariant is a finding: abort, and libFuzzer keeps the input */
#define FUZZ_FAIL() abort()
#else
void zi_fuzz_register(const char *name, zi_fuzz_fn fn);
#define FUZZ_TARGET(name) \
    static int name##_target(const uint8_t *data, size_t size); \
    __attribute__((constructor)) static void name##_fuzz_register(void) { zi_fuzz_register(#name, name##_target); } \
    static int name##_target(const uint8_t *data, size_t size)
#define FUZZ_FAIL() return -1
#endif

#define FUZZ_CHECK(cond) \
    do { if (!(cond)) { fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed\n", __FILE__, __LINE__, #cond); FUZZ_FAIL(); } } while (0)

/* A file name of this process for inputs the API takes as a path: $TMPDIR (or /tmp)/zi-fuzz-PID-TAG,
 * in a static buffer. */
static inline const char *fuzz_path(const char *tag) {
    static char buf[512];
    const char *dir = getenv("TMPDIR");
    snprintf(buf, sizeof buf, "%s/zi-fuzz-%d-%s", dir && *dir ? dir : "/tmp", (int)getpid(), tag);
    return buf;
}

/* Writes data[0..size) to path; 0 or -1. */
static inline int fuzz_write(const char *path, const void *data, size_t size) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int bad = size && fwrite(data, 1, size, f) != size;
    return fclose(f) || bad ? -1 : 0;
}

#endif
