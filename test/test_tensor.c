/* Tests of tensor.c: dtypes, conversions, kernels, GEMM, attention, thread invariance. */
#include "test.h"
#include "../tensor.h"

#include <string.h>

TEST(dtype_names) {
    for (int i = 0; i < ZI_NDTYPES; i++) {
        zi_dtype t;
        CHECK(zi_dtype_parse(zi_dtype_name((zi_dtype)i), &t) == 0 && t == (zi_dtype)i, "dtype %d", i);
    }
    zi_dtype t;
    CHECK(zi_dtype_parse("F31", &t) == -1, "unknown dtype accepted");
}
