/* Fuzz target: the training metadata reader (zi_train_meta_parse). The first byte picks the
 * format (the reader goes by the file name): CSV, JSON (an array of objects) or JSONL. */
#include "fuzz.h"
#include "../zimage.h"

#include <string.h>

FUZZ_TARGET(meta) {
    if (size < 1) return 0;
    static const char *const names[3] = {"fuzz.csv", "fuzz.json", "fuzz.jsonl"};
    zi_train_meta m;
    if (zi_train_meta_parse((const char *)data + 1, size - 1, names[data[0] % 3], &m)) return 0;
    FUZZ_CHECK(m.n > 0);
    for (int i = 0; i < m.n; i++) {
        FUZZ_CHECK(m.items[i].image && m.items[i].prompt);
        (void)strlen(m.items[i].image);
        (void)strlen(m.items[i].prompt);
    }
    zi_train_meta_free(&m);
    return 0;
}
