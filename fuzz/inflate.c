/* Fuzz target: zlib inflate on arbitrary bytes (capped at 1 MiB of output), and the
 * compressor's round trip on the same bytes: inflate(deflate(x)) must give x back. */
#include "fuzz.h"
#include "../zimage.h"

#include <string.h>

FUZZ_TARGET(inflate) {
    uint8_t *out;
    size_t n;
    if (zi_zlib_decompress(data, size, 1 << 20, &out, &n) == 0) {
        FUZZ_CHECK(n <= 1 << 20);
        free(out);
    }
    uint8_t *z, *back;
    size_t zn, bn;
    zi_zlib_compress(data, size, &z, &zn);
    int rc = zi_zlib_decompress(z, zn, size, &back, &bn);
    free(z);
    FUZZ_CHECK(rc == 0 && bn == size && (size == 0 || memcmp(back, data, size) == 0));
    free(back);
    return 0;
}
