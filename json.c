/* json.c: a strict JSON parser (RFC 8259). See safetensors.h for the tree it builds.
 *
 * The parser is a recursive descent over the text. Every node, key and string of the tree
 * lives in one arena (a list of large blocks), so parsing an 11 MB tokenizer.json costs a
 * handful of mallocs and zj_free() is one loop. While a container is being parsed its
 * members pile up on a reusable stack; when it closes they are copied into the arena as one
 * contiguous array (the tree needs `kids[i]`, and the count is only known at the end).
 *
 * Strictness: only the four JSON whitespace characters; strings must be valid UTF-8 without
 * raw control characters; every escape including \uXXXX surrogate pairs (a lone surrogate is
 * an error); numbers follow the grammar exactly (no "01", "1.", ".5", "+1", no NaN/Infinity)
 * and must fit a double; at most ZJ_MAXDEPTH nested containers; nothing but whitespace after
 * the value. A leading UTF-8 byte order mark is skipped (RFC 8259 section 8.1 allows it).
 *
 * Every object carries one hidden slot after its n members, kids[n], a string holding the
 * name the text was parsed under; zj_source() returns it so that the config helpers can
 * name the file in their error messages.
 */
#include "safetensors.h"
#include "utf8.h"

#include <locale.h>
#include <math.h>
#include <stdalign.h>
#include <stdlib.h>
#include <string.h>

#define ZJ_MAXDEPTH 512

/* ---------------------------------------------------------------- arena */
typedef struct zj_block {
    struct zj_block *next;
    size_t used, cap;
    alignas(max_align_t) unsigned char data[];
} zj_block;

/* The document: the arena and the root. It is the first allocation of its own arena, so
 * zj_free(root) finds the arena from the root's address. */
typedef struct {
    zj_block *blocks;
    const char *what;
    zj root;
} zj_doc;

static void *arena_alloc(zj_block **head, size_t n) {
    n = (n + 7) & ~(size_t)7;
    zj_block *b = *head;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > (1u << 20) ? n : (1u << 20);
        b = zi_malloc(sizeof(zj_block) + cap);
        b->next = *head;
        b->used = 0;
        b->cap = cap;
        *head = b;
    }
    void *p = b->data + b->used;
    b->used += n;
    return p;
}

/* Gives back the unused tail of the most recent allocation p (old size n, new size keep). */
static void arena_shrink(zj_block *b, void *p, size_t n, size_t keep) {
    n = (n + 7) & ~(size_t)7;
    keep = (keep + 7) & ~(size_t)7;
    if ((unsigned char *)p + n == b->data + b->used) b->used -= n - keep;
}

/* ---------------------------------------------------------------- parser state */
typedef struct {            /* a member of a container being parsed */
    zj v;
    const char *key;
    size_t keylen;
} zj_item;

typedef struct {
    const char *text, *p, *end;
    const char *what;
    zj_block *arena;
    zj_item *stack;         /* members of all open containers */
    size_t sp, cap;
    int depth;
    int failed;
} zj_parser;

/* Records "WHAT: line L col C: reason" for the position at. Returns -1. */
static int fail(zj_parser *P, const char *at, const char *reason) {
    if (P->failed) return -1;
    P->failed = 1;
    int line = 1, col = 1;
    for (const char *s = P->text; s < at && s < P->end; s++) {
        if (*s == '\n') { line++; col = 1; }
        else col++;
    }
    zi_seterr("%s: line %d col %d: %s", P->what, line, col, reason);
    return -1;
}

static void skip_ws(zj_parser *P) {
    while (P->p < P->end && (*P->p == ' ' || *P->p == '\n' || *P->p == '\r' || *P->p == '\t')) P->p++;
}

static void push(zj_parser *P, const zj_item *it) {
    if (P->sp == P->cap) {
        P->cap = P->cap ? 2 * P->cap : 256;
        P->stack = zi_realloc(P->stack, P->cap * sizeof *P->stack);
    }
    P->stack[P->sp++] = *it;
}

/* ---------------------------------------------------------------- strings */
static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Reads the 4 hex digits of a \u escape at s (s + 4 <= end checked by the caller). */
static long hex4(const char *s) {
    long v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval((unsigned char)s[i]);
        if (h < 0) return -1;
        v = v * 16 + h;
    }
    return v;
}

/* P->p is at the opening quote. The decoded string (NUL-terminated) goes into the arena. */
static int parse_string(zj_parser *P, const char **out, size_t *outlen) {
    const char *s = ++P->p;
    /* Find the closing quote: decoding never makes a string longer than its source. */
    const char *q = s;
    while (q < P->end && *q != '"') q += (*q == '\\') ? 2 : 1;
    if (q >= P->end) return fail(P, s - 1, "unterminated string");
    size_t cap = (size_t)(q - s) + 1;
    char *buf = arena_alloc(&P->arena, cap), *o = buf;
    while (s < q) {
        unsigned char c = (unsigned char)*s;
        if (c >= 0x20 && c < 0x80 && c != '\\') { *o++ = (char)c; s++; continue; }
        if (c < 0x20) return fail(P, s, "control character in string (must be escaped)");
        if (c >= 0x80) {
            int n = zi_utf8_seq((const uint8_t *)s, (size_t)(q - s));
            if (n < 0) return fail(P, s, "invalid UTF-8 in string");
            memcpy(o, s, (size_t)n);
            o += n;
            s += n;
            continue;
        }
        /* an escape: s[0] == '\\', s[1] exists (q is past it) */
        switch (s[1]) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            long c1 = q - s >= 6 ? hex4(s + 2) : -1;
            if (c1 < 0) return fail(P, s, "bad \\u escape (4 hex digits expected)");
            if (c1 >= 0xDC00 && c1 <= 0xDFFF) return fail(P, s, "lone low surrogate in \\u escape");
            if (c1 >= 0xD800 && c1 <= 0xDBFF) {
                /* a high surrogate must be followed by \u and a low surrogate */
                long c2 = q - s >= 12 && s[6] == '\\' && s[7] == 'u' ? hex4(s + 8) : -1;
                if (c2 < 0xDC00 || c2 > 0xDFFF) return fail(P, s, "lone high surrogate in \\u escape");
                o += zi_utf8_put((uint8_t *)o, 0x10000 + ((uint32_t)(c1 - 0xD800) << 10) + (uint32_t)(c2 - 0xDC00));
                s += 6;
            } else {
                o += zi_utf8_put((uint8_t *)o, (uint32_t)c1);
            }
            s += 4;
            break;
        }
        default: return fail(P, s, "invalid escape in string");
        }
        s += 2;
    }
    *o = 0;
    *out = buf;
    *outlen = (size_t)(o - buf);
    arena_shrink(P->arena, buf, cap, *outlen + 1);
    P->p = q + 1;
    return 0;
}

/* ---------------------------------------------------------------- numbers */
static int is_digit(const char *s, const char *end) { return s < end && *s >= '0' && *s <= '9'; }

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static int parse_number(zj_parser *P, double *out) {
    const char *s = P->p, *e = P->end, *start = s;
    int neg = 0, plain = 1;
    if (*s == '-') { neg = 1; s++; }
    if (!is_digit(s, e)) return fail(P, s, "digit expected in number");
    if (*s == '0') {
        s++;
        if (is_digit(s, e)) return fail(P, s, "leading zeros are not allowed in numbers");
    } else {
        while (is_digit(s, e)) s++;
    }
    const char *int_end = s;
    if (s < e && *s == '.') {
        s++;
        plain = 0;
        if (!is_digit(s, e)) return fail(P, s, "digit expected after '.' in number");
        while (is_digit(s, e)) s++;
    }
    if (s < e && (*s == 'e' || *s == 'E')) {
        s++;
        plain = 0;
        if (s < e && (*s == '+' || *s == '-')) s++;
        if (!is_digit(s, e)) return fail(P, s, "digit expected in exponent");
        while (is_digit(s, e)) s++;
    }
    P->p = s;
    const char *digits = start + neg;
    if (plain && int_end - digits <= 15) {
        /* an integer below 10^15 is exact in a double: no need for strtod */
        double v = 0;
        for (const char *d = digits; d < int_end; d++) v = v * 10 + (*d - '0');
        *out = neg ? -v : v;
        return 0;
    }
    /* strtod wants a NUL-terminated string and the current locale's decimal point */
    size_t n = (size_t)(s - start);
    char small[64], *buf = n < sizeof small ? small : zi_malloc(n + 1);
    memcpy(buf, start, n);
    buf[n] = 0;
    char dp = localeconv()->decimal_point[0];
    char *dot = memchr(buf, '.', n);
    if (dot && dp) *dot = dp;
    *out = strtod(buf, NULL);
    if (buf != small) free(buf);
    if (isinf(*out)) return fail(P, start, "number out of range");
    return 0;
}

/* ---------------------------------------------------------------- values */
static int parse_value(zj_parser *P, zj *v);

/* Moves the members stacked since `base` into the arena as v's kids (and keys). */
static void close_container(zj_parser *P, zj *v, size_t base) {
    int n = (int)(P->sp - base);
    int is_obj = v->type == ZJ_OBJ;
    v->n = n;
    v->kids = arena_alloc(&P->arena, (size_t)(n + is_obj) * sizeof(zj));
    if (is_obj) {
        v->keys = arena_alloc(&P->arena, (size_t)n * sizeof(char *));
        v->keylens = arena_alloc(&P->arena, (size_t)n * sizeof(size_t));
    }
    for (int i = 0; i < n; i++) {
        const zj_item *it = &P->stack[base + (size_t)i];
        v->kids[i] = it->v;
        if (is_obj) { v->keys[i] = it->key; v->keylens[i] = it->keylen; }
    }
    if (is_obj)   /* the hidden slot: where this object came from */
        v->kids[n] = (zj){ .type = ZJ_STR, .str = P->what, .len = strlen(P->what) };
    P->sp = base;
}

/* '[' or '{' at P->p. Members are "value" (array) or "string : value" (object). */
static int parse_container(zj_parser *P, zj *v) {
    int is_obj = *P->p == '{';
    char close = is_obj ? '}' : ']';
    if (++P->depth > ZJ_MAXDEPTH) return fail(P, P->p, "nesting too deep");
    v->type = is_obj ? ZJ_OBJ : ZJ_ARR;
    size_t base = P->sp;
    P->p++;
    skip_ws(P);
    if (P->p < P->end && *P->p == close) {
        P->p++;
    } else {
        for (;;) {
            zj_item it = {0};
            if (is_obj) {
                if (P->p >= P->end || *P->p != '"') return fail(P, P->p, "string key expected");
                if (parse_string(P, &it.key, &it.keylen)) return -1;
                skip_ws(P);
                if (P->p >= P->end || *P->p != ':') return fail(P, P->p, "':' expected after key");
                P->p++;
                skip_ws(P);
            }
            if (parse_value(P, &it.v)) return -1;
            push(P, &it);
            skip_ws(P);
            if (P->p < P->end && *P->p == ',') {
                P->p++;
                skip_ws(P);
                if (P->p < P->end && *P->p == close) return fail(P, P->p, "trailing comma");
                continue;
            }
            if (P->p < P->end && *P->p == close) { P->p++; break; }
            return fail(P, P->p, is_obj ? "',' or '}' expected" : "',' or ']' expected");
        }
    }
    close_container(P, v, base);
    P->depth--;
    return 0;
}

static int literal(zj_parser *P, const char *word, zj_type t, zj *v) {
    size_t n = strlen(word);
    if ((size_t)(P->end - P->p) < n || memcmp(P->p, word, n)) return fail(P, P->p, "invalid value");
    P->p += n;
    v->type = t;
    return 0;
}

/* Parses the value at P->p (whitespace already skipped) into *v. */
static int parse_value(zj_parser *P, zj *v) {
    memset(v, 0, sizeof *v);
    if (P->p >= P->end) return fail(P, P->p, "unexpected end of text");
    switch (*P->p) {
    case '{': case '[': return parse_container(P, v);
    case '"': v->type = ZJ_STR; return parse_string(P, &v->str, &v->len);
    case 't': return literal(P, "true", ZJ_TRUE, v);
    case 'f': return literal(P, "false", ZJ_FALSE, v);
    case 'n': return literal(P, "null", ZJ_NULL, v);
    default:
        if (*P->p == '-' || (*P->p >= '0' && *P->p <= '9')) {
            v->type = ZJ_NUM;
            return parse_number(P, &v->num);
        }
        return fail(P, P->p, "invalid value");
    }
}

/* ---------------------------------------------------------------- public API */
zj *zj_parse(const char *text, size_t len, const char *what) {
    if (!what) what = "json";
    zj_block *arena = NULL;
    zj_doc *doc = arena_alloc(&arena, sizeof(zj_doc));
    size_t wlen = strlen(what) + 1;
    doc->what = memcpy(arena_alloc(&arena, wlen), what, wlen);
    zj_parser P = { .text = text, .p = text, .end = text + len, .what = doc->what, .arena = arena };
    if (len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) P.p += 3;
    skip_ws(&P);
    int rc = parse_value(&P, &doc->root);
    if (!rc) {
        skip_ws(&P);
        if (P.p < P.end) rc = fail(&P, P.p, "unexpected text after the value");
    }
    free(P.stack);
    doc->blocks = P.arena;
    if (rc) {
        zj_free(&doc->root);
        return NULL;
    }
    return &doc->root;
}

zj *zj_load(const char *path) {
    size_t len;
    char *buf = zi_read_file(path, &len);
    if (!buf) return NULL;
    zj *root = zj_parse(buf, len, path);
    free(buf);
    return root;
}

void zj_free(zj *root) {
    if (!root) return;
    zj_doc *doc = (zj_doc *)((char *)root - offsetof(zj_doc, root));
    for (zj_block *b = doc->blocks, *next; b; b = next) {
        next = b->next;
        free(b);
    }
}

/* The name the object's text was parsed under (see the top of this file); NULL for a
 * value that is no object. Used by safetensors.c for error messages. */
const char *zj_source(const zj *obj);
const char *zj_source(const zj *obj) {
    return obj && obj->type == ZJ_OBJ ? obj->kids[obj->n].str : NULL;
}

const zj *zj_get(const zj *obj, const char *key) {
    if (!obj || obj->type != ZJ_OBJ) return NULL;
    size_t n = strlen(key);
    for (int i = obj->n - 1; i >= 0; i--)       /* backwards: the last duplicate wins */
        if (obj->keylens[i] == n && !memcmp(obj->keys[i], key, n)) return &obj->kids[i];
    return NULL;
}

const zj *zj_at(const zj *arr, int i) {
    return arr && arr->type == ZJ_ARR && i >= 0 && i < arr->n ? &arr->kids[i] : NULL;
}

double zj_num(const zj *obj, const char *key, double def) {
    const zj *v = zj_get(obj, key);
    return v && v->type == ZJ_NUM ? v->num : def;
}

const char *zj_str(const zj *obj, const char *key, const char *def) {
    const zj *v = zj_get(obj, key);
    return v && v->type == ZJ_STR ? v->str : def;
}

int zj_bool(const zj *obj, const char *key, int def) {
    const zj *v = zj_get(obj, key);
    return !v ? def : v->type == ZJ_TRUE ? 1 : v->type == ZJ_FALSE ? 0 : def;
}
