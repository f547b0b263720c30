/* Tests of image.c: checksums, deflate/inflate (against Python's zlib too), PNG writer and
 * reader (all colour types, bit depths, Adam7; checked by an independent Python reader),
 * the JPEG decoder against djpeg's decodings (test/data/jpeg, made by
 * tools/gen_image_tests.py), corrupt inputs, atomic writes, conversions and the training
 * resize. */
#include "test.h"
#include "../zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---------------------------------------------------------------- helpers */

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *p = malloc(len > 0 ? (size_t)len : 1);
    *n = fread(p, 1, (size_t)len, f);
    fclose(f);
    return p;
}

static int spit(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t k = fwrite(p, 1, n, f);
    return fclose(f) == 0 && k == n ? 0 : -1;
}

/* a binary PPM (P6, maxval 255) */
static uint8_t *read_ppm(const char *path, int *w, int *h) {
    size_t n;
    uint8_t *p = slurp(path, &n);
    if (!p) return NULL;
    int off = 0;
    if (sscanf((char *)p, "P6 %d %d 255%n", w, h, &off) != 2 || off == 0 || (size_t)off + 1 + (size_t)*w * *h * 3 > n) {
        free(p);
        return NULL;
    }
    uint8_t *rgb = malloc((size_t)*w * *h * 3);
    memcpy(rgb, p + off + 1, (size_t)*w * *h * 3);
    free(p);
    return rgb;
}

static int max_abs_diff(const uint8_t *a, const uint8_t *b, size_t n) {
    int m = 0;
    for (size_t i = 0; i < n; i++) {
        int d = abs((int)a[i] - (int)b[i]);
        if (d > m) m = d;
    }
    return m;
}

static uint64_t rng_state = 88172645463325252ull;
static uint32_t rnd(void) {            /* xorshift64 */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 32);
}

/* a test picture: smooth gradients, an edge and some noise */
static void make_picture(uint8_t *px, int w, int h, int c) {
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int k = 0; k < c; k++) {
                int v = (x * 255 / w) * (k % 2) + (y * 255 / h) * (1 - k % 2) + (x > w / 2 ? 40 : 0) + (int)(rnd() % 9);
                px[((size_t)y * w + x) * c + k] = (uint8_t)(v > 255 ? 255 : v);
            }
}

/* ---------------------------------------------------------------- checksums */

TEST(image_checksums) {
    CHECK(zi_crc32(0, "123456789", 9) == 0xCBF43926u, "crc32 check value %08x", zi_crc32(0, "123456789", 9));
    CHECK(zi_crc32(zi_crc32(0, "1234", 4), "56789", 5) == 0xCBF43926u, "crc32 incremental");
    CHECK(zi_adler32(1, "Wikipedia", 9) == 0x11E60398u, "adler32 %08x", zi_adler32(1, "Wikipedia", 9));
    CHECK(zi_adler32(1, "", 0) == 1, "adler32 of nothing");
    /* long input: the modulo reduction every 5552 bytes */
    size_t n = 100000;
    uint8_t *p = malloc(n);
    memset(p, 255, n);
    uint32_t a = 1, b = 0;
    for (size_t i = 0; i < n; i++) { a = (a + 255) % 65521; b = (b + a) % 65521; }
    CHECK(zi_adler32(1, p, n) == (b << 16 | a), "adler32 of 100000 x 0xFF");
    free(p);
}

/* ---------------------------------------------------------------- deflate / inflate */

typedef struct { const char *name; uint8_t *p; size_t n; } sample_data;

/* empty, one byte, random (incompressible), repetitive, text-like and image-like, some > 64 KiB */
static int make_samples(sample_data *s) {
    int k = 0;
    s[k++] = (sample_data){ "empty", malloc(1), 0 };
    s[k] = (sample_data){ "one byte", malloc(1), 1 };
    s[k++].p[0] = 'x';
    size_t n = 150000;
    s[k] = (sample_data){ "random 150000", malloc(n), n };
    for (size_t i = 0; i < n; i++) s[k].p[i] = (uint8_t)rnd();
    k++;
    n = 300000;
    s[k] = (sample_data){ "repetitive 300000", malloc(n), n };
    for (size_t i = 0; i < n; i++) s[k].p[i] = (uint8_t)("abcabcabd"[i % 9] + (i / 50000));
    k++;
    n = 70000;
    s[k] = (sample_data){ "zeros 70000", calloc(n, 1), n };
    k++;
    static const char *words[] = { "the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dog. " };
    n = 100000;
    s[k] = (sample_data){ "text 100000", malloc(n), n };
    for (size_t i = 0; i < n;) {
        const char *wd = words[rnd() % 8];
        for (size_t j = 0; wd[j] && i < n; j++) s[k].p[i++] = (uint8_t)wd[j];
    }
    k++;
    n = 97 * 61 * 3;
    s[k] = (sample_data){ "picture", malloc(n), n };
    make_picture(s[k].p, 97, 61, 3);
    k++;
    return k;
}

static void free_samples(sample_data *s, int k) {
    for (int i = 0; i < k; i++) free(s[i].p);
}

TEST(image_zlib_roundtrip) {
    sample_data s[8];
    int ns = make_samples(s);
    for (int i = 0; i < ns; i++) {
        uint8_t *z, *back;
        size_t nz, nb;
        zi_zlib_compress(s[i].p, s[i].n, &z, &nz);
        int rc = zi_zlib_decompress(z, nz, s[i].n, &back, &nb);
        fprintf(stderr, "    %-18s %7zu -> %7zu bytes\n", s[i].name, s[i].n, nz);
        int same = rc == 0 && nb == s[i].n && !memcmp(back, s[i].p, nb);
        /* an output limit one byte short must be refused */
        uint8_t *o2 = NULL;
        size_t n2;
        int rc2 = s[i].n ? zi_zlib_decompress(z, nz, s[i].n - 1, &o2, &n2) : -1;
        free(o2);
        free(back);
        free(z);
        CHECK(same, "%s: round trip failed (rc %d: %s)", s[i].name, rc, zi_err());
        CHECK(rc2 == -1, "%s: output limit not enforced", s[i].name);
        /* real compression: incompressible data costs almost nothing extra, redundant data shrinks */
        if (!strncmp(s[i].name, "random", 6)) CHECK(nz < s[i].n + s[i].n / 1000 + 64, "%s: %zu bytes", s[i].name, nz);
        if (!strncmp(s[i].name, "repetitive", 10) || !strncmp(s[i].name, "zeros", 5))
            CHECK(nz < s[i].n / 100, "%s: compressed to %zu bytes", s[i].name, nz);
        if (!strncmp(s[i].name, "text", 4)) CHECK(nz < s[i].n / 3, "%s: compressed to %zu bytes", s[i].name, nz);
    }
    free_samples(s, ns);
}

/* Python's zlib decompresses our streams, and we decompress Python's (every block type:
 * stored at level 0, fixed with Z_FIXED, dynamic at levels 1 and 9, Z_RLE, Z_HUFFMAN_ONLY). */
TEST(image_zlib_python) {
    sample_data s[8];
    int ns = make_samples(s);
    char path[512], zpath[512], out[4096];
    for (int i = 0; i < ns; i++) {
        snprintf(path, sizeof path, "%s/zs%d.bin", zt_tmpdir(), i);
        snprintf(zpath, sizeof zpath, "%s/zs%d.z", zt_tmpdir(), i);
        uint8_t *z;
        size_t nz;
        zi_zlib_compress(s[i].p, s[i].n, &z, &nz);
        CHECK(spit(path, s[i].p, s[i].n) == 0 && spit(zpath, z, nz) == 0, "cannot write %s", path);
        free(z);
        int rc = zt_sh(out, sizeof out,
                       "python3 -c \"import sys, zlib\n"
                       "a = open(sys.argv[1], 'rb').read(); z = open(sys.argv[2], 'rb').read()\n"
                       "assert zlib.decompress(z) == a, 'python decoded different bytes'\n"
                       "for lvl, strat, name in ((0, 0, 'stored'), (9, zlib.Z_FIXED, 'fixed'), (1, 0, 'l1'), (9, 0, 'l9'),\n"
                       "                         (6, zlib.Z_RLE, 'rle'), (6, zlib.Z_HUFFMAN_ONLY, 'huff')):\n"
                       "    c = zlib.compressobj(lvl, zlib.DEFLATED, 15, 9, strat)\n"
                       "    open(sys.argv[2] + '.' + name, 'wb').write(c.compress(a) + c.flush())\n"
                       "\" %s %s", path, zpath);
        CHECK(rc == 0, "%s: python: %s", s[i].name, out);
        static const char *kinds[] = { "stored", "fixed", "l1", "l9", "rle", "huff" };
        for (int k = 0; k < 6; k++) {
            char p2[600];
            snprintf(p2, sizeof p2, "%s.%s", zpath, kinds[k]);
            size_t n2, nb;
            uint8_t *z2 = slurp(p2, &n2), *back;
            CHECK(z2, "missing %s", p2);
            int r = zi_zlib_decompress(z2, n2, s[i].n, &back, &nb);
            int same = r == 0 && nb == s[i].n && !memcmp(back, s[i].p, nb);
            free(z2);
            if (r == 0) free(back);
            CHECK(same, "%s: python's %s stream: %s", s[i].name, kinds[k], r ? zi_err() : "different bytes");
        }
    }
    free_samples(s, ns);
}

/* every truncation fails; every byte flip fails or (padding bits) gives the same bytes */
TEST(image_zlib_corrupt) {
    sample_data s[8];
    int ns = make_samples(s);
    int fails = 0, tries = 0;
    for (int i = 0; i < ns; i++) {
        uint8_t *z, *back;
        size_t nz, nb;
        zi_zlib_compress(s[i].p, s[i].n, &z, &nz);
        size_t step = nz / 200 + 1;
        for (size_t cut = 0; cut < nz; cut += step) {
            int rc = zi_zlib_decompress(z, cut, s[i].n + 1000, &back, &nb);
            if (rc == 0) free(back);
            CHECK(rc == -1, "%s: truncated at %zu of %zu accepted", s[i].name, cut, nz);
        }
        for (size_t pos = 0; pos < nz; pos += step) {
            for (int bit = 0; bit < 8; bit += 3) {
                z[pos] ^= (uint8_t)(1 << bit);
                int rc = zi_zlib_decompress(z, nz, s[i].n + 1000, &back, &nb);
                z[pos] ^= (uint8_t)(1 << bit);
                tries++;
                if (rc == 0) {
                    int same = nb == s[i].n && !memcmp(back, s[i].p, nb);
                    free(back);
                    CHECK(same, "%s: flip at %zu gave different data without an error", s[i].name, pos);
                } else {
                    fails++;
                }
            }
        }
        free(z);
    }
    fprintf(stderr, "    %d of %d corrupted streams refused (the rest only touched padding bits)\n", fails, tries);
    free_samples(s, ns);
}

/* ---------------------------------------------------------------- PNG */

/* an independent PNG reader in Python (chunks, CRCs, zlib, unfiltering) that prints the
 * text chunks and writes the raw 8-bit pixels */
static int python_png_read(const char *png, const char *raw_out, char *out, size_t cap) {
    return zt_sh(out, cap,
                 "python3 -c \"import struct, sys, zlib\n"
                 "d = open(sys.argv[1], 'rb').read(); assert d[:8] == b'\\x89PNG\\r\\n\\x1a\\n'\n"
                 "p = 8; idat = b''; n_idat = 0\n"
                 "while p < len(d):\n"
                 "    n, t = struct.unpack('>I4s', d[p:p+8]); body = d[p+8:p+8+n]\n"
                 "    assert struct.unpack('>I', d[p+8+n:p+12+n])[0] == zlib.crc32(t + body), 'crc'\n"
                 "    if t == b'IHDR': w, h, depth, ct = struct.unpack('>IIBB', body[:10]); assert depth == 8\n"
                 "    if t == b'IDAT': idat += body; n_idat += 1\n"
                 "    if t == b'tEXt': k, v = body.split(b'\\0', 1); print('tEXt', k.decode(), v.decode('latin-1'))\n"
                 "    if t == b'iTXt': k, v = body.split(b'\\0', 1); print('iTXt', k.decode(), v[4:].decode('utf-8'))\n"
                 "    p += 12 + n\n"
                 "c = {0: 1, 2: 3, 6: 4}[ct]; raw = zlib.decompress(idat); stride = w * c; out = bytearray(); prev = bytearray(stride)\n"
                 "for y in range(h):\n"
                 "    f = raw[y * (stride + 1)]; row = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])\n"
                 "    for i in range(stride):\n"
                 "        a = row[i - c] if i >= c else 0; b = prev[i]; cc = prev[i - c] if i >= c else 0\n"
                 "        pa, pb, pc = abs(b - cc), abs(a - cc), abs(a + b - 2 * cc)\n"
                 "        pr = [0, a, b, (a + b) // 2, a if pa <= pb and pa <= pc else (b if pb <= pc else cc)][f]\n"
                 "        row[i] = (row[i] + pr) & 255\n"
                 "    out += row; prev = row\n"
                 "open(sys.argv[2], 'wb').write(out); print('size', w, h, c, 'idat', n_idat)\n"
                 "\" %s %s", png, raw_out);
}

TEST(image_png_write_python) {
    const int w = 301, h = 263;       /* > 64 KiB compressed: several IDAT chunks */
    static const int chans[3] = { 3, 1, 4 };
    for (int t = 0; t < 3; t++) {
        int c = chans[t];
        zi_image im = { w, h, c, malloc((size_t)w * h * c) };
        make_picture(im.px, w, h, c);
        char path[512], raw[512], out[4096];
        snprintf(path, sizeof path, "%s/w%d.png", zt_tmpdir(), c);
        snprintf(raw, sizeof raw, "%s/w%d.raw", zt_tmpdir(), c);
        const char *kv[4] = { "parameters", "a photo of a cat\nSteps: 8, Seed: 42", "Comment", "caf\xc3\xa9 \xe2\x9c\x93" };
        int rc = c == 3 ? zi_png_write(path, im.px, w, h, kv, 2) : zi_png_write_image(path, &im, kv, 2);
        CHECK(rc == 0, "write: %s", zi_err());
        rc = python_png_read(path, raw, out, sizeof out);
        CHECK(rc == 0, "python could not read our PNG: %s", out);
        CHECK(strstr(out, "tEXt parameters a photo of a cat\nSteps: 8, Seed: 42"), "parameters text: %s", out);
        CHECK(strstr(out, "iTXt Comment caf\xc3\xa9 \xe2\x9c\x93"), "UTF-8 text: %s", out);
        size_t nraw;
        uint8_t *px = slurp(raw, &nraw);
        CHECK(px && nraw == (size_t)w * h * c && !memcmp(px, im.px, nraw), "python read different pixels");
        free(px);
        /* our reader: RGB, gray replicated, alpha dropped */
        zi_image back;
        CHECK(zi_image_load(path, &back) == 0, "read back: %s", zi_err());
        int same = back.w == w && back.h == h && back.c == 3;
        for (size_t i = 0; same && i < (size_t)w * h; i++)
            for (int k = 0; k < 3; k++) same &= back.px[3 * i + k] == im.px[i * c + (c == 1 ? 0 : k)];
        size_t nfile = 0;
        free(slurp(path, &nfile));
        fprintf(stderr, "    c=%d: %zu pixel bytes -> %zu byte PNG; %s", c, (size_t)w * h * c, nfile, strstr(out, "size"));
        zi_image_free(&back);
        free(im.px);
        CHECK(same, "our reader returned different pixels");
    }
}

static const char *png_cases[] = {
    "c0_d1", "c0_d2", "c0_d4", "c0_d8", "c0_d16", "c2_d8", "c2_d16", "c3_d1", "c3_d2", "c3_d4", "c3_d8",
    "c4_d8", "c4_d16", "c6_d8", "c6_d16",
};

TEST(image_png_read_all_types) {
    char path[256];
    int n = 0;
    for (size_t i = 0; i < sizeof png_cases / sizeof *png_cases; i++)
        for (int il = 0; il < 2; il++) {
            char name[64];
            snprintf(name, sizeof name, "%s%s", png_cases[i], il ? "_i" : "");
            snprintf(path, sizeof path, "test/data/png/%s.ppm", name);
            int w, h;
            uint8_t *want = read_ppm(path, &w, &h);
            CHECK(want, "missing %s", path);
            snprintf(path, sizeof path, "test/data/png/%s.png", name);
            zi_image im;
            int rc = zi_image_load(path, &im);
            int same = rc == 0 && im.w == w && im.h == h && im.c == 3 && !memcmp(im.px, want, (size_t)w * h * 3);
            free(want);
            if (rc == 0) zi_image_free(&im);
            CHECK(same, "%s: %s", name, rc ? zi_err() : "different pixels");
            n++;
        }
    zi_image im;
    CHECK(zi_image_load("test/data/png/tiny_i.png", &im) == 0 && im.w == 1 && im.h == 1, "1x1 interlaced: %s", zi_err());
    int w, h;
    uint8_t *want = read_ppm("test/data/png/tiny_i.ppm", &w, &h);
    CHECK(want && !memcmp(want, im.px, 3), "1x1 interlaced pixel");
    free(want);
    zi_image_free(&im);
    fprintf(stderr, "    %d PNGs (5 colour types, bit depths 1-16, plain and Adam7) decoded exactly\n", n + 1);
}

/* A failed write leaves nothing: no output file and no temporary file. */
TEST(image_png_write_failures) {
    uint8_t px[12] = { 0 };
    char dir[512], path[600], out[4096];
    snprintf(dir, sizeof dir, "%s/wf", zt_tmpdir());
    CHECK(mkdir(dir, 0777) == 0, "mkdir %s", dir);
    snprintf(path, sizeof path, "%s/nodir/out.png", dir);
    CHECK(zi_png_write(path, px, 2, 2, NULL, 0) == -1, "write into a missing directory succeeded");
    CHECK(strstr(zi_err(), "nodir/out.png"), "message does not name the file: %s", zi_err());
    snprintf(path, sizeof path, "%s/isdir", dir);       /* rename onto a directory fails */
    CHECK(mkdir(path, 0777) == 0, "mkdir %s", path);
    CHECK(zi_png_write(path, px, 2, 2, NULL, 0) == -1, "write over a directory succeeded");
    snprintf(path, sizeof path, "%s/bad.png", dir);
    CHECK(zi_png_write(path, px, 0, 2, NULL, 0) == -1, "0-wide image written");
    const char *badkey[2] = { "", "value" };
    CHECK(zi_png_write(path, px, 2, 2, badkey, 1) == -1, "empty text key accepted");
    zt_sh(out, sizeof out, "ls -A %s", dir);
    CHECK(!strcmp(out, "isdir\n"), "leftover files after failed writes: %s", out);
    /* and a good write replaces an existing file in one step */
    snprintf(path, sizeof path, "%s/ok.png", dir);
    CHECK(spit(path, "old", 3) == 0, "spit");
    CHECK(zi_png_write(path, px, 2, 2, NULL, 0) == 0, "write: %s", zi_err());
    zt_sh(out, sizeof out, "ls -A %s", dir);
    CHECK(!strcmp(out, "isdir\nok.png\n"), "files after the write: %s", out);
    zi_image im;
    CHECK(zi_image_load(path, &im) == 0 && im.w == 2 && im.h == 2, "read back: %s", zi_err());
    zi_image_free(&im);
}

/* Corrupt PNGs: every truncation and every byte flip is refused (CRCs cover every chunk). */
TEST(image_png_corrupt) {
    size_t n;
    uint8_t *p = slurp("test/data/png/c2_d8_i.png", &n), *q = malloc(n);
    CHECK(p, "missing test/data/png/c2_d8_i.png");
    zi_image im;
    for (size_t cut = 0; cut < n; cut++) {
        int rc = zi_png_decode(p, cut, &im);
        if (rc == 0) zi_image_free(&im);
        CHECK(rc == -1, "truncated at %zu of %zu accepted", cut, n);
    }
    for (size_t pos = 0; pos < n; pos++) {
        memcpy(q, p, n);
        q[pos] ^= 0x10;
        int rc = zi_png_decode(q, n, &im);
        if (rc == 0) zi_image_free(&im);
        CHECK(rc == -1, "flip at %zu accepted", pos);
    }
    free(q);
    free(p);
    /* valid CRCs around bad contents: IHDR with a bad depth, data too short, bad filter type */
    static const struct { int depth, ctype, rows; uint8_t filter; const char *why; } bad[] = {
        { 3, 2, 2, 0, "depth 3" }, { 8, 1, 2, 0, "colour type 1" }, { 8, 2, 1, 0, "missing rows" },
        { 8, 2, 2, 7, "filter type 7" }, { 8, 3, 2, 0, "palette image without PLTE" },
    };
    for (size_t b = 0; b < sizeof bad / sizeof *bad; b++) {
        uint8_t raw[2 * 7] = { 0 };             /* 2x2 RGB: 2 rows of 1 + 6 bytes */
        raw[0] = raw[7] = bad[b].filter;
        uint8_t *z;
        size_t nz;
        zi_zlib_compress(raw, (size_t)bad[b].rows * 7, &z, &nz);
        uint8_t buf[512];
        size_t k = 0;
        memcpy(buf, "\x89PNG\r\n\x1a\n", 8);
        k = 8;
        uint8_t ihdr[13] = { 0, 0, 0, 2, 0, 0, 0, 2, (uint8_t)bad[b].depth, (uint8_t)bad[b].ctype, 0, 0, 0 };
        const struct { const char *t; const uint8_t *d; size_t n; } ch[3] = { { "IHDR", ihdr, 13 }, { "IDAT", z, nz }, { "IEND", NULL, 0 } };
        for (int c = 0; c < 3; c++) {
            buf[k] = 0; buf[k + 1] = 0; buf[k + 2] = (uint8_t)(ch[c].n >> 8); buf[k + 3] = (uint8_t)ch[c].n;
            memcpy(buf + k + 4, ch[c].t, 4);
            if (ch[c].n) memcpy(buf + k + 8, ch[c].d, ch[c].n);
            uint32_t crc = zi_crc32(0, buf + k + 4, ch[c].n + 4);
            k += 8 + ch[c].n;
            buf[k] = (uint8_t)(crc >> 24); buf[k + 1] = (uint8_t)(crc >> 16); buf[k + 2] = (uint8_t)(crc >> 8); buf[k + 3] = (uint8_t)crc;
            k += 4;
        }
        free(z);
        int rc = zi_png_decode(buf, k, &im);
        if (rc == 0) zi_image_free(&im);
        CHECK(rc == -1, "%s accepted", bad[b].why);
        fprintf(stderr, "    %-28s -> %s\n", bad[b].why, zi_err());
    }
}

/* ---------------------------------------------------------------- JPEG */

static const char *jpeg_cases[] = {
    "b420", "b444", "b422", "b440", "b411", "gray", "rgb", "opt420", "rst420", "prog420", "prog444",
    "proggray", "progrst", "b420_tiny", "b422_tiny", "prog420_tiny",
};

/* Our decoder against djpeg (libjpeg-turbo 2.1.5, default settings = PIL's): bit-exact. */
TEST(image_jpeg_vs_libjpeg) {
    for (size_t i = 0; i < sizeof jpeg_cases / sizeof *jpeg_cases; i++) {
        char path[256];
        int w, h;
        snprintf(path, sizeof path, "test/data/jpeg/%s.ppm", jpeg_cases[i]);
        uint8_t *want = read_ppm(path, &w, &h);
        CHECK(want, "missing %s", path);
        snprintf(path, sizeof path, "test/data/jpeg/%s.jpg", jpeg_cases[i]);
        zi_image im;
        int rc = zi_image_load(path, &im);
        if (rc) free(want);
        CHECK(rc == 0, "%s: %s", jpeg_cases[i], zi_err());
        int ok = im.w == w && im.h == h && im.c == 3;
        int d = ok ? max_abs_diff(im.px, want, (size_t)w * h * 3) : 999;
        fprintf(stderr, "    %-14s %3dx%-3d max |ours - djpeg| = %d\n", jpeg_cases[i], w, h, d);
        zi_image_free(&im);
        free(want);
        CHECK(ok && d == 0, "%s differs from libjpeg", jpeg_cases[i]);
    }
}

/* Corrupt JPEGs: truncations are refused, byte flips never crash (run under `make debug` to
 * check memory safety), broken headers give errors. */
TEST(image_jpeg_corrupt) {
    static const char *files[] = { "test/data/jpeg/b420.jpg", "test/data/jpeg/progrst.jpg" };
    zi_image im;
    for (int f = 0; f < 2; f++) {
        size_t n;
        uint8_t *p = slurp(files[f], &n), *q = malloc(n);
        CHECK(p, "missing %s", files[f]);
        for (size_t cut = 0; cut < n; cut++) {
            int rc = zi_jpeg_decode(p, cut, &im);
            if (rc == 0) zi_image_free(&im);
            CHECK(rc == -1, "%s truncated at %zu of %zu accepted", files[f], cut, n);
        }
        int refused = 0, tries = 0;
        for (size_t pos = 2; pos < n; pos++) {
            for (int v = 0; v < 3; v++) {
                memcpy(q, p, n);
                q[pos] = v == 0 ? (uint8_t)(q[pos] ^ 0x41) : v == 1 ? 0xFF : 0x00;
                int rc = zi_jpeg_decode(q, n, &im);
                if (rc == 0) zi_image_free(&im);
                else refused++;
                tries++;
            }
        }
        fprintf(stderr, "    %s: %d of %d corrupted files refused, none crashed\n", files[f], refused, tries);
        free(p);
        free(q);
    }
    /* hand-made bad headers */
    static const struct { const char *why; const char *bytes; size_t n; } bad[] = {
        { "no SOI", "\xFF\xD9", 2 },
        { "only SOI/EOI", "\xFF\xD8\xFF\xD9", 4 },
        { "zero width", "\xFF\xD8\xFF\xC0\x00\x0B\x08\x00\x10\x00\x00\x01\x01\x11\x00\xFF\xD9", 17 },
        { "12-bit", "\xFF\xD8\xFF\xC0\x00\x0B\x0C\x00\x10\x00\x10\x01\x01\x11\x00\xFF\xD9", 17 },
        { "sampling 0", "\xFF\xD8\xFF\xC0\x00\x0B\x08\x00\x10\x00\x10\x01\x01\x00\x00\xFF\xD9", 17 },
        { "arithmetic", "\xFF\xD8\xFF\xC9\x00\x0B\x08\x00\x10\x00\x10\x01\x01\x11\x00\xFF\xD9", 17 },
        { "segment past end", "\xFF\xD8\xFF\xDB\x00\x43\x00", 7 },
        { "DHT too many codes", "\xFF\xD8\xFF\xC4\x00\x16\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x02\xFF\xD9", 28 },
        { "SOS before SOF", "\xFF\xD8\xFF\xDA\x00\x08\x01\x01\x00\x00\x3F\x00\xFF\xD9", 14 },
    };
    for (size_t b = 0; b < sizeof bad / sizeof *bad; b++) {
        int rc = zi_image_decode((const uint8_t *)bad[b].bytes, bad[b].n, &im);
        if (rc == 0) zi_image_free(&im);
        CHECK(rc == -1, "%s accepted", bad[b].why);
        fprintf(stderr, "    %-20s -> %s\n", bad[b].why, zi_err());
    }
}

TEST(image_load_errors) {
    zi_image im;
    CHECK(zi_image_load("test/data/no-such-file.png", &im) == -1, "missing file loaded");
    CHECK(strstr(zi_err(), "no-such-file.png"), "message: %s", zi_err());
    char path[512];
    snprintf(path, sizeof path, "%s/garbage.jpg", zt_tmpdir());
    CHECK(spit(path, "GIF89a....", 10) == 0, "spit");
    CHECK(zi_image_load(path, &im) == -1, "GIF accepted");
    CHECK(strstr(zi_err(), "garbage.jpg") && strstr(zi_err(), "not a PNG or JPEG"), "message: %s", zi_err());
    CHECK(spit(path, "", 0) == 0, "spit");
    CHECK(zi_image_load(path, &im) == -1, "empty file accepted");
}

/* ---------------------------------------------------------------- conversions */

TEST(image_float_conversions) {
    /* to 8 bits: clamp, then round half to even (numpy): find inputs whose product is
     * exactly k + 0.5 */
    float xs[6] = { -0.25f, 1.5f, NAN, 0.5f, 0, 0 };
    uint8_t want[6] = { 0, 255, 0, 128, 126, 3 };
    const float targets[2] = { 126.5f, 2.5f };
    for (int t = 0; t < 2; t++) {
        float x = targets[t] / 255.0f;
        for (int i = 0; i < 64 && x * 255.0f != targets[t]; i++)
            x = nextafterf(x, x * 255.0f < targets[t] ? 1.0f : 0.0f);
        CHECK(x * 255.0f == targets[t], "no float gives %g", targets[t]);
        xs[4 + t] = x;
    }
    want[5] = 2;        /* 2.5 -> 2 */
    float chw[18];
    for (int k = 0; k < 3; k++) for (int i = 0; i < 6; i++) chw[k * 6 + i] = xs[i];
    uint8_t rgb[18];
    zi_image_from_float(chw, 6, 1, rgb);
    for (int i = 0; i < 6; i++)
        CHECK(rgb[3 * i] == want[i] && rgb[3 * i + 2] == want[i], "x=%.9g -> %d, want %d", xs[i], rgb[3 * i], want[i]);

    /* to [-1, 1] */
    uint8_t px[3 * 4] = { 0, 255, 128, 1, 2, 3, 254, 127, 64, 9, 8, 7 };
    float f[12], g[12];
    zi_image_to_float(px, 4, 1, f, 0);
    zi_image_to_float(px, 4, 1, g, 1);
    for (int i = 0; i < 4; i++)
        for (int k = 0; k < 3; k++) {
            double ref = px[3 * i + k] * (2.0 / 255.0) - 1.0;
            CHECK(fabs(f[k * 4 + i] - ref) < 1e-6, "to_float(%d) = %.9g", px[3 * i + k], f[k * 4 + i]);
            CHECK(fabs(g[k * 4 + i] - ref) < 1.0 / 64, "bf16 to_float(%d) = %.9g", px[3 * i + k], g[k * 4 + i]);
        }
    CHECK(f[0] == -1.0f && f[4] == 1.0f, "0 -> %g, 255 -> %g", f[0], f[4]);
    /* bf16: 128·(2/255) = 1.00392 rounds up to 1 + 2^-7, so 128 maps to 0.0078125, not 0.0039 */
    CHECK(g[8] == 0.0078125f, "bf16 128 -> %g", g[8]);
}

/* ---------------------------------------------------------------- training resize */

TEST(image_train_size) {
    int tw, th;
    zi_train_size(1920, 1080, 0, 0, 1024 * 1024, &tw, &th);       /* r = 1.40625: 1365 x 768 -> 1360 x 768 */
    CHECK(tw == 1360 && th == 768, "1920x1080 -> %dx%d", tw, th);
    zi_train_size(100, 70, 0, 0, 1024 * 1024, &tw, &th);          /* small: floored, not upscaled */
    CHECK(tw == 96 && th == 64, "100x70 -> %dx%d", tw, th);
    zi_train_size(100, 70, 512, 768, 1024 * 1024, &tw, &th);      /* fixed size */
    CHECK(tw == 768 && th == 512, "fixed -> %dx%d", tw, th);
}

TEST(image_resize_crop) {
    /* PIL's bilinear weights, worked by hand. Shrink 4x2 -> 2x1: the triangle widens to
     * radius 2, weights (3,3,1)/7 and (1,3,3)/7 (then the two equal rows average). Grow 2 -> 4: weights 1, (3/4, 1/4), (1/4, 3/4), 1;
     * 22-bit fixed point with a +1/2 bias, then floor. */
    uint8_t a[8] = { 0, 70, 140, 210, 0, 70, 140, 210 }, b[2] = { 0, 100 };
    zi_image ia = { 4, 2, 1, a }, ib = { 2, 1, 1, b }, o;
    CHECK(zi_image_resize_crop(&ia, 2, 1, &o) == 0, "%s", zi_err());
    CHECK(o.w == 2 && o.h == 1 && o.px[0] == 50 && o.px[1] == 160, "4->2: %d %d", o.px[0], o.px[1]);
    zi_image_free(&o);
    CHECK(zi_image_resize_crop(&ib, 4, 2, &o) == 0, "%s", zi_err());
    CHECK(o.w == 4 && o.h == 2, "size %dx%d", o.w, o.h);
    static const uint8_t up[4] = { 0, 25, 75, 100 };
    for (int i = 0; i < 8; i++) CHECK(o.px[i] == up[i % 4], "2->4 [%d] = %d", i, o.px[i]);
    zi_image_free(&o);

    /* cover then centre crop: 100x50 -> 32x32 scales by 0.64 to 64x32, crops x from 16 */
    zi_image big = { 100, 50, 3, malloc(100 * 50 * 3) };
    for (int i = 0; i < 100 * 50 * 3; i++) big.px[i] = 77;
    CHECK(zi_image_resize_crop(&big, 32, 32, &o) == 0, "%s", zi_err());
    int flat = o.w == 32 && o.h == 32 && o.c == 3;
    for (int i = 0; flat && i < 32 * 32 * 3; i++) flat = o.px[i] == 77;
    CHECK(flat, "a flat image must stay flat");
    zi_image_free(&o);
    /* the crop offset: mark column x = 56..57 of the 64-wide resized image. Instead mark the
     * source: a same-size resize is the identity, so the crop alone is visible */
    for (int y = 0; y < 50; y++) for (int x = 0; x < 100; x++) big.px[(y * 100 + x) * 3] = (uint8_t)x;
    CHECK(zi_image_resize_crop(&big, 97, 50, &o) == 0, "%s", zi_err());   /* no resize, offset round(1.5) = 2 */
    CHECK(o.px[0] == 2 && o.px[3 * 96] == 98, "crop offset: first column %d", o.px[0]);
    zi_image_free(&o);
    CHECK(zi_image_resize_crop(&big, 95, 50, &o) == 0, "%s", zi_err());   /* round(2.5) = 2 (half to even) */
    CHECK(o.px[0] == 2, "crop offset: first column %d", o.px[0]);
    zi_image_free(&o);
    CHECK(zi_image_resize_crop(&big, 0, 50, &o) == -1, "0-wide target accepted");
    free(big.px);
}

/* against PIL 9.4 (Debian python3-pil): Image.resize(BILINEAR) + torchvision's centre crop,
 * shrinking and growing, cropping either axis; exact */
TEST(image_resize_vs_pil) {
    static const int sizes[][2] = { { 32, 32 }, { 48, 16 }, { 16, 16 }, { 80, 64 }, { 67, 20 }, { 20, 41 }, { 7, 5 }, { 131, 83 } };
    zi_image src;
    CHECK(zi_image_load("test/data/resize/src.png", &src) == 0, "%s", zi_err());
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        char path[256];
        int w, h;
        snprintf(path, sizeof path, "test/data/resize/%dx%d.ppm", sizes[i][0], sizes[i][1]);
        uint8_t *want = read_ppm(path, &w, &h);
        CHECK(want, "missing %s", path);
        zi_image o;
        int rc = zi_image_resize_crop(&src, w, h, &o);
        int d = rc == 0 ? max_abs_diff(o.px, want, (size_t)w * h * 3) : 999;
        fprintf(stderr, "    %dx%d -> %3dx%-3d max |ours - PIL| = %d\n", src.w, src.h, w, h, d);
        free(want);
        if (rc == 0) zi_image_free(&o);
        CHECK(d == 0, "%dx%d differs from PIL", w, h);
    }
    zi_image_free(&src);
}
