/* image.c: everything image and compression, written from the specifications:
 *   - CRC-32 (PNG), Adler-32 (zlib);
 *   - deflate (RFC 1951: LZ77 over a hash chain, dynamic/fixed/stored blocks) and inflate,
 *     wrapped as zlib streams (RFC 1950);
 *   - PNG writer (per-row filter choice, tEXt/iTXt, atomic rename) and reader (every colour
 *     type and bit depth, Adam7, CRCs checked);
 *   - JPEG decoder (baseline and progressive Huffman), bit-exact with libjpeg's defaults
 *     (islow IDCT, "fancy" upsampling, its YCbCr tables), which is what PIL uses;
 *   - the conversions the pipeline needs, and DiffSynth's training resize (PIL's antialiased
 *     bilinear filter followed by torchvision's centre crop).
 * Every decoder checks every length and index against its input: a corrupt or truncated file
 * returns -1 with a message, never reads or writes out of bounds. */
#include "zimage.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ================================================================ checksums */

/* CRC-32 of the reflected polynomial 0xEDB88320, a byte at a time through a table built once */
static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

uint32_t zi_crc32(uint32_t crc, const void *buf, size_t n) {
    pthread_once(&crc_once, crc_table_init);
    const uint8_t *p = buf;
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = crc_table[(crc ^ p[i]) & 255] ^ (crc >> 8);
    return ~crc;
}

uint32_t zi_adler32(uint32_t adler, const void *buf, size_t n) {
    const uint8_t *p = buf;
    uint32_t a = adler & 0xffff, b = adler >> 16;
    while (n > 0) {
        size_t k = n < 5552 ? n : 5552;     /* largest run whose sums cannot overflow 32 bits */
        n -= k;
        while (k--) { a += *p++; b += a; }
        a %= 65521;
        b %= 65521;
    }
    return b << 16 | a;
}

/* ================================================================ deflate tables (RFC 1951 §3.2.5) */

static const uint16_t len_base[29] = { 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31,
                                       35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258 };
static const uint8_t len_extra[29] = { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2,
                                       3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0 };
static const uint16_t dist_base[30] = { 1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193,
                                        257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145,
                                        8193, 12289, 16385, 24577 };
static const uint8_t dist_extra[30] = { 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6,
                                        7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13 };
/* order in which the code-length code lengths are transmitted */
static const uint8_t clen_order[19] = { 16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15 };

/* the fixed Huffman code lengths (BTYPE 01) */
static void fixed_lengths(uint8_t *lit /* [288] */, uint8_t *dist /* [30] */) {
    for (int i = 0; i < 288; i++) lit[i] = i < 144 ? 8 : i < 256 ? 9 : i < 280 ? 7 : 8;
    for (int i = 0; i < 30; i++) dist[i] = 5;
}

/* ================================================================ deflate */

/* a growable byte buffer */
typedef struct { uint8_t *p; size_t n, cap; } zbuf;

static void zb_reserve(zbuf *b, size_t more) {
    if (b->n + more <= b->cap) return;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->n + more) cap *= 2;
    b->p = zi_realloc(b->p, cap);
    b->cap = cap;
}

static void zb_put(zbuf *b, const void *src, size_t n) {
    if (n == 0) return;                         /* src may be NULL then */
    zb_reserve(b, n);
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void zb_be32(zbuf *b, uint32_t v) {
    uint8_t q[4] = { (uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v };
    zb_put(b, q, 4);
}

/* LSB-first bit writer on top of a zbuf */
typedef struct { zbuf *out; uint64_t acc; int nbits; } bitw;

static void bw_put(bitw *w, uint32_t bits, int n) {
    w->acc |= (uint64_t)bits << w->nbits;
    w->nbits += n;
    while (w->nbits >= 8) {
        uint8_t byte = (uint8_t)w->acc;
        zb_put(w->out, &byte, 1);
        w->acc >>= 8;
        w->nbits -= 8;
    }
}

static void bw_align(bitw *w) {
    if (w->nbits > 0) bw_put(w, 0, 8 - w->nbits);
}

/* Huffman code lengths for freq[0..n), none longer than `limit`. Plain Huffman (two-queue
 * merge over the sorted leaves); when the tree is too deep the frequencies are halved and
 * it is rebuilt, which flattens it (converges: equal frequencies give a balanced tree).
 * At least two symbols always get a code, so the code is complete (some inflaters reject
 * a lone one-bit code). */
static void huff_lengths(const uint32_t *freq_in, int n, int limit, uint8_t *len) {
    uint32_t freq[288];
    int sym[288];
    memcpy(freq, freq_in, n * sizeof *freq);
    int m = 0;
    for (int i = 0; i < n; i++) if (freq[i]) m++;
    for (int i = 0; m < 2 && i < n; i++) if (!freq[i]) { freq[i] = 1; m++; }
    for (;;) {
        m = 0;
        for (int i = 0; i < n; i++) if (freq[i]) sym[m++] = i;
        /* insertion sort of the leaves by frequency (n <= 288) */
        for (int i = 1; i < m; i++) {
            int s = sym[i], j = i;
            while (j > 0 && freq[sym[j - 1]] > freq[s]) { sym[j] = sym[j - 1]; j--; }
            sym[j] = s;
        }
        /* nodes 0..m-1 are the sorted leaves, m..2m-2 the internal nodes in creation order
         * (their weights are nondecreasing, so two queues give the two smallest) */
        uint64_t wt[2 * 288];
        int parent[2 * 288];
        for (int i = 0; i < m; i++) wt[i] = freq[sym[i]];
        int leaf = 0, node = m;
        for (int k = m; k < 2 * m - 1; k++) {
            int pick[2];
            for (int t = 0; t < 2; t++) {
                if (leaf < m && (node >= k || wt[leaf] <= wt[node])) pick[t] = leaf++;
                else pick[t] = node++;
            }
            wt[k] = wt[pick[0]] + wt[pick[1]];
            parent[pick[0]] = parent[pick[1]] = k;
        }
        int depth[2 * 288], maxd = 0;
        depth[2 * m - 2] = 0;
        for (int k = 2 * m - 3; k >= 0; k--) depth[k] = depth[parent[k]] + 1;
        for (int i = 0; i < m; i++) if (depth[i] > maxd) maxd = depth[i];
        if (maxd <= limit) {
            memset(len, 0, n);
            for (int i = 0; i < m; i++) len[sym[i]] = (uint8_t)depth[i];
            return;
        }
        for (int i = 0; i < n; i++) if (freq[i]) freq[i] = (freq[i] + 1) / 2;
    }
}

/* canonical codes (RFC 1951 §3.2.2), bit-reversed for the LSB-first writer */
static void huff_codes(const uint8_t *len, int n, uint16_t *code) {
    int count[16] = { 0 }, next[16];
    for (int i = 0; i < n; i++) count[len[i]]++;
    count[0] = 0;
    int c = 0;
    for (int b = 1; b < 16; b++) { c = (c + count[b - 1]) << 1; next[b] = c; }
    for (int i = 0; i < n; i++) {
        if (!len[i]) continue;
        int v = next[len[i]]++, r = 0;
        for (int b = 0; b < len[i]; b++) r |= ((v >> b) & 1) << (len[i] - 1 - b);
        code[i] = (uint16_t)r;
    }
}

/* One LZ77 token: a literal (dist = 0, lit = byte) or a match (len 3..258, dist 1..32768). */
typedef struct { uint16_t lit_or_len, dist; } ztok;

static int len_code(int len) {          /* 257..285 */
    int c = 0;
    while (c < 28 && len_base[c + 1] <= len) c++;
    return 257 + c;
}

static int dist_code(int dist) {        /* 0..29 */
    int c = 0;
    while (c < 29 && dist_base[c + 1] <= dist) c++;
    return c;
}

/* The code-length sequence of a dynamic header, run-length coded with symbols 16 (repeat
 * previous 3-6), 17 (zeros 3-10), 18 (zeros 11-138). rle[i] = symbol | extra << 8. */
static int rle_lengths(const uint8_t *lens, int n, uint16_t *rle) {
    int k = 0;
    for (int i = 0; i < n;) {
        int run = 1;
        while (i + run < n && lens[i + run] == lens[i]) run++;
        if (lens[i] == 0 && run >= 3) {
            int r = run > 138 ? 138 : run;
            rle[k++] = r <= 10 ? (uint16_t)(17 | (r - 3) << 8) : (uint16_t)(18 | (r - 11) << 8);
            i += r;
        } else if (lens[i] != 0 && run >= 4) {
            rle[k++] = lens[i++];                       /* the value once, then repeats */
            int r = run - 1 > 6 ? 6 : run - 1;
            rle[k++] = (uint16_t)(16 | (r - 3) << 8);
            i += r;
        } else {
            rle[k++] = lens[i++];
        }
    }
    return k;
}

static const uint8_t rle_extra_bits[19] = { [16] = 2, [17] = 3, [18] = 7 };

/* bits needed to code the tokens with the given lengths (excluding any header) */
static uint64_t tokens_cost(const uint32_t *lf, const uint32_t *df, const uint8_t *ll, const uint8_t *dl) {
    uint64_t bits = 0;
    for (int i = 0; i < 286; i++) bits += (uint64_t)lf[i] * (ll[i] + (i >= 257 ? len_extra[i - 257] : 0));
    for (int i = 0; i < 30; i++) bits += (uint64_t)df[i] * (dl[i] + dist_extra[i]);
    return bits;
}

static void put_tokens(bitw *w, const ztok *tok, int ntok, const uint8_t *ll, const uint8_t *dl) {
    uint16_t lc[288], dc[30];
    huff_codes(ll, 288, lc);
    huff_codes(dl, 30, dc);
    for (int i = 0; i < ntok; i++) {
        if (!tok[i].dist) { bw_put(w, lc[tok[i].lit_or_len], ll[tok[i].lit_or_len]); continue; }
        int len = tok[i].lit_or_len, d = tok[i].dist;
        int c = len_code(len), e = dist_code(d);
        bw_put(w, lc[c], ll[c]);
        bw_put(w, (uint32_t)(len - len_base[c - 257]), len_extra[c - 257]);
        bw_put(w, dc[e], dl[e]);
        bw_put(w, (uint32_t)(d - dist_base[e]), dist_extra[e]);
    }
    bw_put(w, lc[256], ll[256]);
}

/* Writes one block holding tok[0..ntok), which encode src[0..nsrc): stored, fixed or dynamic,
 * whichever is smallest. */
static void put_block(bitw *w, const ztok *tok, int ntok, const uint8_t *src, size_t nsrc, int final) {
    uint32_t lf[288] = { 0 }, df[30] = { 0 };
    for (int i = 0; i < ntok; i++) {
        if (!tok[i].dist) lf[tok[i].lit_or_len]++;
        else { lf[len_code(tok[i].lit_or_len)]++; df[dist_code(tok[i].dist)]++; }
    }
    lf[256] = 1;

    /* dynamic: code lengths, then the header that transmits them */
    uint8_t dll[288] = { 0 }, ddl[30] = { 0 };
    huff_lengths(lf, 286, 15, dll);
    huff_lengths(df, 30, 15, ddl);
    int hlit = 286, hdist = 30;
    while (hlit > 257 && !dll[hlit - 1]) hlit--;
    while (hdist > 1 && !ddl[hdist - 1]) hdist--;
    uint8_t all[286 + 30];
    memcpy(all, dll, hlit);
    memcpy(all + hlit, ddl, hdist);
    uint16_t rle[286 + 30];
    int nrle = rle_lengths(all, hlit + hdist, rle);
    uint32_t cf[19] = { 0 };
    for (int i = 0; i < nrle; i++) cf[rle[i] & 31]++;
    uint8_t cl[19];
    huff_lengths(cf, 19, 7, cl);
    int hclen = 19;
    while (hclen > 4 && !cl[clen_order[hclen - 1]]) hclen--;
    uint64_t dyn = 3 + 5 + 5 + 4 + 3 * hclen;
    for (int i = 0; i < 19; i++) dyn += (uint64_t)cf[i] * (cl[i] + rle_extra_bits[i]);
    dyn += tokens_cost(lf, df, dll, ddl);

    uint8_t fll[288], fdl[30];
    fixed_lengths(fll, fdl);
    uint64_t fix = 3 + tokens_cost(lf, df, fll, fdl);

    /* stored: 3 header bits, alignment, then LEN/NLEN + bytes per 65535-byte piece */
    uint64_t sto = 3 + 7 + (nsrc / 65535 + 1) * 32 + nsrc * 8;

    if (sto < dyn && sto < fix) {
        size_t off = 0;
        do {
            size_t k = nsrc - off < 65535 ? nsrc - off : 65535;
            int last = off + k == nsrc;
            bw_put(w, (uint32_t)(final && last), 1);
            bw_put(w, 0, 2);
            bw_align(w);
            bw_put(w, (uint32_t)k, 16);
            bw_put(w, (uint32_t)(~k & 0xffff), 16);
            zb_put(w->out, src + off, k);
            off += k;
        } while (off < nsrc);
    } else if (fix <= dyn) {
        bw_put(w, (uint32_t)final, 1);
        bw_put(w, 1, 2);
        put_tokens(w, tok, ntok, fll, fdl);
    } else {
        bw_put(w, (uint32_t)final, 1);
        bw_put(w, 2, 2);
        bw_put(w, (uint32_t)(hlit - 257), 5);
        bw_put(w, (uint32_t)(hdist - 1), 5);
        bw_put(w, (uint32_t)(hclen - 4), 4);
        for (int i = 0; i < hclen; i++) bw_put(w, cl[clen_order[i]], 3);
        uint16_t cc[19];
        huff_codes(cl, 19, cc);
        for (int i = 0; i < nrle; i++) {
            int s = rle[i] & 31;
            bw_put(w, cc[s], cl[s]);
            if (rle_extra_bits[s]) bw_put(w, rle[i] >> 8, rle_extra_bits[s]);
        }
        put_tokens(w, tok, ntok, dll, ddl);
    }
}

/* LZ77 parameters: the usual 32 KiB window, 3-byte hashes, bounded chain walks with one-step
 * lazy matching (a match is deferred when the next position has a longer one). */
enum { WSIZE = 32768, HBITS = 15, MAX_CHAIN = 128, NICE_LEN = 128, BLOCK_TOKENS = 1 << 16 };

typedef struct {
    const uint8_t *src;
    size_t n;
    int min_len;                /* shorter matches are coded as literals */
    int64_t head[1 << HBITS];   /* most recent position + 1 with each hash (0: none) */
    int64_t prev[WSIZE];        /* previous position + 1 with the same hash, by pos % WSIZE */
} lz77;

static uint32_t hash3(const uint8_t *p) {
    return ((uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2]) * 2654435761u >> (32 - HBITS);
}

static void lz_insert(lz77 *z, size_t pos) {
    if (pos + 3 > z->n) return;
    uint32_t h = hash3(z->src + pos);
    z->prev[pos % WSIZE] = z->head[h];
    z->head[h] = (int64_t)pos + 1;
}

/* longest earlier match at pos (length 0 when shorter than 3) */
static int lz_match(const lz77 *z, size_t pos, int *dist) {
    if (pos + 3 > z->n) return 0;
    size_t maxlen = z->n - pos < 258 ? z->n - pos : 258;
    int best = 0, chain = MAX_CHAIN;
    int64_t cand = z->head[hash3(z->src + pos)];
    while (cand > 0 && chain-- > 0) {
        size_t c = (size_t)cand - 1;
        if (pos - c > WSIZE) break;
        size_t l = 0;
        while (l < maxlen && z->src[c + l] == z->src[pos + l]) l++;
        if ((int)l > best) {
            best = (int)l;
            *dist = (int)(pos - c);
            if (l >= NICE_LEN || l == maxlen) break;
        }
        int64_t nxt = z->prev[c % WSIZE];
        if (nxt >= cand) break;     /* that slot was overwritten by a newer position */
        cand = nxt;
    }
    if (best == 3 && *dist > 4096) return 0;    /* zlib's TOO_FAR: costs more than 3 literals */
    return best >= z->min_len ? best : 0;
}

/* raw deflate stream of src[0..n) appended to out */
static void deflate_raw(const uint8_t *src, size_t n, int min_len, zbuf *out) {
    lz77 *z = zi_calloc(1, sizeof *z);
    z->src = src;
    z->n = n;
    z->min_len = min_len;
    ztok *tok = zi_malloc(BLOCK_TOKENS * sizeof *tok);
    bitw w = { out, 0, 0 };
    int ntok = 0;
    size_t block_start = 0, pos = 0;
    int dist = 0;
    int len = lz_match(z, 0, &dist);
    while (pos < n) {
        /* len/dist: the match at pos (already searched) */
        lz_insert(z, pos);
        int dist2 = 0, len2 = len && len < NICE_LEN ? lz_match(z, pos + 1, &dist2) : 0;
        if (len && len2 <= len) {
            tok[ntok++] = (ztok){ (uint16_t)len, (uint16_t)dist };
            for (int k = 1; k < len; k++) lz_insert(z, pos + k);
            pos += len;
            len = lz_match(z, pos, &dist);
        } else {
            tok[ntok++] = (ztok){ src[pos], 0 };
            pos++;
            if (len) { len = len2; dist = dist2; }      /* the deferred, longer match */
            else len = lz_match(z, pos, &dist);
        }
        if (ntok == BLOCK_TOKENS) {
            put_block(&w, tok, ntok, src + block_start, pos - block_start, pos == n);
            block_start = pos;
            ntok = 0;
        }
    }
    if (ntok || n == 0) put_block(&w, tok, ntok, src + block_start, pos - block_start, 1);
    bw_align(&w);
    free(tok);
    free(z);
}

static void zlib_compress(const uint8_t *src, size_t n, int min_len, uint8_t **out, size_t *out_n) {
    zbuf b = { 0 };
    /* CMF 0x78: deflate, 32 KiB window; FLG 0x9C: default level, check bits (0x789C % 31 == 0) */
    zb_put(&b, "\x78\x9c", 2);
    deflate_raw(src, n, min_len, &b);
    zb_be32(&b, zi_adler32(1, src, n));
    *out = b.p;
    *out_n = b.n;
}

void zi_zlib_compress(const uint8_t *src, size_t n, uint8_t **out, size_t *out_n) {
    zlib_compress(src, n, 3, out, out_n);
}

/* ================================================================ inflate */

/* LSB-first bit reader. Past the end it reads zeros and counts them; the caller checks
 * `overrun` so a truncated stream is an error, never an out-of-bounds read. */
typedef struct {
    const uint8_t *p;
    size_t n, pos;
    uint64_t acc;
    int nbits;
    size_t overrun;
} bitr;

static void br_fill(bitr *r) {
    while (r->nbits <= 56) {
        uint64_t byte = 0;
        if (r->pos < r->n) byte = r->p[r->pos++];
        else r->overrun++;
        r->acc |= byte << r->nbits;
        r->nbits += 8;
    }
}

static uint32_t br_get(bitr *r, int n) {      /* n <= 32 */
    if (n == 0) return 0;
    if (r->nbits < n) br_fill(r);
    uint32_t v = (uint32_t)(r->acc & ((1ull << n) - 1));
    r->acc >>= n;
    r->nbits -= n;
    return v;
}

/* true when more bits were consumed than the input held */
static int br_overrun(const bitr *r) { return (uint64_t)r->overrun * 8 > (uint64_t)r->nbits; }

/* Decoding table: indexed by the next `bits` input bits (LSB first), entry = symbol << 4 |
 * code length; 0 for bit patterns that start no code (an incomplete code). */
typedef struct { uint16_t *t; int bits; } htab;

static int htab_build(htab *h, const uint8_t *len, int n) {
    int count[16] = { 0 }, maxlen = 0;
    for (int i = 0; i < n; i++) {
        count[len[i]]++;
        if (len[i] > maxlen) maxlen = len[i];
    }
    count[0] = 0;
    int left = 1;                               /* Kraft: reject over-subscribed codes */
    for (int b = 1; b < 16; b++) {
        left = (left << 1) - count[b];
        if (left < 0) return -1;
    }
    h->bits = maxlen ? maxlen : 1;
    h->t = zi_calloc((size_t)1 << h->bits, sizeof *h->t);
    uint16_t code[288];
    huff_codes(len, n, code);
    for (int i = 0; i < n; i++) {
        if (!len[i]) continue;
        for (uint32_t r = code[i]; r < (1u << h->bits); r += 1u << len[i])
            h->t[r] = (uint16_t)(i << 4 | len[i]);
    }
    return 0;
}

static int htab_decode(bitr *r, const htab *h) {
    if (r->nbits < h->bits) br_fill(r);
    uint16_t e = h->t[r->acc & ((1u << h->bits) - 1)];
    if (!e) return -1;
    r->acc >>= e & 15;
    r->nbits -= e & 15;
    return e >> 4;
}

/* Reads the code lengths of a dynamic block header into lit/dist tables. */
static int read_dynamic_header(bitr *r, htab *lit, htab *dist) {
    int hlit = (int)br_get(r, 5) + 257, hdist = (int)br_get(r, 5) + 1, hclen = (int)br_get(r, 4) + 4;
    if (hlit > 286 || hdist > 30) return -1;
    uint8_t cl[19] = { 0 };
    for (int i = 0; i < hclen; i++) cl[clen_order[i]] = (uint8_t)br_get(r, 3);
    htab ch;
    if (htab_build(&ch, cl, 19)) return -1;
    uint8_t lens[286 + 30];
    int k = 0, rc = 0;
    while (k < hlit + hdist) {
        int s = htab_decode(r, &ch);
        if (s < 0 || br_overrun(r)) { rc = -1; break; }
        if (s < 16) { lens[k++] = (uint8_t)s; continue; }
        int rep, val = 0;
        if (s == 16) {
            if (k == 0) { rc = -1; break; }
            val = lens[k - 1];
            rep = 3 + (int)br_get(r, 2);
        } else if (s == 17) rep = 3 + (int)br_get(r, 3);
        else rep = 11 + (int)br_get(r, 7);
        if (k + rep > hlit + hdist) { rc = -1; break; }
        while (rep--) lens[k++] = (uint8_t)val;
    }
    free(ch.t);
    if (rc || lens[256] == 0) return -1;        /* no end-of-block code: the block cannot end */
    if (htab_build(lit, lens, hlit)) return -1;
    if (htab_build(dist, lens + hlit, hdist)) { free(lit->t); return -1; }
    return 0;
}

/* Decodes one Huffman-coded block's symbols into out. */
static int inflate_codes(bitr *r, const htab *lit, const htab *dist, zbuf *out, size_t max_out) {
    for (;;) {
        int s = htab_decode(r, lit);
        if (s < 0 || br_overrun(r)) return -1;
        if (s < 256) {
            if (out->n >= max_out) return -1;
            zb_reserve(out, 1);
            out->p[out->n++] = (uint8_t)s;
            continue;
        }
        if (s == 256) return 0;
        s -= 257;
        if (s >= 29) return -1;
        size_t len = len_base[s] + br_get(r, len_extra[s]);
        int d = htab_decode(r, dist);
        if (d < 0 || d >= 30) return -1;
        size_t dd = dist_base[d] + br_get(r, dist_extra[d]);
        if (br_overrun(r) || dd > out->n || len > max_out - out->n) return -1;
        zb_reserve(out, len);
        uint8_t *q = out->p + out->n;
        for (size_t i = 0; i < len; i++) q[i] = q[(ptrdiff_t)i - (ptrdiff_t)dd];   /* may overlap */
        out->n += len;
    }
}

/* raw deflate stream at r -> out (at most max_out bytes) */
static int inflate_raw(bitr *r, zbuf *out, size_t max_out) {
    int final;
    do {
        final = (int)br_get(r, 1);
        int type = (int)br_get(r, 2);
        if (br_overrun(r)) return -1;
        if (type == 0) {
            /* drop the bits to the byte boundary, then LEN, NLEN, raw bytes */
            br_get(r, r->nbits & 7);
            uint32_t len = br_get(r, 16), nlen = br_get(r, 16);
            if (br_overrun(r) || (len ^ 0xffff) != nlen || len > max_out - out->n) return -1;
            zb_reserve(out, len);
            /* bytes still in the bit buffer come first, then straight from the input */
            while (len && r->nbits >= 8) { out->p[out->n++] = (uint8_t)br_get(r, 8); len--; }
            if (br_overrun(r) || len > r->n - r->pos) return -1;
            if (len) memcpy(out->p + out->n, r->p + r->pos, len);
            out->n += len;
            r->pos += len;
        } else if (type == 1) {
            uint8_t ll[288], dl[30];
            fixed_lengths(ll, dl);
            htab lit, dist;
            htab_build(&lit, ll, 288);
            htab_build(&dist, dl, 30);
            int rc = inflate_codes(r, &lit, &dist, out, max_out);
            free(lit.t);
            free(dist.t);
            if (rc) return -1;
        } else if (type == 2) {
            htab lit, dist;
            if (read_dynamic_header(r, &lit, &dist)) return -1;
            int rc = inflate_codes(r, &lit, &dist, out, max_out);
            free(lit.t);
            free(dist.t);
            if (rc) return -1;
        } else {
            return -1;
        }
    } while (!final);
    return 0;
}

int zi_zlib_decompress(const uint8_t *src, size_t n, size_t max_out, uint8_t **out, size_t *out_n) {
    *out = NULL;
    *out_n = 0;
    if (n < 2 || (src[0] & 15) != 8 || (src[0] >> 4) > 7 || ((src[0] << 8) | src[1]) % 31 || (src[1] & 32)) {
        zi_seterr("zlib: bad stream header");
        return -1;
    }
    bitr r = { .p = src + 2, .n = n - 2 };
    zbuf b = { 0 };
    if (inflate_raw(&r, &b, max_out) || br_overrun(&r)) {
        free(b.p);
        zi_seterr("zlib: corrupt or truncated deflate data");
        return -1;
    }
    /* the Adler-32 follows the last (partly) used byte; anything after it is ignored */
    size_t used = (8 * (r.pos + r.overrun) - (size_t)r.nbits + 7) / 8;
    if (used + 4 > r.n) {
        free(b.p);
        zi_seterr("zlib: truncated stream (no Adler-32)");
        return -1;
    }
    const uint8_t *a = r.p + used;
    uint32_t want = (uint32_t)a[0] << 24 | (uint32_t)a[1] << 16 | (uint32_t)a[2] << 8 | a[3];
    if (zi_adler32(1, b.p, b.n) != want) {
        free(b.p);
        zi_seterr("zlib: Adler-32 mismatch");
        return -1;
    }
    *out = b.p ? b.p : zi_malloc(1);
    *out_n = b.n;
    return 0;
}

/* ================================================================ PNG */

static const uint8_t png_sig[8] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n' };

void zi_image_free(zi_image *im) {
    free(im->px);
    im->px = NULL;
    im->w = im->h = im->c = 0;
}

static void png_chunk(zbuf *b, const char *type, const void *data, size_t n) {
    zb_be32(b, (uint32_t)n);
    size_t start = b->n;
    zb_put(b, type, 4);
    zb_put(b, data, n);
    zb_be32(b, zi_crc32(0, b->p + start, n + 4));
}

static int paeth(int a, int b, int c) {     /* a = left, b = up, c = up-left */
    int p = a + b - c, pa = abs(p - a), pb = abs(p - b), pc = abs(p - c);
    return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

/* Filters one row with filter type f: out[i] = cur[i] - predictor. bpp = bytes per pixel;
 * prev is the previous unfiltered row (zeros above the first row). */
static void png_filter_row(int f, const uint8_t *cur, const uint8_t *prev, size_t n, int bpp, uint8_t *out) {
    for (size_t i = 0; i < n; i++) {
        int a = i >= (size_t)bpp ? cur[i - bpp] : 0, b = prev[i], c = i >= (size_t)bpp ? prev[i - bpp] : 0;
        int pred = f == 0 ? 0 : f == 1 ? a : f == 2 ? b : f == 3 ? (a + b) / 2 : paeth(a, b, c);
        out[i] = (uint8_t)(cur[i] - pred);
    }
}

/* The filtered scanlines of an 8-bit image (filter byte + row each). Per row the filter with
 * the smallest sum of |filtered bytes as signed values| is chosen (libpng's heuristic): it
 * favours rows of small residuals, which deflate codes compactly. */
static uint8_t *png_filter_image(const uint8_t *px, int w, int h, int c, size_t *n_out) {
    size_t row = (size_t)w * c;
    uint8_t *out = zi_malloc((row + 1) * h), *trial = zi_malloc(row), *zero = zi_calloc(row, 1);
    for (int y = 0; y < h; y++) {
        const uint8_t *cur = px + row * y, *prev = y ? cur - row : zero;
        uint8_t *dst = out + (row + 1) * y;
        uint64_t best = UINT64_MAX;
        for (int f = 0; f < 5; f++) {
            png_filter_row(f, cur, prev, row, c, trial);
            uint64_t sum = 0;
            for (size_t i = 0; i < row; i++) sum += (uint64_t)abs((int8_t)trial[i]);
            if (sum < best) {
                best = sum;
                dst[0] = (uint8_t)f;
                memcpy(dst + 1, trial, row);
            }
        }
    }
    free(trial);
    free(zero);
    *n_out = (row + 1) * h;
    return out;
}

/* tEXt when the value is Latin-1/ASCII, else iTXt (UTF-8), as PIL's PngInfo.add_text does */
static int png_text_chunk(zbuf *b, const char *key, const char *val) {
    size_t kn = strlen(key), vn = strlen(val);
    if (kn < 1 || kn > 79) {
        zi_seterr("PNG text key \"%s\" must have 1 to 79 characters", key);
        return -1;
    }
    int ascii = 1;
    for (size_t i = 0; i < vn; i++) if ((uint8_t)val[i] >= 0x80) ascii = 0;
    zbuf d = { 0 };
    zb_put(&d, key, kn + 1);                    /* keyword and its NUL separator */
    if (!ascii) zb_put(&d, "\0\0\0", 4);        /* not compressed, method 0, no language, no translated key */
    zb_put(&d, val, vn);
    png_chunk(b, ascii ? "tEXt" : "iTXt", d.p, d.n);
    free(d.p);
    return 0;
}

/* Writes buf to path through a temporary file in the same directory, fsync'd, then renamed
 * over path: readers never see a half-written file, and a failure leaves no output. */
static int write_atomic(const char *path, const uint8_t *buf, size_t n) {
    static atomic_uint counter;
    size_t plen = strlen(path) + 32;
    char *tmp = zi_malloc(plen);
    int fd = -1;
    for (int tries = 0; fd < 0 && tries < 100; tries++) {
        snprintf(tmp, plen, "%s.tmp%d.%u", path, (int)getpid(), atomic_fetch_add(&counter, 1));
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0666);
        if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0) {
        zi_seterr("%s: cannot create: %s", path, strerror(errno));
        free(tmp);
        return -1;
    }
    const char *what = NULL;
    for (size_t off = 0; off < n && !what;) {
        ssize_t k = write(fd, buf + off, n - off);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) what = "write";
        else off += (size_t)k;
    }
    if (!what && fsync(fd)) what = "fsync";
    if (close(fd) && !what) what = "close";
    if (!what && rename(tmp, path)) what = "rename";
    if (what) {
        zi_seterr("%s: %s failed: %s", path, what, strerror(errno));
        unlink(tmp);
        free(tmp);
        return -1;
    }
    free(tmp);
    return 0;
}

int zi_png_write_image(const char *path, const zi_image *im, const char *const *text_kv, int n_kv) {
    static const uint8_t color_type[5] = { [1] = 0, [3] = 2, [4] = 6 };
    if (im->w <= 0 || im->h <= 0 || (im->c != 1 && im->c != 3 && im->c != 4) ||
        (uint64_t)im->w * im->c > 0x7fffffffu / 2) {
        zi_seterr("%s: cannot write a %dx%dx%d image as PNG", path, im->w, im->h, im->c);
        return -1;
    }
    zbuf b = { 0 };
    zb_put(&b, png_sig, 8);
    uint8_t ihdr[13] = { (uint8_t)(im->w >> 24), (uint8_t)(im->w >> 16), (uint8_t)(im->w >> 8), (uint8_t)im->w,
                         (uint8_t)(im->h >> 24), (uint8_t)(im->h >> 16), (uint8_t)(im->h >> 8), (uint8_t)im->h,
                         8, color_type[im->c], 0, 0, 0 };
    png_chunk(&b, "IHDR", ihdr, 13);
    for (int i = 0; i < n_kv; i++) {
        if (png_text_chunk(&b, text_kv[2 * i], text_kv[2 * i + 1])) {
            free(b.p);
            return -1;
        }
    }
    size_t nraw, nz;
    uint8_t *raw = png_filter_image(im->px, im->w, im->h, im->c, &nraw), *z;
    /* filtered rows are small residuals where 3-5 byte matches are mostly coincidences that
     * cost more bits than the literals (zlib's Z_FILTERED makes the same choice) */
    zlib_compress(raw, nraw, 6, &z, &nz);
    free(raw);
    enum { IDAT_MAX = 1 << 16 };                /* split the stream into IDATs of 64 KiB */
    for (size_t off = 0; off < nz; off += IDAT_MAX)
        png_chunk(&b, "IDAT", z + off, nz - off < IDAT_MAX ? nz - off : IDAT_MAX);
    free(z);
    png_chunk(&b, "IEND", NULL, 0);
    int rc = write_atomic(path, b.p, b.n);
    free(b.p);
    return rc;
}

int zi_png_write(const char *path, const uint8_t *rgb, int w, int h, const char *const *text_kv, int n_kv) {
    zi_image im = { w, h, 3, (uint8_t *)rgb };
    return zi_png_write_image(path, &im, text_kv, n_kv);
}

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Reverses the filter of one scanline in place (prev: the previous unfiltered row). */
static int png_unfilter_row(int f, uint8_t *cur, const uint8_t *prev, size_t n, int bpp) {
    if (f > 4) return -1;
    for (size_t i = 0; i < n; i++) {
        int a = i >= (size_t)bpp ? cur[i - bpp] : 0, b = prev[i], c = i >= (size_t)bpp ? prev[i - bpp] : 0;
        int pred = f == 0 ? 0 : f == 1 ? a : f == 2 ? b : f == 3 ? (a + b) / 2 : paeth(a, b, c);
        cur[i] = (uint8_t)(cur[i] + pred);
    }
    return 0;
}

typedef struct {
    int w, h, depth, ctype, interlace, channels;
    uint8_t pal[256][3];
    int npal;
} png_hdr;

/* Sample i of an unfiltered row, as 8 bits, the way PIL unpacks it: sub-byte gray values
 * scaled by replication ("L;2"/"L;4": v·85, v·17; 1-bit: v·255), palette indices as they
 * are, 16-bit samples by their high byte, except 16-bit gray: PIL opens it as a 32-bit
 * integer image (mode "I") whose convert("RGB") clips the value to 255 -- a quirk we keep
 * so that training images match DiffSynth's. */
static int png_sample(const png_hdr *ph, const uint8_t *row, size_t i) {
    int d = ph->depth;
    if (d == 8) return row[i];
    if (d == 16 && ph->ctype == 0) return row[2 * i] ? 255 : row[2 * i + 1];
    if (d == 16) return row[2 * i];
    size_t bit = i * d;
    int v = (row[bit / 8] >> (8 - d - bit % 8)) & ((1 << d) - 1);
    return ph->ctype == 3 ? v : v * (255 / ((1 << d) - 1));
}

/* Converts one unfiltered row of pass pixels to RGB, as PIL's convert("RGB") does: alpha is
 * dropped without compositing, tRNS is ignored, gray is replicated. */
static void png_row_to_rgb(const png_hdr *ph, const uint8_t *row, int n, uint8_t *const *dst) {
    for (int x = 0; x < n; x++) {
        uint8_t *o = dst[x];
        size_t s = (size_t)x * ph->channels;
        if (ph->ctype == 3) {
            int v = png_sample(ph, row, s);
            if (v < ph->npal) memcpy(o, ph->pal[v], 3);
            else o[0] = o[1] = o[2] = 0;        /* out-of-range index: black, as PIL */
        } else if (ph->ctype == 0 || ph->ctype == 4) {
            o[0] = o[1] = o[2] = (uint8_t)png_sample(ph, row, s);
        } else {
            for (int k = 0; k < 3; k++) o[k] = (uint8_t)png_sample(ph, row, s + k);
        }
    }
}

static int png_parse_ihdr(png_hdr *ph, const uint8_t *d, uint32_t len) {
    if (len != 13) return -1;
    uint32_t w = be32(d), h = be32(d + 4);
    ph->depth = d[8];
    ph->ctype = d[9];
    ph->interlace = d[12];
    if (w == 0 || h == 0 || w > (1u << 24) || h > (1u << 24) || (uint64_t)w * h > (1ull << 28)) return -1;
    ph->w = (int)w;
    ph->h = (int)h;
    int dp = ph->depth;
    int ok_depth = ph->ctype == 0 ? (dp == 1 || dp == 2 || dp == 4 || dp == 8 || dp == 16)
                 : ph->ctype == 3 ? (dp == 1 || dp == 2 || dp == 4 || dp == 8)
                 : (ph->ctype == 2 || ph->ctype == 4 || ph->ctype == 6) && (dp == 8 || dp == 16);
    if (!ok_depth || d[10] != 0 || d[11] != 0 || ph->interlace > 1) return -1;
    static const int chans[7] = { 1, 0, 3, 1, 2, 0, 4 };
    ph->channels = chans[ph->ctype];
    return 0;
}

/* Adam7: pass origins and steps; a non-interlaced image is one pass (0, 0, 1, 1). */
static const uint8_t adam7[7][4] = { { 0, 0, 8, 8 }, { 4, 0, 8, 8 }, { 0, 4, 4, 8 }, { 2, 0, 4, 4 },
                                     { 0, 2, 2, 4 }, { 1, 0, 2, 2 }, { 0, 1, 1, 2 } };

static void png_pass_size(const png_hdr *ph, int p, int *pw, int *ph_) {
    if (!ph->interlace) { *pw = ph->w; *ph_ = ph->h; return; }
    *pw = (ph->w - adam7[p][0] + adam7[p][2] - 1) / adam7[p][2];
    *ph_ = (ph->h - adam7[p][1] + adam7[p][3] - 1) / adam7[p][3];
    if (*pw < 0) *pw = 0;
    if (*ph_ < 0) *ph_ = 0;
}

/* unfilters the decompressed scanlines and scatters the pixels of every pass into out */
static int png_reconstruct(const png_hdr *ph, uint8_t *raw, zi_image *out) {
    int npass = ph->interlace ? 7 : 1, bpp = (ph->channels * ph->depth + 7) / 8;
    uint8_t **dst = zi_malloc(sizeof *dst * ph->w);
    uint8_t *zero = zi_calloc((size_t)ph->w * 8 + 1, 1);
    int rc = 0;
    for (int p = 0; p < npass && !rc; p++) {
        int pw, phh;
        png_pass_size(ph, p, &pw, &phh);
        if (!pw || !phh) continue;
        int x0 = ph->interlace ? adam7[p][0] : 0, y0 = ph->interlace ? adam7[p][1] : 0;
        int dx = ph->interlace ? adam7[p][2] : 1, dy = ph->interlace ? adam7[p][3] : 1;
        size_t rowb = ((size_t)pw * ph->channels * ph->depth + 7) / 8;
        const uint8_t *prev = zero;
        for (int y = 0; y < phh; y++) {
            uint8_t *line = raw + 1;
            if (png_unfilter_row(raw[0], line, prev, rowb, bpp)) { rc = -1; break; }
            for (int x = 0; x < pw; x++)
                dst[x] = out->px + ((size_t)(y0 + y * dy) * ph->w + x0 + (size_t)x * dx) * 3;
            png_row_to_rgb(ph, line, pw, dst);
            prev = line;
            raw += rowb + 1;
        }
    }
    free(dst);
    free(zero);
    return rc;
}

int zi_png_decode(const uint8_t *buf, size_t n, zi_image *out) {
    memset(out, 0, sizeof *out);
    if (n < 8 || memcmp(buf, png_sig, 8)) { zi_seterr("not a PNG file"); return -1; }
    png_hdr ph = { 0 };
    zbuf idat = { 0 };
    const char *err = NULL;
    int seen_ihdr = 0, seen_iend = 0;
    for (size_t pos = 8; !seen_iend && !err;) {
        if (n - pos < 12) { err = "truncated (no IEND chunk)"; break; }
        uint32_t len = be32(buf + pos);
        const uint8_t *type = buf + pos + 4, *data = buf + pos + 8;
        if (len > n - pos - 12) { err = "truncated chunk"; break; }
        if (zi_crc32(0, type, len + 4) != be32(data + len)) { err = "chunk CRC mismatch"; break; }
        pos += 12 + (size_t)len;
        if (!seen_ihdr && memcmp(type, "IHDR", 4)) err = "first chunk is not IHDR";
        else if (!memcmp(type, "IHDR", 4)) {
            if (seen_ihdr || png_parse_ihdr(&ph, data, len)) err = "bad IHDR";
            seen_ihdr = 1;
        } else if (!memcmp(type, "PLTE", 4)) {
            if (len % 3 || len > 768 || len == 0) err = "bad PLTE";
            else { ph.npal = (int)len / 3; memcpy(ph.pal, data, len); }
        } else if (!memcmp(type, "IDAT", 4)) zb_put(&idat, data, len);
        else if (!memcmp(type, "IEND", 4)) seen_iend = 1;
        else if (!(type[0] & 32)) err = "unknown critical chunk";
        /* ancillary chunks (tRNS, gAMA, text, ...) do not change the RGB values PIL returns */
    }
    if (!err && ph.ctype == 3 && !ph.npal) err = "palette image without PLTE";
    size_t expect = 0;
    for (int p = 0; !err && p < (ph.interlace ? 7 : 1); p++) {
        int pw, phh;
        png_pass_size(&ph, p, &pw, &phh);
        if (pw && phh) expect += (size_t)phh * (((size_t)pw * ph.channels * ph.depth + 7) / 8 + 1);
    }
    uint8_t *raw = NULL;
    size_t nraw = 0;
    char zerr[256];
    if (!err && zi_zlib_decompress(idat.p, idat.n, expect, &raw, &nraw)) {
        snprintf(zerr, sizeof zerr, "corrupt image data (%s)", zi_err());
        err = zerr;
    } else if (!err && nraw != expect) err = "image data too short";
    free(idat.p);
    if (!err) {
        out->w = ph.w;
        out->h = ph.h;
        out->c = 3;
        out->px = zi_malloc((size_t)ph.w * ph.h * 3);
        if (png_reconstruct(&ph, raw, out)) { err = "bad filter type"; zi_image_free(out); }
    }
    free(raw);
    if (err) { zi_seterr("PNG: %s", err); return -1; }
    return 0;
}

/* ================================================================ JPEG
 * Baseline and progressive Huffman JPEG (ITU T.81), 8-bit, gray or three components, any
 * integral sampling factors. Reproduces libjpeg(-turbo) with its default settings (PIL's
 * decoder): the "islow" integer IDCT (jidctint.c), "fancy" triangular upsampling for 2x1,
 * 1x2 and 2x2 subsampled chroma (jdsample.c, box replication otherwise), its fixed-point
 * YCbCr->RGB tables (jdcolor.c) and its colour-space guess. All coefficients are decoded
 * first, then transformed: one code path for baseline and progressive files. EXIF
 * orientation is not applied (PIL's Image.open does not either). */

/* zigzag position -> natural (row-major) index; 16 extra entries absorb the run lengths of
 * corrupt blocks that run past 63, as libjpeg's table does */
static const uint8_t jpeg_natural[64 + 16] = {
    0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,  12, 19, 26, 33, 40, 48,
    41, 34, 27, 20, 13, 6,  7,  14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23,
    30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
    63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63 };

typedef struct {
    uint16_t lut[1 << 16];      /* next 16 bits (MSB first) -> length << 8 | value; 0: no code */
    int defined;
} jhuff;

typedef struct {
    int id, h, v, tq;           /* component id, sampling factors, quantisation table */
    int cw, ch;                 /* size in samples: ceil(W·h/hmax) x ceil(H·v/vmax) */
    int bw, bh;                 /* blocks per row / column, padded to whole MCUs */
    int16_t *coef;              /* [bh][bw][64], natural order, not dequantised */
    uint16_t q[64];             /* quantisation table latched at the component's first scan */
    int q_latched;
    int dc_pred, td, ta;        /* scan state: DC predictor, DC/AC table numbers */
    uint8_t *plane;             /* [bh·8][bw·8] samples after the IDCT */
} jcomp;

typedef struct {
    const uint8_t *p;
    size_t n, pos;
    /* entropy-coded data reader: bits MSB-aligned in acc; `pad` zero bytes were fed in place
     * of a marker or the end of the data */
    uint64_t acc;
    int nbits;
    size_t pad;
    /* frame */
    int w, h, ncomp, progressive, hmax, vmax, mcux, mcuy, restart;
    int jfif, adobe, adobe_transform;
    jcomp comp[3];
    uint16_t qt[4][64];
    int qt_defined[4];
    jhuff huff[8];              /* 0-3: DC tables, 4-7: AC tables */
    int eobrun;
    const char *err;
} jdec;

static void jb_fill(jdec *d) {
    while (d->nbits <= 56) {
        uint64_t byte = 0;
        if (d->pos < d->n && d->p[d->pos] != 0xFF) byte = d->p[d->pos++];
        else if (d->pos + 1 < d->n && d->p[d->pos] == 0xFF && d->p[d->pos + 1] == 0) { byte = 0xFF; d->pos += 2; }
        else d->pad++;          /* a marker or the end: feed zeros, stay put */
        d->acc |= byte << (56 - d->nbits);
        d->nbits += 8;
    }
}

static int jb_bits(jdec *d, int n) {      /* n in 1..16 */
    if (d->nbits < n) jb_fill(d);
    int v = (int)(d->acc >> (64 - n));
    d->acc <<= n;
    d->nbits -= n;
    return v;
}

/* F.2.2.1 EXTEND: an n-bit magnitude category value to a signed coefficient */
static int jb_receive_extend(jdec *d, int n) {
    if (n == 0) return 0;
    if (n > 16) { d->err = "bad coefficient size"; return 0; }
    int v = jb_bits(d, n);
    return v < (1 << (n - 1)) ? v - (1 << n) + 1 : v;
}

static int jb_huff(jdec *d, const jhuff *t) {
    if (d->nbits < 16) jb_fill(d);
    uint16_t e = t->lut[d->acc >> 48];
    if (!e) { d->err = "bad Huffman code"; return 0; }
    d->acc <<= e >> 8;
    d->nbits -= e >> 8;
    return e & 255;
}

static int jb_overrun(const jdec *d) { return (uint64_t)d->pad * 8 > (uint64_t)d->nbits; }

/* Skips entropy-coded bytes up to the next marker; returns its code (0: end of data). */
static int jpeg_next_marker(jdec *d) {
    d->acc = 0;
    d->nbits = 0;
    d->pad = 0;
    while (d->pos + 1 < d->n) {
        if (d->p[d->pos] != 0xFF || d->p[d->pos + 1] == 0) { d->pos++; continue; }
        if (d->p[d->pos + 1] == 0xFF) { d->pos++; continue; }   /* fill byte */
        d->pos += 2;
        return d->p[d->pos - 1];
    }
    d->pos = d->n;
    return 0;
}

static void jpeg_dqt(jdec *d, const uint8_t *s, size_t len) {
    while (len > 0 && !d->err) {
        int pq = s[0] >> 4, tq = s[0] & 15;
        size_t need = 1 + 64 * (pq ? 2 : 1);
        if (pq > 1 || tq > 3 || len < need) { d->err = "bad DQT"; return; }
        for (int k = 0; k < 64; k++)
            d->qt[tq][jpeg_natural[k]] = pq ? (uint16_t)(s[1 + 2 * k] << 8 | s[2 + 2 * k]) : s[1 + k];
        d->qt_defined[tq] = 1;
        s += need;
        len -= need;
    }
}

static void jpeg_dht(jdec *d, const uint8_t *s, size_t len) {
    while (len > 0 && !d->err) {
        int tc = s[0] >> 4, th = s[0] & 15, total = 0;
        if (tc > 1 || th > 3 || len < 17) { d->err = "bad DHT"; return; }
        for (int l = 1; l <= 16; l++) total += s[l];
        if (total > 256 || len < 17 + (size_t)total) { d->err = "bad DHT"; return; }
        jhuff *t = &d->huff[tc * 4 + th];
        memset(t->lut, 0, sizeof t->lut);
        /* canonical codes (C.2): consecutive values per length, doubling between lengths */
        const uint8_t *val = s + 17;
        uint32_t code = 0;
        for (int l = 1, k = 0; l <= 16; l++, code <<= 1) {
            for (int i = 0; i < s[l]; i++, k++, code++) {
                if (code >= (1u << l)) { d->err = "bad DHT (too many codes)"; return; }
                uint32_t lo = code << (16 - l), hi = (code + 1) << (16 - l);
                for (uint32_t e = lo; e < hi; e++) t->lut[e] = (uint16_t)(l << 8 | val[k]);
            }
        }
        t->defined = 1;
        s += 17 + total;
        len -= 17 + (size_t)total;
    }
}

static void jpeg_sof(jdec *d, const uint8_t *s, size_t len, int marker) {
    if (d->ncomp) { d->err = "more than one frame"; return; }
    if (len < 6) { d->err = "bad SOF"; return; }
    if (s[0] != 8) { d->err = "only 8-bit JPEG is supported"; return; }
    d->h = s[1] << 8 | s[2];
    d->w = s[3] << 8 | s[4];
    int nc = s[5];
    d->progressive = marker == 0xC2;
    if (d->w == 0 || d->h == 0) { d->err = "zero image size (DNL is not supported)"; return; }
    if ((uint64_t)d->w * d->h > (1ull << 28)) { d->err = "image too large"; return; }
    if (nc != 1 && nc != 3) { d->err = "only gray and 3-component JPEG are supported"; return; }
    if (len < 6 + 3 * (size_t)nc) { d->err = "bad SOF"; return; }
    d->hmax = d->vmax = 1;
    for (int i = 0; i < nc; i++) {
        jcomp *c = &d->comp[i];
        c->id = s[6 + 3 * i];
        c->h = s[7 + 3 * i] >> 4;
        c->v = s[7 + 3 * i] & 15;
        c->tq = s[8 + 3 * i];
        if (c->h < 1 || c->h > 4 || c->v < 1 || c->v > 4 || c->tq > 3) { d->err = "bad SOF"; return; }
        if (c->h > d->hmax) d->hmax = c->h;
        if (c->v > d->vmax) d->vmax = c->v;
    }
    d->mcux = (d->w + 8 * d->hmax - 1) / (8 * d->hmax);
    d->mcuy = (d->h + 8 * d->vmax - 1) / (8 * d->vmax);
    for (int i = 0; i < nc; i++) {
        jcomp *c = &d->comp[i];
        if (d->hmax % c->h || d->vmax % c->v) { d->err = "fractional sampling factors are not supported"; return; }
        c->cw = (int)(((int64_t)d->w * c->h + d->hmax - 1) / d->hmax);
        c->ch = (int)(((int64_t)d->h * c->v + d->vmax - 1) / d->vmax);
        c->bw = d->mcux * c->h;
        c->bh = d->mcuy * c->v;
        c->coef = zi_calloc((size_t)c->bw * c->bh, 64 * sizeof(int16_t));
    }
    d->ncomp = nc;
}

/* ---- one block of one scan (T.81 F.2.2 baseline, G.1.2 progressive) */

/* DC prediction (F.2.2.1): the decoded difference plus the previous block's DC value */
static int jpeg_dc(jdec *d, jcomp *c) {
    int t = jb_huff(d, &d->huff[c->td]);
    c->dc_pred += jb_receive_extend(d, t);
    if (c->dc_pred < -32768 || c->dc_pred > 32767) {    /* only corrupt data gets here */
        d->err = "bad DC coefficient";
        c->dc_pred = 0;
    }
    return c->dc_pred;
}

static void jpeg_block_baseline(jdec *d, jcomp *c, int16_t *blk) {
    blk[0] = (int16_t)jpeg_dc(d, c);
    for (int k = 1; k < 64 && !d->err;) {
        int rs = jb_huff(d, &d->huff[4 + c->ta]), r = rs >> 4, s = rs & 15;
        if (s) {
            k += r;
            blk[jpeg_natural[k]] = (int16_t)jb_receive_extend(d, s);
            k++;
        } else if (r == 15) {
            k += 16;
        } else {
            break;
        }
    }
}

static void jpeg_block_dc(jdec *d, jcomp *c, int16_t *blk, int ah, int al) {
    if (ah == 0) blk[0] = (int16_t)(jpeg_dc(d, c) * (1 << al));      /* first scan: the top bits */
    else if (jb_bits(d, 1)) blk[0] = (int16_t)(blk[0] | 1 << al);     /* refinement: one more bit */
}

static void jpeg_block_ac_first(jdec *d, jcomp *c, int16_t *blk, int ss, int se, int al) {
    if (d->eobrun > 0) { d->eobrun--; return; }
    for (int k = ss; k <= se && !d->err; k++) {
        int rs = jb_huff(d, &d->huff[4 + c->ta]), r = rs >> 4, s = rs & 15;
        if (s) {
            k += r;
            blk[jpeg_natural[k]] = (int16_t)(jb_receive_extend(d, s) * (1 << al));
        } else if (r == 15) {
            k += 15;
        } else {
            d->eobrun = (1 << r) - 1;
            if (r) d->eobrun += jb_bits(d, r);
            break;
        }
    }
}

/* successive approximation of AC coefficients (G.1.2.3): one more bit of every nonzero
 * coefficient in the band, and new coefficients of magnitude 1 */
static void jpeg_refine_nonzero(jdec *d, int16_t *coef, int p1) {
    if (jb_bits(d, 1) && (*coef & p1) == 0) *coef = (int16_t)(*coef >= 0 ? *coef + p1 : *coef - p1);
}

static void jpeg_block_ac_refine(jdec *d, jcomp *c, int16_t *blk, int ss, int se, int al) {
    int p1 = 1 << al, k = ss;
    if (d->eobrun == 0) {
        for (; k <= se && !d->err; k++) {
            int rs = jb_huff(d, &d->huff[4 + c->ta]), r = rs >> 4, s = rs & 15;
            if (s) {
                if (s != 1) { d->err = "bad progressive refinement"; return; }
                s = jb_bits(d, 1) ? p1 : -p1;
            } else if (r != 15) {
                d->eobrun = 1 << r;
                if (r) d->eobrun += jb_bits(d, r);
                break;
            }
            /* skip r zero coefficients (refining the nonzero ones passed on the way) */
            for (; k <= se; k++) {
                int16_t *cf = &blk[jpeg_natural[k]];
                if (*cf) jpeg_refine_nonzero(d, cf, p1);
                else if (--r < 0) break;
            }
            if (s) blk[jpeg_natural[k]] = (int16_t)s;
        }
    }
    if (d->eobrun > 0) {
        for (; k <= se; k++) {
            int16_t *cf = &blk[jpeg_natural[k]];
            if (*cf) jpeg_refine_nonzero(d, cf, p1);
        }
        d->eobrun--;
    }
}

/* Restart marker between intervals: resets the predictors and the bit reader. */
static void jpeg_restart(jdec *d, int ns, jcomp **sc) {
    int m = jpeg_next_marker(d);
    if (m < 0xD0 || m > 0xD7) { d->err = "missing restart marker"; return; }
    for (int i = 0; i < ns; i++) sc[i]->dc_pred = 0;
    d->eobrun = 0;
}

static void jpeg_sos(jdec *d, const uint8_t *s, size_t len) {
    if (!d->ncomp) { d->err = "scan before frame header"; return; }
    int ns = len ? s[0] : 0;
    if (ns < 1 || ns > d->ncomp || len != 4 + 2 * (size_t)ns) { d->err = "bad SOS"; return; }
    jcomp *sc[3];
    for (int i = 0; i < ns; i++) {
        int id = s[1 + 2 * i], tables = s[2 + 2 * i];
        sc[i] = NULL;
        for (int k = 0; k < d->ncomp; k++) if (d->comp[k].id == id) sc[i] = &d->comp[k];
        if (!sc[i] || (tables >> 4) > 3 || (tables & 15) > 3) { d->err = "bad SOS"; return; }
        sc[i]->td = tables >> 4;
        sc[i]->ta = tables & 15;
    }
    int ss = s[1 + 2 * ns], se = s[2 + 2 * ns], ah = s[3 + 2 * ns] >> 4, al = s[3 + 2 * ns] & 15;
    if (!d->progressive ? (ss != 0 || se != 63 || ah || al)
                        : (ss == 0 ? se != 0 : (se < ss || se > 63 || ns != 1)) || ah > 13 || al > 13) {
        d->err = "bad scan parameters";
        return;
    }
    for (int i = 0; i < ns; i++) {
        jcomp *c = sc[i];
        if (!c->q_latched) {
            if (!d->qt_defined[c->tq]) { d->err = "missing quantisation table"; return; }
            memcpy(c->q, d->qt[c->tq], sizeof c->q);
            c->q_latched = 1;
        }
        if ((ss == 0 && ah == 0 && !d->huff[c->td].defined) || (se > 0 && !d->huff[4 + c->ta].defined)) {
            d->err = "missing Huffman table";
            return;
        }
        c->dc_pred = 0;
    }
    d->eobrun = 0;
    d->acc = 0;
    d->nbits = 0;
    d->pad = 0;
    /* one component: its own blocks, one per MCU; several: whole interleaved MCUs */
    int units_x = ns == 1 ? (sc[0]->cw + 7) / 8 : d->mcux, units_y = ns == 1 ? (sc[0]->ch + 7) / 8 : d->mcuy;
    int64_t nunits = (int64_t)units_x * units_y;
    for (int64_t u = 0; u < nunits && !d->err; u++) {
        if (d->restart && u > 0 && u % d->restart == 0) {
            jpeg_restart(d, ns, sc);
            if (d->err) return;
        }
        int ux = (int)(u % units_x), uy = (int)(u / units_x);
        for (int i = 0; i < ns; i++) {
            jcomp *c = sc[i];
            int nh = ns == 1 ? 1 : c->h, nv = ns == 1 ? 1 : c->v;
            for (int by = 0; by < nv; by++)
                for (int bx = 0; bx < nh; bx++) {
                    int16_t *blk = c->coef + ((size_t)(uy * nv + by) * c->bw + ux * nh + bx) * 64;
                    if (!d->progressive) jpeg_block_baseline(d, c, blk);
                    else if (ss == 0) jpeg_block_dc(d, c, blk, ah, al);
                    else if (ah == 0) jpeg_block_ac_first(d, c, blk, ss, se, al);
                    else jpeg_block_ac_refine(d, c, blk, ss, se, al);
                }
        }
        if (jb_overrun(d)) d->err = "truncated or corrupt scan data";
    }
}

/* ---- the islow IDCT of libjpeg (jidctint.c, Loeffler-Ligtenberg-Moschytz with 13-bit
 * fixed-point constants, 2 extra bits kept between passes), reproduced exactly. 64-bit
 * arithmetic as libjpeg's JLONG on LP64: no overflow even for corrupt coefficients.
 * (libjpeg's C code wraps outputs outside [-512, 511] through a mask; we clamp. Only
 * corrupt or adversarial data reaches those values.) */
#define FIXC(x) ((int32_t)((x) * 8192 + 0.5))
enum { CONST_BITS = 13, PASS1_BITS = 2 };

/* the even and odd halves shared by both passes: in[0..7] -> out[0..7], unscaled */
static void idct_1d(const int64_t in[8], int64_t out[8]) {
    int64_t z1 = (in[2] + in[6]) * FIXC(0.541196100);
    int64_t tmp2 = z1 - in[6] * FIXC(1.847759065), tmp3 = z1 + in[2] * FIXC(0.765366865);
    int64_t tmp0 = (in[0] + in[4]) * (1 << CONST_BITS), tmp1 = (in[0] - in[4]) * (1 << CONST_BITS);
    int64_t tmp10 = tmp0 + tmp3, tmp13 = tmp0 - tmp3, tmp11 = tmp1 + tmp2, tmp12 = tmp1 - tmp2;

    int64_t o0 = in[7], o1 = in[5], o2 = in[3], o3 = in[1];
    int64_t z5 = (o0 + o2 + o1 + o3) * FIXC(1.175875602);
    int64_t y1 = (o0 + o3) * -FIXC(0.899976223), y2 = (o1 + o2) * -FIXC(2.562915447);
    int64_t y3 = (o0 + o2) * -FIXC(1.961570560) + z5, y4 = (o1 + o3) * -FIXC(0.390180644) + z5;
    o0 = o0 * FIXC(0.298631336) + y1 + y3;
    o1 = o1 * FIXC(2.053119869) + y2 + y4;
    o2 = o2 * FIXC(3.072711026) + y2 + y3;
    o3 = o3 * FIXC(1.501321110) + y1 + y4;

    out[0] = tmp10 + o3; out[7] = tmp10 - o3;
    out[1] = tmp11 + o2; out[6] = tmp11 - o2;
    out[2] = tmp12 + o1; out[5] = tmp12 - o1;
    out[3] = tmp13 + o0; out[4] = tmp13 - o0;
}

static uint8_t clamp255(int v) { return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); }

/* dequantises and transforms one block into 8x8 samples at out (row stride `stride`) */
static void jpeg_idct_block(const int16_t *blk, const uint16_t *q, uint8_t *out, size_t stride) {
    int64_t ws[64], in[8], o[8];
    for (int x = 0; x < 8; x++) {               /* pass 1: columns, keep PASS1_BITS extra bits */
        for (int k = 0; k < 8; k++) in[k] = blk[8 * k + x] * q[8 * k + x];
        idct_1d(in, o);
        for (int k = 0; k < 8; k++) ws[8 * k + x] = (o[k] + (1 << (CONST_BITS - PASS1_BITS - 1))) >> (CONST_BITS - PASS1_BITS);
    }
    for (int y = 0; y < 8; y++) {               /* pass 2: rows, remove the 8x scale of the transform */
        idct_1d(ws + 8 * y, o);
        for (int k = 0; k < 8; k++) {
            int64_t v = (o[k] + (1 << (CONST_BITS + PASS1_BITS + 2))) >> (CONST_BITS + PASS1_BITS + 3);
            out[y * stride + k] = clamp255((int)(v < -1000 ? -1000 : v > 1000 ? 1000 : v) + 128);
        }
    }
}
#undef FIXC

/* ---- upsampling to full resolution (jdsample.c), one output row at a time.
 * The "fancy" filters weight the nearer input sample 3/4 and the farther 1/4 in each
 * subsampled direction, with libjpeg's alternating rounding biases. Edges replicate the
 * last real row/column of the component. */
static void upsample_row(const jdec *d, const jcomp *c, int y, uint8_t *tmp, uint8_t *dst) {
    int hs = d->hmax / c->h, vs = d->vmax / c->v, cw = c->cw;
    size_t stride = (size_t)c->bw * 8;
    const uint8_t *near = c->plane + (size_t)(y / vs) * stride;
    if (hs == 1 && vs == 1) { memcpy(dst, near, d->w); return; }
    if (hs == 2 && vs == 1 && cw > 2) {         /* h2v1_fancy_upsample */
        tmp[0] = near[0];
        tmp[1] = (uint8_t)((near[0] * 3 + near[1] + 2) >> 2);
        for (int i = 1; i < cw - 1; i++) {
            tmp[2 * i] = (uint8_t)((near[i] * 3 + near[i - 1] + 1) >> 2);
            tmp[2 * i + 1] = (uint8_t)((near[i] * 3 + near[i + 1] + 2) >> 2);
        }
        tmp[2 * cw - 2] = (uint8_t)((near[cw - 1] * 3 + near[cw - 2] + 1) >> 2);
        tmp[2 * cw - 1] = near[cw - 1];
        memcpy(dst, tmp, d->w);
        return;
    }
    int below = y % 2, iy = y / 2;              /* for vs == 2: the farther row is above or below */
    int fy = below ? (iy + 1 < c->ch ? iy + 1 : c->ch - 1) : (iy > 0 ? iy - 1 : 0);
    const uint8_t *far = c->plane + (size_t)fy * stride;
    if (hs == 1 && vs == 2) {                   /* h1v2_fancy_upsample */
        for (int x = 0; x < d->w; x++) dst[x] = (uint8_t)((near[x] * 3 + far[x] + 1 + below) >> 2);
        return;
    }
    if (hs == 2 && vs == 2 && cw > 2) {         /* h2v2_fancy_upsample */
        int last = near[0] * 3 + far[0], cur = last, next;
        tmp[0] = (uint8_t)((cur * 4 + 8) >> 4);
        for (int i = 0; i < cw; i++) {
            next = i + 1 < cw ? near[i + 1] * 3 + far[i + 1] : cur;
            if (i > 0) tmp[2 * i] = (uint8_t)((cur * 3 + last + 8) >> 4);
            tmp[2 * i + 1] = (uint8_t)(i + 1 < cw ? (cur * 3 + next + 7) >> 4 : (cur * 4 + 7) >> 4);
            last = cur;
            cur = next;
        }
        memcpy(dst, tmp, d->w);
        return;
    }
    for (int x = 0; x < d->w; x++) dst[x] = near[x / hs];     /* box replication */
}

/* YCbCr -> RGB as jdcolor.c: 16-bit fixed point tables, rounding folded into them */
static void jpeg_ycc_to_rgb(const uint8_t *yy, const uint8_t *cb, const uint8_t *cr, int n, uint8_t *rgb) {
    enum { SB = 16 };
    const int32_t half = 1 << (SB - 1);
#define FIX16(x) ((int32_t)((x) * 65536.0 + 0.5))
    for (int i = 0; i < n; i++) {
        int b = cb[i] - 128, r = cr[i] - 128, y = yy[i];
        rgb[3 * i + 0] = clamp255(y + ((FIX16(1.40200) * r + half) >> SB));
        rgb[3 * i + 1] = clamp255(y + ((-FIX16(0.71414) * r - FIX16(0.34414) * b + half) >> SB));
        rgb[3 * i + 2] = clamp255(y + ((FIX16(1.77200) * b + half) >> SB));
    }
#undef FIX16
}

/* libjpeg's colour-space guess for 3 components: JFIF -> YCbCr; Adobe transform 0 -> RGB;
 * otherwise component ids 'R','G','B' -> RGB; else YCbCr */
static int jpeg_is_rgb(const jdec *d) {
    if (d->jfif) return 0;
    if (d->adobe) return d->adobe_transform == 0;
    return d->comp[0].id == 'R' && d->comp[1].id == 'G' && d->comp[2].id == 'B';
}

static void jpeg_output(jdec *d, zi_image *out) {
    for (int i = 0; i < d->ncomp; i++) {
        jcomp *c = &d->comp[i];
        size_t stride = (size_t)c->bw * 8;
        c->plane = zi_malloc(stride * c->bh * 8);
        for (int by = 0; by < c->bh; by++)
            for (int bx = 0; bx < c->bw; bx++)
                jpeg_idct_block(c->coef + ((size_t)by * c->bw + bx) * 64, c->q, c->plane + by * 8 * stride + bx * 8, stride);
    }
    out->w = d->w;
    out->h = d->h;
    out->c = 3;
    out->px = zi_malloc((size_t)d->w * d->h * 3);
    int maxcw = 0;
    for (int i = 0; i < d->ncomp; i++) if (d->comp[i].cw > maxcw) maxcw = d->comp[i].cw;
    uint8_t *tmp = zi_malloc(2 * (size_t)maxcw + 2), *rows = zi_malloc((size_t)d->w * 3);
    int rgb = d->ncomp == 3 && jpeg_is_rgb(d);
    for (int y = 0; y < d->h; y++) {
        uint8_t *o = out->px + (size_t)y * d->w * 3;
        for (int i = 0; i < d->ncomp; i++) upsample_row(d, &d->comp[i], y, tmp, rows + (size_t)i * d->w);
        if (d->ncomp == 1)
            for (int x = 0; x < d->w; x++) o[3 * x] = o[3 * x + 1] = o[3 * x + 2] = rows[x];
        else if (rgb)
            for (int x = 0; x < d->w; x++)
                for (int k = 0; k < 3; k++) o[3 * x + k] = rows[(size_t)k * d->w + x];
        else
            jpeg_ycc_to_rgb(rows, rows + d->w, rows + 2 * (size_t)d->w, d->w, o);
    }
    free(tmp);
    free(rows);
}

int zi_jpeg_decode(const uint8_t *buf, size_t n, zi_image *out) {
    memset(out, 0, sizeof *out);
    if (n < 4 || buf[0] != 0xFF || buf[1] != 0xD8) { zi_seterr("not a JPEG file"); return -1; }
    jdec *d = zi_calloc(1, sizeof *d);
    d->p = buf;
    d->n = n;
    d->pos = 2;
    int seen_scan = 0, done = 0;
    while (!d->err && !done) {
        int m = jpeg_next_marker(d);
        if (m == 0) { d->err = "truncated (no EOI marker)"; break; }
        if (m == 0xD9) { done = 1; break; }
        if ((m >= 0xD0 && m <= 0xD7) || m == 0x01) continue;     /* parameterless */
        if (d->pos + 2 > n) { d->err = "truncated marker segment"; break; }
        size_t len = (size_t)(buf[d->pos] << 8 | buf[d->pos + 1]);
        if (len < 2 || len > n - d->pos) { d->err = "truncated marker segment"; break; }
        const uint8_t *s = buf + d->pos + 2;
        len -= 2;
        d->pos += 2 + len;
        if (m == 0xC0 || m == 0xC1 || m == 0xC2) jpeg_sof(d, s, len, m);
        else if ((m >= 0xC3 && m <= 0xCF) && m != 0xC4 && m != 0xC8 && m != 0xCC)
            d->err = "lossless, hierarchical and arithmetic-coded JPEG are not supported";
        else if (m == 0xC4) jpeg_dht(d, s, len);
        else if (m == 0xDB) jpeg_dqt(d, s, len);
        else if (m == 0xDD) {
            if (len < 2) d->err = "bad DRI";
            else d->restart = s[0] << 8 | s[1];
        } else if (m == 0xDA) {
            jpeg_sos(d, s, len);
            seen_scan = 1;
        } else if (m == 0xE0 && len >= 5 && !memcmp(s, "JFIF", 5)) d->jfif = 1;
        else if (m == 0xEE && len >= 12 && !memcmp(s, "Adobe", 5)) {
            d->adobe = 1;
            d->adobe_transform = s[11];
        }
        /* other APPn, COM, DNL...: skipped */
    }
    if (!d->err && !seen_scan) d->err = "no image data";
    if (!d->err) jpeg_output(d, out);
    for (int i = 0; i < 3; i++) {
        free(d->comp[i].coef);
        free(d->comp[i].plane);
    }
    int rc = 0;
    if (d->err) { zi_seterr("JPEG: %s", d->err); rc = -1; }
    free(d);
    return rc;
}

/* ================================================================ loading by content */

int zi_image_decode(const uint8_t *buf, size_t n, zi_image *out) {
    if (n >= 8 && !memcmp(buf, png_sig, 8)) return zi_png_decode(buf, n, out);
    if (n >= 3 && buf[0] == 0xFF && buf[1] == 0xD8 && buf[2] == 0xFF) return zi_jpeg_decode(buf, n, out);
    memset(out, 0, sizeof *out);
    zi_seterr("not a PNG or JPEG file");
    return -1;
}

int zi_image_load(const char *path, zi_image *out) {
    memset(out, 0, sizeof *out);
    FILE *f = fopen(path, "rb");
    if (!f) { zi_seterr("%s: %s", path, strerror(errno)); return -1; }
    zbuf b = { 0 };
    uint8_t chunk[1 << 16];
    size_t k;
    while ((k = fread(chunk, 1, sizeof chunk, f)) > 0) zb_put(&b, chunk, k);
    int bad = ferror(f);
    fclose(f);
    if (bad) { free(b.p); zi_seterr("%s: read error", path); return -1; }
    int rc = zi_image_decode(b.p ? b.p : chunk, b.n, out);
    free(b.p);
    if (rc) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", zi_err());
        zi_seterr("%s: %s", path, msg);
    }
    return rc;
}

/* ================================================================ conversions */

void zi_image_from_float(const float *chw, int w, int h, uint8_t *rgb) {
    size_t plane = (size_t)w * h;
    for (size_t i = 0; i < plane; i++)
        for (int k = 0; k < 3; k++) {
            float x = chw[k * plane + i];
            x = x > 0 ? (x < 1 ? x : 1) : 0;        /* clamp; NaN -> 0 */
            rgb[3 * i + k] = (uint8_t)rintf(x * 255.0f);    /* round half to even, as numpy */
        }
}

static float bf16_round(float x) { return zi_bf16_to_f32(zi_f32_to_bf16(x)); }

void zi_image_to_float(const uint8_t *rgb, int w, int h, float *chw, int bf16) {
    size_t plane = (size_t)w * h;
    const float s = (float)(2.0 / 255.0);
    for (size_t i = 0; i < plane; i++)
        for (int k = 0; k < 3; k++) {
            /* DiffSynth: image * ((1 - (-1)) / 255) + (-1), two tensor ops, each rounded to the
             * tensor's dtype. The product is formed exactly in double and rounded to float, so
             * the compiler cannot fuse it with the subtraction into an FMA (which rounds once
             * and gives e.g. 1.0000001 instead of 1.0 for 255). */
            float p = (float)((double)rgb[3 * i + k] * s);
            chw[k * plane + i] = bf16 ? bf16_round(bf16_round(p) - 1.0f) : p - 1.0f;
        }
}

/* ================================================================ training resize (DiffSynth §8.2) */

void zi_train_size(int w, int h, int height, int width, int64_t max_pixels, int *tw, int *th) {
    if (height > 0 && width > 0) { *tw = width; *th = height; return; }
    if ((int64_t)w * h > max_pixels) {
        /* scale = (width * height / max_pixels) ** 0.5; height, width = int(height / scale), ... */
        double scale = pow((double)w * h / (double)max_pixels, 0.5);
        h = (int)(h / scale);
        w = (int)(w / scale);
    }
    *th = h / 16 * 16;
    *tw = w / 16 * 16;
}

/* Pillow's resampling coefficients (Resample.c precompute_coeffs + normalize_coeffs_8bpc)
 * for the bilinear (triangle) filter: when shrinking, the triangle is widened by the scale
 * factor (antialiasing); weights are normalised, then made 22-bit fixed point. */
enum { PREC = 22 };

typedef struct { int *bounds; int32_t *k; int ksize; } pil_coeffs;

static void pil_coeffs_make(int in_size, int out_size, pil_coeffs *pc) {
    double scale = (double)in_size / out_size, filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 1.0 * filterscale;
    pc->ksize = (int)ceil(support) * 2 + 1;
    pc->bounds = zi_malloc(sizeof(int) * 2 * out_size);
    pc->k = zi_calloc((size_t)out_size * pc->ksize, sizeof(int32_t));
    double *w = zi_malloc(sizeof(double) * pc->ksize);
    for (int xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
        if (xmin < 0) xmin = 0;
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            double t = fabs((x + xmin - center + 0.5) * ss);
            w[x] = t < 1.0 ? 1.0 - t : 0.0;
            ww += w[x];
        }
        for (int x = 0; x < xmax; x++) {
            double v = ww != 0.0 ? w[x] / ww : w[x];
            pc->k[(size_t)xx * pc->ksize + x] = (int32_t)(v < 0 ? -0.5 + v * (1 << PREC) : 0.5 + v * (1 << PREC));
        }
        pc->bounds[2 * xx] = xmin;
        pc->bounds[2 * xx + 1] = xmax;
    }
    free(w);
}

static uint8_t pil_clip8(int64_t v) {
    v >>= PREC;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* one separable pass: n_out outputs along the axis, each a weighted sum of inputs `step`
 * bytes apart; lines are `nlines` rows (horizontal pass) or columns (vertical pass) */
static void pil_pass(const uint8_t *src, uint8_t *dst, const pil_coeffs *pc, int n_out, int nlines,
                     size_t src_line, size_t dst_line, size_t src_step, size_t dst_step, int c) {
    for (int l = 0; l < nlines; l++)
        for (int o = 0; o < n_out; o++) {
            const int32_t *k = pc->k + (size_t)o * pc->ksize;
            int xmin = pc->bounds[2 * o], xmax = pc->bounds[2 * o + 1];
            for (int ch = 0; ch < c; ch++) {
                int64_t ss = 1 << (PREC - 1);
                const uint8_t *s = src + l * src_line + (size_t)xmin * src_step + ch;
                for (int x = 0; x < xmax; x++) ss += (int64_t)s[x * src_step] * k[x];
                dst[l * dst_line + o * dst_step + ch] = pil_clip8(ss);
            }
        }
}

/* PIL Image.resize(BILINEAR): a horizontal pass (rounded to 8 bits), then a vertical one;
 * a pass is skipped when that size does not change. */
static void pil_resize(const zi_image *in, int ow, int oh, uint8_t *out) {
    int c = in->c;
    const uint8_t *src = in->px;
    uint8_t *tmp = NULL;
    int cw = in->w;
    if (ow != in->w) {
        pil_coeffs pc;
        pil_coeffs_make(in->w, ow, &pc);
        tmp = zi_malloc((size_t)ow * in->h * c);
        pil_pass(src, tmp, &pc, ow, in->h, (size_t)in->w * c, (size_t)ow * c, c, c, c);
        free(pc.bounds);
        free(pc.k);
        src = tmp;
        cw = ow;
    }
    if (oh != in->h) {
        pil_coeffs pc;
        pil_coeffs_make(in->h, oh, &pc);
        pil_pass(src, out, &pc, oh, cw, c, c, (size_t)cw * c, (size_t)cw * c, c);
        free(pc.bounds);
        free(pc.k);
    } else {
        memcpy(out, src, (size_t)cw * oh * c);
    }
    free(tmp);
}

/* torchvision center_crop offset: int(round((size - crop) / 2.0)), round half to even */
static int crop_offset(int size, int crop) {
    int d = size - crop;
    return d % 2 == 0 ? d / 2 : (d / 2) % 2 == 0 ? d / 2 : d / 2 + 1;
}

int zi_image_resize_crop(const zi_image *in, int tw, int th, zi_image *out) {
    memset(out, 0, sizeof *out);
    if (tw <= 0 || th <= 0 || in->w <= 0 || in->h <= 0) {
        zi_seterr("cannot resize a %dx%d image to %dx%d", in->w, in->h, tw, th);
        return -1;
    }
    /* scale = max(tw / W, th / H); size = (round(H·scale), round(W·scale)) (Python floats) */
    double sx = (double)tw / in->w, sy = (double)th / in->h, s = sx > sy ? sx : sy;
    int rw = (int)nearbyint(in->w * s), rh = (int)nearbyint(in->h * s);
    if (rw < tw || rh < th) {     /* cannot happen for s as computed; torchvision would pad */
        zi_seterr("resize %dx%d -> %dx%d does not cover %dx%d", in->w, in->h, rw, rh, tw, th);
        return -1;
    }
    uint8_t *r = zi_malloc((size_t)rw * rh * in->c);
    pil_resize(in, rw, rh, r);
    int ox = crop_offset(rw, tw), oy = crop_offset(rh, th);
    out->w = tw;
    out->h = th;
    out->c = in->c;
    out->px = zi_malloc((size_t)tw * th * in->c);
    for (int y = 0; y < th; y++)
        memcpy(out->px + (size_t)y * tw * in->c, r + ((size_t)(y + oy) * rw + ox) * in->c, (size_t)tw * in->c);
    free(r);
    return 0;
}
