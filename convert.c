/* convert.c: safetensors files written as a stream, and the float32 -> bfloat16 conversion of a
 * model directory (`sample --convert IN_DIR OUT_DIR`).
 *
 * Why streaming: a checkpoint is larger than the memory of many machines that can run it from
 * an mmap (the DiT alone is 12.3 GB in bf16, 24.6 GB in fp32). zi_stw (safetensors.c) collects
 * copies of every tensor before writing; here the header is written first from the tensors'
 * names, dtypes and shapes (the data offsets follow from them), then each tensor's bytes in that
 * order, chunk by chunk. The conversion reads the input through its mmap and drops each tensor's
 * pages once converted: the memory used is one chunk, never a copy of the model.
 */
#include "zimage.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------- streaming writer */
/* A JSON string literal of s (escapes '"', '\\' and control characters). */
static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

int64_t zi_st_entry_bytes(const zi_st_entry *e) {
    int64_t n = 1;
    for (int d = 0; d < e->ndim; d++) n *= e->shape[d];
    return n * (int64_t)zi_dtype_size(e->dtype);
}

/* The header: 8-byte little-endian length, then the JSON, padded with spaces to a multiple of 8
 * so that the data (and every tensor of 4-byte floats in it) starts aligned. */
int zi_st_write_header(FILE *f, const zi_st_entry *e, int n, const char *path) {
    char *json = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&json, &len);
    if (!m) {
        zi_seterr("%s: out of memory for the header", path);
        return -1;
    }
    int64_t off = 0;
    fputs("{\"__metadata__\":{\"format\":\"pt\"}", m);
    for (int i = 0; i < n; i++) {
        int64_t nb = zi_st_entry_bytes(&e[i]);
        fputc(',', m);
        json_str(m, e[i].name);
        fprintf(m, ":{\"dtype\":\"%s\",\"shape\":[", zi_dtype_name(e[i].dtype));
        for (int d = 0; d < e[i].ndim; d++) fprintf(m, "%s%lld", d ? "," : "", (long long)e[i].shape[d]);
        fprintf(m, "],\"data_offsets\":[%lld,%lld]}", (long long)off, (long long)(off + nb));
        off += nb;
    }
    fputc('}', m);
    while ((ftell(m) & 7) != 0) fputc(' ', m);
    fclose(m);
    uint8_t hl[8];
    for (int i = 0; i < 8; i++) hl[i] = (uint8_t)((uint64_t)len >> (8 * i));
    int ok = fwrite(hl, 1, 8, f) == 8 && fwrite(json, 1, len, f) == len;
    free(json);
    if (!ok) zi_seterr("%s: write failed: %s", path, strerror(errno));
    return ok ? 0 : -1;
}

/* ---------------------------------------------------------------- conversion */
enum { CHUNK = 1 << 20 };   /* values converted per write */

/* Lets the kernel drop the pages of [p, p + n) of a read-only file mapping (they are clean): the
 * input does not accumulate in the process's memory as the conversion walks through it. */
static void drop_pages(const void *p, size_t n) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)p & ~(page - 1);
    madvise((void *)a, (uintptr_t)p + n - a, MADV_DONTNEED);
}

/* One tensor's bytes to f: float32 rounded to bfloat16, anything else as it is. */
static int write_tensor(FILE *f, const zi_tensor *t, uint16_t *buf) {
    if (t->dtype != ZI_F32) return fwrite(t->data, 1, t->nbytes, f) == t->nbytes ? 0 : -1;
    const float *x = t->data;
    for (int64_t i = 0; i < t->numel; i += CHUNK) {
        int64_t n = t->numel - i < CHUNK ? t->numel - i : CHUNK;
        for (int64_t j = 0; j < n; j++) buf[j] = zi_f32_to_bf16(x[i + j]);
        if (fwrite(buf, 2, (size_t)n, f) != (size_t)n) return -1;
    }
    return 0;
}

/* in (one .safetensors file) -> out with float32 tensors as bfloat16. *bytes: the tensor data
 * written. Written as out.tmp, then renamed. */
static int convert_file(const char *in, const char *out, int64_t *bytes, int verbose) {
    zi_st *st = zi_st_open(in);
    if (!st) return -1;
    int n = zi_st_count(st), rc = -1, nconv = 0;
    zi_st_entry *e = zi_calloc(n ? n : 1, sizeof *e);
    *bytes = 0;
    for (int i = 0; i < n; i++) {
        const zi_tensor *t = zi_st_at(st, i);
        e[i].name = t->name;
        e[i].dtype = t->dtype == ZI_F32 ? ZI_BF16 : t->dtype;
        e[i].ndim = t->ndim;
        memcpy(e[i].shape, t->shape, sizeof e[i].shape);
        *bytes += zi_st_entry_bytes(&e[i]);
        nconv += t->dtype == ZI_F32;
    }
    char *tmp = zi_path("%s.tmp", out);
    FILE *f = fopen(tmp, "wb");
    uint16_t *buf = zi_malloc(CHUNK * sizeof *buf);
    if (!f) { zi_seterr("%s: %s", tmp, strerror(errno)); goto done; }
    if (zi_st_write_header(f, e, n, tmp)) goto done;
    for (int i = 0; i < n; i++) {
        const zi_tensor *t = zi_st_at(st, i);
        if (write_tensor(f, t, buf)) { zi_seterr("%s: write failed: %s", tmp, strerror(errno)); goto done; }
        drop_pages(t->data, t->nbytes);
    }
    if (fclose(f)) { f = NULL; zi_seterr("%s: write failed: %s", tmp, strerror(errno)); goto done; }
    f = NULL;
    if (rename(tmp, out)) { zi_seterr("%s: %s", out, strerror(errno)); goto done; }
    if (verbose) fprintf(stderr, "%s: %d tensors, %d converted to BF16, %.1f MB\n", out, n, nconv, *bytes / 1e6);
    rc = 0;
done:
    if (f) fclose(f);
    if (rc) remove(tmp);
    free(tmp); free(buf); free(e);
    zi_st_close(st);
    return rc;
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

static int copy_file(const char *in, const char *out) {
    FILE *a = fopen(in, "rb"), *b = a ? fopen(out, "wb") : NULL;
    int rc = -1;
    if (!a || !b) { zi_seterr("%s: %s", a ? out : in, strerror(errno)); goto done; }
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, a)) > 0)
        if (fwrite(buf, 1, n, b) != n) { zi_seterr("%s: write failed", out); goto done; }
    rc = ferror(a) ? (zi_seterr("%s: read failed", in), -1) : 0;
done:
    if (a) fclose(a);
    if (b && fclose(b) && !rc) { zi_seterr("%s: write failed", out); rc = -1; }
    return rc;
}

/* A sharded checkpoint's index: the same weight_map, with total_size the converted data bytes
 * (sum over the shards it names, converted before it). */
static int convert_index(const char *in, const char *out, int64_t total) {
    zj *idx = zj_load(in);
    if (!idx) return -1;
    const zj *map = zj_get(idx, "weight_map");
    if (!map || map->type != ZJ_OBJ) {
        zi_seterr("%s: no weight_map", in);
        zj_free(idx);
        return -1;
    }
    FILE *f = fopen(out, "w");
    if (!f) { zi_seterr("%s: %s", out, strerror(errno)); zj_free(idx); return -1; }
    fprintf(f, "{\n  \"metadata\": {\n    \"total_size\": %lld\n  },\n  \"weight_map\": {", (long long)total);
    for (int i = 0; i < map->n; i++) {
        fputs(i ? ",\n    " : "\n    ", f);
        json_str(f, map->keys[i]);
        fputs(": ", f);
        json_str(f, map->kids[i].type == ZJ_STR ? map->kids[i].str : "");
    }
    fputs("\n  }\n}\n", f);
    zj_free(idx);
    if (fclose(f)) { zi_seterr("%s: write failed", out); return -1; }
    return 0;
}

static int is_dir(const char *path) {
    struct stat s;
    return !stat(path, &s) && S_ISDIR(s.st_mode);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* One directory level: subdirectories recursively, .safetensors converted, index files
 * rewritten (after the shards, for their size), everything else copied. */
static int convert_dir(const char *in, const char *out, int verbose) {
    DIR *d = opendir(in);
    if (!d) { zi_seterr("%s: %s", in, strerror(errno)); return -1; }
    if (mkdir(out, 0777) && errno != EEXIST) {
        zi_seterr("%s: %s", out, strerror(errno));
        closedir(d);
        return -1;
    }
    char **names = NULL;
    int n = 0, rc = 0;
    for (struct dirent *de; (de = readdir(d));)
        if (de->d_name[0] != '.') {
            names = zi_realloc(names, (n + 1) * sizeof *names);
            names[n++] = zi_strdup(de->d_name);
        }
    closedir(d);
    qsort(names, n, sizeof *names, cmp_str);
    int64_t shard_bytes = 0;
    for (int pass = 0; pass < 2 && !rc; pass++)      /* pass 1: the index files */
        for (int i = 0; i < n && !rc; i++) {
            char *a = zi_path("%s/%s", in, names[i]), *b = zi_path("%s/%s", out, names[i]);
            int index = ends_with(names[i], ".safetensors.index.json");
            if (pass == 0 && is_dir(a)) rc = convert_dir(a, b, verbose);
            else if (pass == 0 && ends_with(names[i], ".safetensors")) {
                int64_t bytes;
                rc = convert_file(a, b, &bytes, verbose);
                shard_bytes += bytes;
            } else if (pass == 1 && index) rc = convert_index(a, b, shard_bytes);
            else if (pass == 0 && !index) rc = copy_file(a, b);
            free(a); free(b);
        }
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
    return rc;
}

int zi_convert_bf16(const char *in_dir, const char *out_dir, int verbose) {
    if (!is_dir(in_dir)) {
        zi_seterr("--convert: %s is not a directory", in_dir);
        return -1;
    }
    char *a = realpath(in_dir, NULL), *b = realpath(out_dir, NULL);
    int same = a && b && !strcmp(a, b);
    free(a); free(b);
    if (same) {
        zi_seterr("--convert: %s: input and output are the same directory", out_dir);
        return -1;
    }
    return convert_dir(in_dir, out_dir, verbose);
}
