/* Fuzz target: zj_parse on arbitrary bytes. An accepted document is walked completely:
 * every string must be NUL-terminated at its length. */
#include "fuzz.h"
#include "../safetensors.h"

#include <string.h>

static int walk(const zj *v, int depth) {
    if (v->type == ZJ_STR && v->str[v->len] != 0) return -1;
    if (v->type == ZJ_OBJ)
        for (int i = 0; i < v->n; i++)
            if (v->keys[i][v->keylens[i]] != 0 ||      /* a key with a \u0000 cannot be looked up */
                (strlen(v->keys[i]) == v->keylens[i] && zj_get(v, v->keys[i]) == NULL)) return -1;
    if (v->type == ZJ_ARR || v->type == ZJ_OBJ)
        for (int i = 0; i < v->n; i++)
            if (walk(&v->kids[i], depth + 1)) return -1;
    return 0;
}

FUZZ_TARGET(json) {
    zj *root = zj_parse((const char *)data, size, "fuzz");
    if (!root) return 0;
    int ok = walk(root, 0) == 0;
    zj_free(root);
    FUZZ_CHECK(ok);
    return 0;
}
