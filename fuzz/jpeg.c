/* Fuzz target: the JPEG decoder (markers, Huffman tables, baseline and progressive scans,
 * restart intervals, sampling factors). */
#include "fuzz.h"
#include "../zimage.h"

FUZZ_TARGET(jpeg) {
    zi_image im = {0};
    if (zi_jpeg_decode(data, size, &im)) return 0;
    FUZZ_CHECK(im.w > 0 && im.h > 0 && im.c == 3 && im.px);
    unsigned sum = im.px[0] + im.px[(size_t)im.w * im.h * 3 - 1];
    zi_image_free(&im);
    return (int)(sum & 0);
}
