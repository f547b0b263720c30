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

/* Speed: 1 MB of the corpus' mixed text (every script, code, white space, emoji) in one call. */
TEST(tok_speed) {
    const zi_tokenizer *t = get_tok();
    CHECK(t, "load: %s", zi_err());
    double t0 = zi_now();
    zi_tokenizer *t2 = zi_tok_load(zt_golden("tiny-zimage/tokenizer/tokenizer.json"));
    double load = zi_now() - t0;
    CHECK(t2, "%s", zi_err());
    zi_tok_free(t2);
    zj *corpus = zj_load("test/tokenizer-corpus.json");
    CHECK(corpus, "%s", zi_err());
    const zj *cases = zj_get(corpus, "cases");
    size_t cap = 1 << 20, n = 0;
    char *text = malloc(cap);
    for (int i = 0; n < cap; i = (i + 1) % cases->n) {
        const zj *s = zj_get(&cases->kids[i], "text");
        size_t k = s->len < cap - n ? s->len : cap - n;
        while (k > 0 && ((unsigned char)s->str[k] & 0xC0) == 0x80 && k < s->len) k--;   /* whole characters */
        memcpy(text + n, s->str, k);
        n += k;
        if (k < s->len) break;
    }
    int32_t *ids;
    t0 = zi_now();
    int nids = zi_tok_encode(t, text, n, &ids);
    double enc = zi_now() - t0;
    fprintf(stderr, "    tokenizer speed: load tokenizer.json %.3f s; encode %.2f MB of mixed text "
            "in %.3f s (%.1f MB/s, %d ids)\n", load, n / 1e6, enc, n / 1e6 / enc, nids);
    free(ids);
    free(text);
    zj_free(corpus);
    CHECK(nids > 0, "encode: %s", zi_err());
    CHECK(ZT_SANITIZED || load < 0.5, "load %.3f s > 0.5 s", load);
    CHECK(ZT_SANITIZED || enc < 1.0, "encode %.3f s > 1 s", enc);
}

/* Invalid UTF-8 is an error, never a crash or a guess. */
TEST(tok_invalid_utf8) {
    const zi_tokenizer *t = get_tok();
    CHECK(t, "load: %s", zi_err());
    static const char *bad[] = {
        "\x80", "a\xbf", "\xc0\x80", "\xc1\xbf", "\xe0\x80\x80", "\xed\xa0\x80", "\xf0\x80\x80\x80",
        "\xf4\x90\x80\x80", "\xf5\x80\x80\x80", "\xff", "abc\xe4\xb8", "\xc3", "\xe2\x82", "ok <|im_end|>\xfe",
    };
    for (int i = 0; i < (int)(sizeof bad / sizeof bad[0]); i++) {
        int32_t *ids = (int32_t *)1;
        zi_seterr("none");
        int n = zi_tok_encode(t, bad[i], strlen(bad[i]), &ids);
        CHECK(n == -1 && ids == NULL && strstr(zi_err(), "UTF-8"), "case %d: n=%d err=%s", i, n, zi_err());
    }
    int32_t *ids;
    int n = zi_tok_chat(t, "caf\xe9", 512, &ids);
    CHECK(n == -1 && ids == NULL, "chat with Latin-1 bytes: %d", n);
    /* U+0000 and the largest code point are valid */
    n = zi_tok_encode(t, "a\0b\xf4\x8f\xbf\xbf", 7, &ids);
    CHECK(n > 0, "valid text rejected: %s", zi_err());
    free(ids);
    fprintf(stderr, "    last message: %s\n", zi_err());
}

/* The pipeline keeps at most 512 ids: the start of the templated prompt. */
TEST(tok_chat_truncation) {
    const zi_tokenizer *t = get_tok();
    CHECK(t, "load: %s", zi_err());
    char prompt[8000];
    for (int i = 0; i < 1000; i++) memcpy(prompt + 7 * i, "a cat, ", 7);
    prompt[7000] = 0;
    int32_t *full, *cut;
    char *text = zi_tok_chat_text(prompt);
    int nf = zi_tok_encode(t, text, strlen(text), &full);
    int nc = zi_tok_chat(t, prompt, 512, &cut);
    CHECK(nf > 512 && nc == 512, "full %d, truncated %d", nf, nc);
    CHECK(!memcmp(full, cut, 512 * sizeof *cut), "the truncated ids are not the first 512");
    CHECK(cut[0] == 151644 && cut[1] == 872, "starts with <|im_start|>user");
    free(text);
    free(full);
    free(cut);
    int32_t *ids;
    CHECK(zi_tok_encode(t, "", 0, &ids) == 0 && !ids, "empty text");
    CHECK(zi_tok_n_ids(t) == 151669, "n_ids %d", zi_tok_n_ids(t));
    int32_t unknown[] = { 9707, 151669 };
    CHECK(!zi_tok_decode(t, unknown, 2, NULL) && strstr(zi_err(), "151669"), "unknown id: %s", zi_err());
}

/* Bad files: a message naming the file, no crash. */
TEST(tok_bad_files) {
    CHECK(!zi_tok_load("/nonexistent/tokenizer.json") && strstr(zi_err(), "/nonexistent"), "%s", zi_err());
    static const struct { const char *json, *msg; } cases[] = {
        { "{\"model\": ", "" },
        { "{\"normalizer\": {\"type\": \"NFKC\"}}", "normalizer" },
        { "{\"pre_tokenizer\": {\"type\": \"ByteLevel\"}}", "pre_tokenizer" },
        { "{\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": "
          "{\"Regex\": \"\\\\s+\"}, \"behavior\": \"Isolated\"}, {\"type\": \"ByteLevel\", \"use_regex\": false}]}}",
          "pre_tokenizer" },
    };
    char path[512];
    snprintf(path, sizeof path, "%s/tokenizer.json", zt_tmpdir());
    for (int i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) {
        FILE *f = fopen(path, "w");
        CHECK(f, "write %s", path);
        fputs(cases[i].json, f);
        fclose(f);
        zi_tokenizer *t = zi_tok_load(zt_tmpdir());
        CHECK(!t && strstr(zi_err(), path) && strstr(zi_err(), cases[i].msg), "case %d: %s", i, zi_err());
    }
}

/* Added-token flags (single_word, lstrip, rstrip, normalized), HF's id assignment and "a b"
 * merges, on a tiny tokenizer (tools/tok_flags_ref.js, ids from HF tokenizers). */
TEST(tok_added_flags) {
    zi_tokenizer *t = zi_tok_load("test/tokenizer-flags.json");
    CHECK(t, "%s", zi_err());
    zj *cases = zj_load("test/tokenizer-flags-cases.json");
    CHECK(cases, "%s", zi_err());
    int bad = 0;
    for (int i = 0; i < cases->n; i++) {
        const zj *c = &cases->kids[i], *text = zj_get(c, "text"), *want = zj_get(c, "decoded");
        int32_t *ids;
        int n = zi_tok_encode(t, text->str, text->len, &ids);
        if (!same_ids(text->str, ids, n, zj_get(c, "ids"))) bad++;
        size_t len;
        char *back = zi_tok_decode(t, ids, n, &len);
        if (!back || len != want->len || memcmp(back, want->str, len)) {
            fprintf(stderr, "    decode of \"%s\": \"%s\", want \"%s\"\n", text->str, back, want->str);
            bad++;
        }
        free(back);
        free(ids);
    }
    fprintf(stderr, "    %d cases, %d mismatches\n", cases->n, bad);
    zj_free(cases);
    zi_tok_free(t);
    CHECK(bad == 0, "%d mismatches", bad);
}
