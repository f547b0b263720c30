/* Tests of tokenizer.c: the golden HF cases (raw and chat-templated), a corpus of varied text
 * with ids from HF tokenizers, decoding, invalid UTF-8, load and encode speed. */
#include "test.h"
#include "../zimage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static zi_tokenizer *tok;

static const zi_tokenizer *get_tok(void) {
    if (!tok) {
        double t0 = zi_now();
        tok = zi_tok_load(zt_golden("tiny-zimage"));
        if (tok) fprintf(stderr, "    tokenizer.json loaded in %.3f s\n", zi_now() - t0);
        else fprintf(stderr, "    %s\n", zi_err());
    }
    return tok;
}

/* ids == the JSON array want? Prints the first difference. */
static int same_ids(const char *what, const int32_t *ids, int n, const zj *want) {
    int ok = want && want->type == ZJ_ARR && n == want->n;
    for (int i = 0; ok && i < n; i++) ok = ids[i] == (int32_t)want->kids[i].num;
    if (!ok) {
        fprintf(stderr, "    %s: got %d ids, want %d:", what, n, want ? want->n : -1);
        for (int i = 0; i < n && i < 40; i++) fprintf(stderr, " %d", ids[i]);
        fprintf(stderr, "\n      want:");
        for (int i = 0; want && i < want->n && i < 40; i++) fprintf(stderr, " %d", (int)want->kids[i].num);
        fprintf(stderr, "\n");
    }
    return ok;
}

TEST(tok_golden) {
    const zi_tokenizer *t = get_tok();
    CHECK(t, "load: %s", zi_err());
    zj *cases = zj_load(zt_golden("tokenizer-cases.json"));
    CHECK(cases && cases->type == ZJ_ARR, "tokenizer-cases.json: %s", zi_err());
    int bad = 0;
    for (int i = 0; i < cases->n; i++) {
        const zj *c = &cases->kids[i], *text = zj_get(c, "text");
        int32_t *ids;
        int n = zi_tok_encode(t, text->str, text->len, &ids);
        bad += !same_ids(text->str, ids, n, zj_get(c, "ids"));
        char *chat = zi_tok_chat_text(text->str);
        if (strcmp(chat, zj_str(c, "chat", ""))) { fprintf(stderr, "    chat text of case %d differs\n", i); bad++; }
        free(chat);
        free(ids);
        n = zi_tok_chat(t, text->str, 512, &ids);
        bad += !same_ids("chat", ids, n, zj_get(c, "chat_ids"));
        /* decoding gives the templated text back (NFC-normalized), which encodes the same */
        size_t len;
        char *back = zi_tok_decode(t, ids, n, &len);
        int32_t *again = NULL;
        int n2 = back ? zi_tok_encode(t, back, len, &again) : -1;
        if (n2 != n || memcmp(again, ids, (size_t)n * sizeof *ids)) { fprintf(stderr, "    decode of case %d differs\n", i); bad++; }
        free(back);
        free(again);
        free(ids);
    }
    fprintf(stderr, "    %d golden cases, %d mismatches\n", cases->n, bad);
    zj_free(cases);
    CHECK(bad == 0, "%d mismatches", bad);
}

/* test/tokenizer-corpus.json (tools/gen_tok_corpus.py, ids from tools/tok_corpus_ref.js):
 * encode, decode of the encoding, and decode of arbitrary id lists (invalid UTF-8 included). */
TEST(tok_corpus) {
    const zi_tokenizer *t = get_tok();
    CHECK(t, "load: %s", zi_err());
    zj *corpus = zj_load("test/tokenizer-corpus.json");
    CHECK(corpus, "%s", zi_err());
    const zj *cases = zj_get(corpus, "cases"), *dec = zj_get(corpus, "decode");
    CHECK(cases && dec && cases->n >= 2000, "tokenizer-corpus.json: cases, decode");
    int bad = 0;
    size_t bytes = 0;
    for (int i = 0; i < cases->n; i++) {
        const zj *c = &cases->kids[i], *text = zj_get(c, "text");
        int32_t *ids;
        int n = zi_tok_encode(t, text->str, text->len, &ids);
        bytes += text->len;
        if (!same_ids("corpus", ids, n, zj_get(c, "ids"))) {
            fprintf(stderr, "      case %d\n", i);
            bad++;
        }
        const zj *want = zj_get(c, "decoded");
        if (!want) want = text;
        size_t len;
        char *back = zi_tok_decode(t, ids, n, &len);
        if (!back || len != want->len || memcmp(back, want->str, want->len)) {
            fprintf(stderr, "    decode of corpus case %d differs\n", i);
            bad++;
        }
        free(back);
        free(ids);
    }
    for (int i = 0; i < dec->n; i++) {
        const zj *c = &dec->kids[i], *ids = zj_get(c, "ids"), *text = zj_get(c, "text");
        int32_t v[64];
        for (int k = 0; k < ids->n && k < 64; k++) v[k] = (int32_t)ids->kids[k].num;
        size_t len;
        char *s = zi_tok_decode(t, v, ids->n, &len);
        if (!s || len != text->len || memcmp(s, text->str, text->len)) {
            fprintf(stderr, "    decode case %d differs: got \"%s\" want \"%s\"\n", i, s ? s : zi_err(), text->str);
            bad++;
        }
        free(s);
    }
    fprintf(stderr, "    %d corpus texts (%zu bytes), %d decode cases, %d mismatches\n", cases->n, bytes, dec->n, bad);
    zj_free(corpus);
    CHECK(bad == 0, "%d mismatches", bad);
}
