/* test.h: the test framework. Each test file defines its tests with TEST(name) { ... };
 * they register themselves at start-up, so adding a file to test/ adds its tests.
 *
 *   TEST(gemm_bf16) {
 *       CHECK(x == 3, "x is %d", x);            // on failure: report and leave the test
 *       CHECK_CLOSE("out", got, ref, n, 1e-4);   // max|got-ref| / max|ref| <= tol
 *   }
 */
#ifndef ZIMAGE_TEST_H
#define ZIMAGE_TEST_H

#include <stddef.h>
#include <stdint.h>

#include "../zimage.h"

void zt_register(const char *name, void (*fn)(void));
void zt_fail(const char *file, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Max abs error relative to the reference's largest magnitude; prints both, returns 1 when
 * within tol. */
int zt_close(const char *what, const float *got, const float *ref, size_t n, double tol);
/* "test/golden/NAME" (static buffer, valid until the next call). */
const char *zt_golden(const char *name);
/* A scratch directory private to this run (created on first use). */
const char *zt_tmpdir(void);
/* Runs a shell command; its stdout+stderr (up to cap bytes, NUL-terminated) go to out when
 * out is not NULL. Returns the exit status (or -1 when it did not exit normally). */
int zt_sh(char *out, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Directory of the built programs (sample, train): $ZI_BIN, default ".". */
const char *zt_bin(void);
/* "DIR/FILE" into out: the file of checkpoint directory dir that holds tensor name, the one
 * its index names (diffusers' or transformers' index file), else the directory's single
 * diffusers file. 0, or -1 when the index does not name it. out may be dir. */
int zt_tensor_file(char *out, size_t cap, const char *dir, const char *name);
/* The DiT's transformer blocks: noise and context refiners, then the main layers. The oracle's
 * LoRAs and train's default targets put an adapter on 7 Linears of each (to_q, to_k, to_v,
 * to_out.0, w1, w2, w3). */
static inline int zt_dit_blocks(const zi_dit_cfg *c) { return 2 * c->n_refiner_layers + c->n_layers; }

#define TEST(name) \
    static void name(void); \
    __attribute__((constructor)) static void name##_register(void) { zt_register(#name, name); } \
    static void name(void)

#define CHECK(cond, ...) \
    do { if (!(cond)) { zt_fail(__FILE__, __LINE__, __VA_ARGS__); return; } } while (0)
#define CHECK_CLOSE(what, got, ref, n, tol) \
    CHECK(zt_close(what, got, ref, n, tol), "%s differs from the reference", what)

#endif
