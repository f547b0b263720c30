/* Fuzz target: a .safetensors file (8-byte header length, JSON header, data area) through
 * zi_st_open, which takes a path: the input is written to a temporary file. Every tensor an
 * accepted file exposes must lie inside the file and match its shape and dtype. */
#include "fuzz.h"
#include "../safetensors.h"

FUZZ_TARGET(safetensors) {
    const char *path = fuzz_path("st.safetensors");
    if (fuzz_write(path, data, size)) return 0;
    zi_st *st = zi_st_open(path);
    unlink(path);
    if (!st) return 0;
    unsigned sum = 0;
    for (int i = 0; i < zi_st_count(st); i++) {
        const zi_tensor *t = zi_st_at(st, i);
        FUZZ_CHECK(zi_st_get(st, t->name) == t);
        FUZZ_CHECK(t->nbytes == (size_t)t->numel * zi_dtype_size(t->dtype));
        FUZZ_CHECK(t->nbytes <= size);
        if (t->nbytes)      /* touch both ends: ASan sees a tensor outside the mapping */
            sum += ((const uint8_t *)t->data)[0] + ((const uint8_t *)t->data)[t->nbytes - 1];
    }
    (void)zi_st_meta(st, "format");
    zi_st_close(st);
    return (int)(sum & 0);
}
