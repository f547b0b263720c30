/* Fuzz target: the Qwen2 tokenizer (the tiny model's real tokenizer.json, loaded once) on
 * arbitrary bytes: encode (invalid UTF-8 must be an error), decode the ids, and the chat
 * template with truncation. $ZI_TOKENIZER overrides the tokenizer path. */
#include "fuzz.h"
#include "../zimage.h"

#include <string.h>

static const zi_tokenizer *tokenizer(void) {
    static zi_tokenizer *tok;
    if (!tok) {
        const char *path = getenv("ZI_TOKENIZER");
        tok = zi_tok_load(path ? path : "test/golden/tiny-zimage/tokenizer");
        if (!tok) { fprintf(stderr, "fuzz: %s\n", zi_err()); abort(); }
    }
    return tok;
}

FUZZ_TARGET(tokenizer) {
    const zi_tokenizer *t = tokenizer();
    int32_t *ids = NULL;
    int n = zi_tok_encode(t, (const char *)data, size, &ids);
    if (n > 0) {
        for (int i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < zi_tok_n_ids(t));
        size_t len;
        char *text = zi_tok_decode(t, ids, n, &len);
        FUZZ_CHECK(text != NULL);
        free(text);
    }
    free(ids);
    /* the chat prompt: a NUL-terminated copy, at most 64 ids */
    char *prompt = malloc(size + 1);
    memcpy(prompt, data, size);
    prompt[size] = 0;
    int32_t *cids = NULL;
    int m = zi_tok_chat(t, prompt, 64, &cids);
    FUZZ_CHECK(m <= 64);
    free(cids);
    free(prompt);
    return 0;
}
