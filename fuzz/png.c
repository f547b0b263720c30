/* Fuzz target: the PNG decoder (chunks, IHDR, inflate, filters, Adam7, palettes).
 * Every chunk's CRC is recomputed before decoding (on a copy): mutated bytes would almost
 * always fail the CRC check, and the fuzzer would never get past it. */
#include "fuzz.h"
#include "../zimage.h"

#include <string.h>

/* Rewrites the CRC of every complete chunk after the 8-byte signature. */
static void fix_crcs(uint8_t *p, size_t n) {
    for (size_t at = 8; at + 12 <= n;) {
        uint32_t len = (uint32_t)p[at] << 24 | (uint32_t)p[at + 1] << 16 | (uint32_t)p[at + 2] << 8 | p[at + 3];
        if (len > n - at - 12) break;
        uint32_t crc = zi_crc32(0, p + at + 4, 4 + (size_t)len);
        uint8_t *c = p + at + 8 + len;
        c[0] = (uint8_t)(crc >> 24), c[1] = (uint8_t)(crc >> 16), c[2] = (uint8_t)(crc >> 8), c[3] = (uint8_t)crc;
        at += 12 + (size_t)len;
    }
}

FUZZ_TARGET(png) {
    uint8_t *buf = malloc(size ? size : 1);
    memcpy(buf, data, size);
    fix_crcs(buf, size);
    zi_image im = {0};
    int rc = zi_png_decode(buf, size, &im);
    free(buf);
    if (rc) return 0;
    FUZZ_CHECK(im.w > 0 && im.h > 0 && im.c == 3 && im.px);
    unsigned sum = im.px[0] + im.px[(size_t)im.w * im.h * 3 - 1];   /* both ends are ours */
    zi_image_free(&im);
    return (int)(sum & 0);
}
