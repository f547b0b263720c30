/* mixed_text.h: about `cap` bytes of mixed text (every script, code, white space, emoji) made
 * of the texts of test/tokenizer-corpus.json repeated, cut at a character boundary: the input
 * of the tokenizer's speed measurement (test/test_tok.c and `make bench`). */
#ifndef ZIMAGE_MIXED_TEXT_H
#define ZIMAGE_MIXED_TEXT_H

#include "../zimage.h"

#include <stdlib.h>
#include <string.h>

/* malloc'd text and its length in *n; NULL (error set) when the corpus does not load. */
static inline char *zt_mixed_text(const char *corpus_path, size_t cap, size_t *n) {
    zj *corpus = zj_load(corpus_path);
    const zj *cases = corpus ? zj_get(corpus, "cases") : NULL;
    if (!cases || cases->type != ZJ_ARR || cases->n == 0) {
        if (corpus) zi_seterr("%s: no cases", corpus_path);
        zj_free(corpus);
        return NULL;
    }
    char *text = zi_malloc(cap);
    *n = 0;
    for (int i = 0; *n < cap; i = (i + 1) % cases->n) {
        const zj *s = zj_get(&cases->kids[i], "text");
        size_t k = s->len < cap - *n ? s->len : cap - *n;
        while (k > 0 && ((unsigned char)s->str[k] & 0xC0) == 0x80 && k < s->len) k--;   /* whole characters */
        memcpy(text + *n, s->str, k);
        *n += k;
        if (k < s->len) break;
    }
    zj_free(corpus);
    return text;
}

#endif
