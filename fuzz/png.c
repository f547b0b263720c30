/* Fuzz target: the PNG decoder (chunks, CRCs, IHDR, inflate, filters, Adam7, palettes). */
#include "fuzz.h"
#include "../zimage.h"

FUZZ_TARGET(png) {
    zi_image im = {0};
    if (zi_png_decode(data, size, &im)) return 0;
    FUZZ_CHECK(im.w > 0 && im.h > 0 && im.c == 3 && im.px);
    unsigned sum = im.px[0] + im.px[(size_t)im.w * im.h * 3 - 1];   /* both ends are ours */
    zi_image_free(&im);
    return (int)(sum & 0);
}
