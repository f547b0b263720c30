/* safetensors.c: the safetensors reader and writer, --dump collection and model-directory
 * configs. See safetensors.h.
 *
 * The safetensors format (https://github.com/huggingface/safetensors):
 *
 *   bytes [0, 8)        N, the header length, a little-endian uint64
 *   bytes [8, 8+N)      the header: a JSON object
 *                         { "__metadata__": {"key": "string value", ...},        (optional)
 *                           "NAME": {"dtype": "BF16", "shape": [3072, 3840],
 *                                    "data_offsets": [BEGIN, END]}, ... }
 *                       padded with spaces so that the data starts 8-byte aligned
 *   bytes [8+N, size)   the data area; tensor NAME is bytes [BEGIN, END) of it, row-major,
 *                       little-endian, END - BEGIN == numel * dtype size
 *
 * A large checkpoint is split into shards plus NAME.safetensors.index.json, whose
 * "weight_map" maps every tensor name to the shard file holding it.
 */
#include "safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* json.c: the file name an object was parsed from (for error messages). */
const char *zj_source(const zj *obj);

#define ST_MAX_HEADER (100u << 20)  /* the reference implementation's limit on N */

char *zi_path(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    if (n < 0) zi_die("out of memory (zi_path)");
    return s;
}

char *zi_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) { zi_seterr("%s: %s", path, strerror(errno)); return NULL; }
    errno = 0;
    size_t cap = 1 << 16, n = 0;
    char *buf = zi_malloc(cap);
    for (;;) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        cap *= 2;
        buf = zi_realloc(buf, cap);
    }
    int err = ferror(f) ? (errno ? errno : EIO) : 0;
    fclose(f);
    if (err) { free(buf); zi_seterr("%s: %s", path, strerror(err)); return NULL; }
    buf[n] = 0;                 /* n < cap */
    *len = n;
    return buf;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

/* ================================================================ reader */
typedef struct {
    char *path;
    unsigned char *base;        /* the mapping (munmap(base, maplen)) */
    size_t maplen;
    const unsigned char *map;   /* the file's bytes, inside the mapping */
    size_t size;
    zj *header;                 /* parsed header; tensor names point into it */
} st_shard;

struct zi_st {
    char *path;
    st_shard *shards;
    int nshards;
    zi_tensor *tensors;         /* sorted by name */
    int count;
    int *table;                 /* hash table of tensor indices, -1 = empty */
    size_t tmask;               /* table size - 1 (a power of two) */
};

static uint64_t hash_name(const char *s) { return zi_fnv1a(ZI_FNV1A_BASIS, s, strlen(s)); }

/* Reads a JSON number that must be a non-negative integer below 2^53 (exact in a double). */
static int json_uint(const zj *v, uint64_t *out) {
    if (!v || v->type != ZJ_NUM || !(v->num >= 0) || v->num > 9007199254740992.0 || v->num != floor(v->num))
        return -1;
    *out = (uint64_t)v->num;
    return 0;
}

/* Fills t from the header entry `info` of tensor `name`, checking everything against the
 * data area [0, data_size). */
static int parse_tensor_info(const char *path, const char *name, const zj *info, size_t data_size,
                             zi_tensor *t, uint64_t *begin) {
    const char *dt = zj_str(info, "dtype", NULL);
    const zj *shape = zj_get(info, "shape"), *offs = zj_get(info, "data_offsets");
    if (info->type != ZJ_OBJ || !dt || !shape || shape->type != ZJ_ARR || !offs || offs->type != ZJ_ARR)
        return zi_seterr("%s: tensor '%s': dtype, shape or data_offsets missing", path, name), -1;
    if (zi_dtype_parse(dt, &t->dtype))
        return zi_seterr("%s: tensor '%s': unknown dtype '%s'", path, name, dt), -1;
    if (shape->n > ZI_MAXDIM)
        return zi_seterr("%s: tensor '%s': %d dimensions (at most %d)", path, name, shape->n, ZI_MAXDIM), -1;
    /* numel * dtype size (at most 8) must not overflow: keep numel below 2^60 along the way */
    uint64_t numel = 1, lim = (uint64_t)1 << 60;
    t->ndim = shape->n;
    for (int i = 0; i < shape->n; i++) {
        uint64_t d;
        if (json_uint(&shape->kids[i], &d))
            return zi_seterr("%s: tensor '%s': bad shape", path, name), -1;
        if (d && numel > lim / d)
            return zi_seterr("%s: tensor '%s': shape too large", path, name), -1;
        numel *= d;
        t->shape[i] = (int64_t)d;
    }
    uint64_t nbytes = numel * zi_dtype_size(t->dtype), b, e;
    if (offs->n != 2 || json_uint(&offs->kids[0], &b) || json_uint(&offs->kids[1], &e))
        return zi_seterr("%s: tensor '%s': bad data_offsets", path, name), -1;
    if (b > e || e > data_size)
        return zi_seterr("%s: tensor '%s': data_offsets [%llu, %llu] outside the data area (%zu bytes)",
                         path, name, (unsigned long long)b, (unsigned long long)e, data_size), -1;
    if (e - b != nbytes)
        return zi_seterr("%s: tensor '%s': %llu data bytes, shape and dtype need %llu", path, name,
                         (unsigned long long)(e - b), (unsigned long long)nbytes), -1;
    t->name = name;
    t->numel = (int64_t)numel;
    t->nbytes = (size_t)nbytes;
    *begin = b;
    return 0;
}

typedef struct { uint64_t begin, end; const char *name; } st_span;

static int cmp_span(const void *a, const void *b) {
    const st_span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : x->end < y->end ? -1 : x->end > y->end;
}

/* Reads n bytes at offset off; -1 on error or a short file. */
static int pread_all(int fd, void *buf, size_t n, off_t off) {
    unsigned char *p = buf;
    while (n) {
        ssize_t k = pread(fd, p, n, off);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        off += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Maps the file so that its data area (at 8 + n) is 8-byte aligned, which is what lets
 * model code read a BF16 or F32 tensor in place. The Python library pads the header to make
 * 8 + n a multiple of 8, and then the file is simply mmap'd. Files from old writers without
 * the padding are read into anonymous memory at an offset that aligns the data area. */
static int map_file(st_shard *sh, int fd, uint64_t n) {
    size_t shift = (size_t)((8 - (8 + n) % 8) % 8);
    void *m = shift ? mmap(NULL, sh->size + shift, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                    : mmap(NULL, sh->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) return zi_seterr("%s: mmap: %s", sh->path, strerror(errno)), -1;
    sh->base = m;
    sh->maplen = sh->size + shift;
    if (shift) {
        if (pread_all(fd, sh->base + shift, sh->size, 0))
            return zi_seterr("%s: read error: %s", sh->path, strerror(errno)), -1;
        mprotect(sh->base, sh->maplen, PROT_READ);
    }
    sh->map = sh->base + shift;
    return 0;
}

/* Opens one file, checks its header and appends its tensors to st->tensors. */
static int open_shard(zi_st *st, const char *path) {
    st_shard *sh = &st->shards[st->nshards++];
    sh->path = zi_strdup(path);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return zi_seterr("%s: %s", path, strerror(errno)), -1;
    struct stat sb;
    unsigned char len8[8];
    int rc = 0;
    if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        rc = -1;
        zi_seterr("%s: not a regular file", path);
    } else if ((sh->size = (size_t)sb.st_size) < 8 || pread_all(fd, len8, 8, 0)) {
        rc = -1;
        zi_seterr("%s: truncated (%zu bytes, no safetensors header)", path, sh->size);
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0 && !rc; i--) n = n << 8 | len8[i];
    if (!rc && n > sh->size - 8) {
        rc = -1;
        zi_seterr("%s: header length %llu past the end of the file (%zu bytes)", path, (unsigned long long)n,
                  sh->size);
    } else if (!rc && n > ST_MAX_HEADER) {
        rc = -1;
        zi_seterr("%s: header too large (%llu bytes)", path, (unsigned long long)n);
    }
    if (!rc) rc = map_file(sh, fd, n);
    close(fd);      /* a mapping keeps the file */
    if (rc) return -1;
    if (!(sh->header = zj_parse((const char *)sh->map + 8, (size_t)n, path))) return -1;
    const zj *h = sh->header;
    if (h->type != ZJ_OBJ) return zi_seterr("%s: header is not a JSON object", path), -1;

    const unsigned char *data = sh->map + 8 + n;
    size_t data_size = sh->size - 8 - (size_t)n;
    st_span *spans = zi_malloc((size_t)h->n * sizeof *spans);
    int ns = 0;
    st->tensors = zi_realloc(st->tensors, (size_t)(st->count + h->n) * sizeof(zi_tensor));
    for (int i = 0; i < h->n && !rc; i++) {
        const char *name = h->keys[i];
        const zj *v = &h->kids[i];
        if (!strcmp(name, "__metadata__")) {
            if (v->type != ZJ_OBJ) rc = -1;
            for (int j = 0; j < v->n && !rc; j++)
                if (v->kids[j].type != ZJ_STR) rc = -1;
            if (rc) zi_seterr("%s: __metadata__ must map names to strings", path);
            continue;
        }
        if (strlen(name) != h->keylens[i]) {
            rc = -1;
            zi_seterr("%s: tensor name with a NUL byte", path);
            break;
        }
        zi_tensor *t = &st->tensors[st->count];
        uint64_t begin;
        memset(t, 0, sizeof *t);
        if ((rc = parse_tensor_info(path, name, v, data_size, t, &begin))) break;
        if (begin % zi_dtype_size(t->dtype)) {     /* the Python library never writes this */
            zi_seterr("%s: tensor '%s': data offset %llu not aligned to its dtype", path, name,
                      (unsigned long long)begin);
            rc = -1;
            break;
        }
        t->data = data + begin;
        t->shard = st->nshards - 1;
        spans[ns++] = (st_span){ begin, begin + t->nbytes, name };
        st->count++;
    }
    /* no two tensors may share bytes (empty tensors take none): in offset order, each
     * non-empty tensor must start at or after the end of every earlier one */
    qsort(spans, (size_t)ns, sizeof *spans, cmp_span);
    int last = -1;      /* the earlier span reaching furthest */
    for (int i = 0; i < ns && !rc; i++) {
        if (spans[i].begin == spans[i].end) continue;
        if (last >= 0 && spans[i].begin < spans[last].end) {
            rc = -1;
            zi_seterr("%s: tensors '%s' and '%s' overlap", path, spans[last].name, spans[i].name);
        }
        if (last < 0 || spans[i].end > spans[last].end) last = i;
    }
    free(spans);
    return rc;
}

static int cmp_tensor(const void *a, const void *b) {
    return strcmp(((const zi_tensor *)a)->name, ((const zi_tensor *)b)->name);
}

/* Sorts the tensors by name, rejects duplicates and builds the hash table. */
static int index_tensors(zi_st *st) {
    qsort(st->tensors, (size_t)st->count, sizeof(zi_tensor), cmp_tensor);
    for (int i = 1; i < st->count; i++)
        if (!strcmp(st->tensors[i].name, st->tensors[i - 1].name))
            return zi_seterr("%s: tensor '%s' appears twice", st->path, st->tensors[i].name), -1;
    size_t size = 16;
    while (size < 2 * (size_t)st->count) size *= 2;
    st->tmask = size - 1;
    st->table = zi_malloc(size * sizeof(int));
    for (size_t i = 0; i < size; i++) st->table[i] = -1;
    for (int i = 0; i < st->count; i++) {
        size_t h = hash_name(st->tensors[i].name) & st->tmask;
        while (st->table[h] >= 0) h = (h + 1) & st->tmask;    /* linear probing */
        st->table[h] = i;
    }
    return 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* NAME.safetensors.index.json: opens every shard named in weight_map (in name order, so that
 * shard 0 is "-00001-of-"), then checks that each listed tensor is in the shard it names. */
static int open_index(zi_st *st, const char *path) {
    zj *idx = zj_load(path);
    if (!idx) return -1;
    const zj *wm = zj_get(idx, "weight_map");
    int rc = 0;
    if (!wm || wm->type != ZJ_OBJ) { zj_free(idx); return zi_seterr("%s: no weight_map object", path), -1; }
    /* directory of the index: shard names are relative to it */
    const char *slash = strrchr(path, '/');
    int dirlen = slash ? (int)(slash - path + 1) : 0;
    /* the distinct shard file names, sorted */
    const char **files = zi_malloc((size_t)(wm->n + 1) * sizeof *files);
    int nf = 0;
    for (int i = 0; i < wm->n; i++) {
        if (wm->kids[i].type != ZJ_STR || strchr(wm->kids[i].str, '/') || !strcmp(wm->kids[i].str, "..")) {
            zi_seterr("%s: weight_map entry '%s' is not a file name", path, wm->keys[i]);
            rc = -1;
            break;
        }
        files[nf++] = wm->kids[i].str;
    }
    if (!rc) {
        qsort(files, (size_t)nf, sizeof *files, cmp_str);
        int k = 0;
        for (int i = 0; i < nf; i++)
            if (!k || strcmp(files[i], files[k - 1])) files[k++] = files[i];
        nf = k;
        st->shards = zi_calloc((size_t)(nf ? nf : 1), sizeof(st_shard));
    }
    for (int i = 0; i < nf && !rc; i++) {
        char *sp = zi_path("%.*s%s", dirlen, path, files[i]);
        if (access(sp, F_OK)) {
            zi_seterr("%s: shard '%s' is missing (%s)", path, files[i], strerror(errno));
            rc = -1;
        } else {
            rc = open_shard(st, sp);
        }
        free(sp);
    }
    if (!rc) rc = index_tensors(st);
    for (int i = 0; i < wm->n && !rc; i++) {
        const zi_tensor *t = zi_st_get(st, wm->keys[i]);
        if (!t || strcmp(files[t->shard], wm->kids[i].str)) {   /* shard i is files[i] */
            zi_seterr("%s: tensor '%s' is not in its shard '%s'", path, wm->keys[i], wm->kids[i].str);
            rc = -1;
        }
    }
    free(files);
    zj_free(idx);
    return rc;
}

/* A directory: its one *.safetensors.index.json, else its one *.safetensors. */
static char *find_in_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return zi_seterr("%s: %s", dir, strerror(errno)), NULL;
    char *index = NULL, *single = NULL;
    int nindex = 0, nsingle = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (ends_with(e->d_name, ".safetensors.index.json")) {
            if (!nindex++) index = zi_strdup(e->d_name);
        } else if (ends_with(e->d_name, ".safetensors")) {
            if (!nsingle++) single = zi_strdup(e->d_name);
        }
    }
    closedir(d);
    char *found = NULL;
    if (nindex == 1) found = zi_path("%s/%s", dir, index);
    else if (nindex > 1) zi_seterr("%s: %d *.safetensors.index.json files, expected one", dir, nindex);
    else if (nsingle == 1) found = zi_path("%s/%s", dir, single);
    else if (nsingle > 1) zi_seterr("%s: %d .safetensors files and no index.json", dir, nsingle);
    else zi_seterr("%s: no .safetensors file", dir);
    free(index);
    free(single);
    return found;
}

zi_st *zi_st_open(const char *path) {
    struct stat sb;
    if (stat(path, &sb)) return zi_seterr("%s: %s", path, strerror(errno)), NULL;
    zi_st *st = zi_calloc(1, sizeof *st);
    char *file = S_ISDIR(sb.st_mode) ? find_in_dir(path) : zi_strdup(path);
    int rc = -1;
    if (file) {
        st->path = file;
        if (ends_with(file, ".json")) {
            rc = open_index(st, file);
        } else {
            st->shards = zi_calloc(1, sizeof(st_shard));
            rc = open_shard(st, file);
            if (!rc) rc = index_tensors(st);
        }
    }
    if (rc) {
        zi_st_close(st);
        return NULL;
    }
    return st;
}

void zi_st_close(zi_st *st) {
    if (!st) return;
    for (int i = 0; i < st->nshards; i++) {
        if (st->shards[i].base) munmap(st->shards[i].base, st->shards[i].maplen);
        zj_free(st->shards[i].header);
        free(st->shards[i].path);
    }
    free(st->shards);
    free(st->tensors);
    free(st->table);
    free(st->path);
    free(st);
}

int zi_st_count(const zi_st *st) { return st->count; }
const char *zi_st_path(const zi_st *st) { return st->path; }
int zi_st_nshards(const zi_st *st) { return st->nshards; }

const zi_tensor *zi_st_at(const zi_st *st, int i) {
    return i >= 0 && i < st->count ? &st->tensors[i] : NULL;
}

size_t zi_st_shard_bytes(const zi_st *st, int shard) {
    return shard >= 0 && shard < st->nshards ? st->shards[shard].size : 0;
}

const zi_tensor *zi_st_get(const zi_st *st, const char *name) {
    if (!st->table) return NULL;
    for (size_t h = hash_name(name) & st->tmask; st->table[h] >= 0; h = (h + 1) & st->tmask)
        if (!strcmp(st->tensors[st->table[h]].name, name)) return &st->tensors[st->table[h]];
    return NULL;
}

const char *zi_st_meta(const zi_st *st, const char *key) {
    return st->nshards ? zj_str(zj_get(st->shards[0].header, "__metadata__"), key, NULL) : NULL;
}

/* "[a, b, c]" into buf */
static const char *fmt_shape(char *buf, size_t cap, int ndim, const int64_t *shape) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
    return buf;
}

const zi_tensor *zi_st_need(const zi_st *st, const char *name, int ndim, const int64_t *shape) {
    const zi_tensor *t = zi_st_get(st, name);
    if (!t) return zi_seterr("%s: tensor '%s' is missing", st->path, name), NULL;
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (!ok) {
        char got[256], want[256];
        zi_seterr("%s: tensor '%s' has shape %s, expected %s", st->path, name,
                  fmt_shape(got, sizeof got, t->ndim, t->shape), fmt_shape(want, sizeof want, ndim, shape));
        return NULL;
    }
    return t;
}

float *zi_tensor_f32(const zi_tensor *t) {
    switch (t->dtype) {
    case ZI_F32: case ZI_F16: case ZI_BF16: case ZI_F64: case ZI_F8_E4M3: case ZI_F8_E5M2: break;
    default:
        zi_seterr("tensor '%s': dtype %s is not a float type", t->name, zi_dtype_name(t->dtype));
        return NULL;
    }
    float *out = zi_malloc((size_t)t->numel * sizeof(float));
    zi_to_f32(out, t->data, t->dtype, (size_t)t->numel);
    return out;
}

zi_mat zi_tensor_mat(const zi_tensor *t) {
    int64_t rows = t->ndim ? t->shape[0] : 1;
    return (zi_mat){ .data = t->data, .dtype = t->dtype, .rows = rows, .cols = rows ? t->numel / rows : 0 };
}

float *zi_st_need_f32(const zi_st *st, const char *name, int ndim, const int64_t *shape) {
    const zi_tensor *t = zi_st_need(st, name, ndim, shape);
    if (!t) return NULL;
    float *v = zi_tensor_f32(t);
    if (!v) zi_seterr("%s: %s is not a float tensor", st->path, name);
    return v;
}

int zi_st_need_mat(const zi_st *st, const char *name, int ndim, const int64_t *shape, zi_mat *out) {
    const zi_tensor *t = zi_st_need(st, name, ndim, shape);
    if (!t) return -1;
    if (t->dtype != ZI_F32 && t->dtype != ZI_BF16 && t->dtype != ZI_F16) {
        zi_seterr("%s: %s has dtype %s (expected F32, BF16 or F16)", st->path, name, zi_dtype_name(t->dtype));
        return -1;
    }
    *out = zi_tensor_mat(t);
    return 0;
}

/* ================================================================ writer */
typedef struct {
    char *name;
    zi_dtype dtype;
    int ndim;
    int64_t shape[ZI_MAXDIM];
    void *data;
    size_t nbytes;
} stw_tensor;

struct zi_stw {
    stw_tensor *t;
    int n, cap;
    char **meta;        /* key, value, key, value, ... */
    int nmeta;
};

zi_stw *zi_stw_new(void) { return zi_calloc(1, sizeof(zi_stw)); }

void zi_stw_add(zi_stw *w, const char *name, zi_dtype dtype, int ndim, const int64_t *shape,
                const void *data) {
    if (ndim < 0 || ndim > ZI_MAXDIM) zi_die("zi_stw_add: '%s' has %d dimensions", name, ndim);
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) numel *= (size_t)shape[i];
    stw_tensor *t = NULL;
    for (int i = 0; i < w->n && !t; i++)       /* a name added twice: the last one wins */
        if (!strcmp(w->t[i].name, name)) {
            t = &w->t[i];
            free(t->data);
        }
    if (!t) {
        if (w->n == w->cap) {
            w->cap = w->cap ? 2 * w->cap : 64;
            w->t = zi_realloc(w->t, (size_t)w->cap * sizeof *w->t);
        }
        t = &w->t[w->n++];
        t->name = zi_strdup(name);
    }
    t->dtype = dtype;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->nbytes = numel * zi_dtype_size(dtype);
    t->data = zi_malloc(t->nbytes);
    memcpy(t->data, data, t->nbytes);
}

void zi_stw_add_f32(zi_stw *w, const char *name, int ndim, const int64_t *shape, const float *data) {
    zi_stw_add(w, name, ZI_F32, ndim, shape, data);
}

void zi_stw_meta(zi_stw *w, const char *key, const char *value) {
    for (int i = 0; i < w->nmeta; i++)
        if (!strcmp(w->meta[2 * i], key)) {
            free(w->meta[2 * i + 1]);
            w->meta[2 * i + 1] = zi_strdup(value);
            return;
        }
    w->meta = zi_realloc(w->meta, (size_t)(w->nmeta + 1) * 2 * sizeof(char *));
    w->meta[2 * w->nmeta] = zi_strdup(key);
    w->meta[2 * w->nmeta + 1] = zi_strdup(value);
    w->nmeta++;
}

void zi_stw_free(zi_stw *w) {
    if (!w) return;
    for (int i = 0; i < w->n; i++) { free(w->t[i].name); free(w->t[i].data); }
    for (int i = 0; i < 2 * w->nmeta; i++) free(w->meta[i]);
    free(w->t);
    free(w->meta);
    free(w);
}

/* A growable byte buffer for the header. */
typedef struct { char *s; size_t n, cap; } strbuf;

static void sb_put(strbuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        while (b->n + n + 1 > b->cap) b->cap = b->cap ? 2 * b->cap : 4096;
        b->s = zi_realloc(b->s, b->cap);
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
}

static void sb_printf(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(strbuf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    sb_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* A JSON string, escaped as serde_json does (", \, control characters; UTF-8 kept as is). */
static void sb_json_str(strbuf *b, const char *s) {
    sb_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        switch (c) {
        case '"': sb_put(b, "\\\"", 2); break;
        case '\\': sb_put(b, "\\\\", 2); break;
        case '\b': sb_put(b, "\\b", 2); break;
        case '\f': sb_put(b, "\\f", 2); break;
        case '\n': sb_put(b, "\\n", 2); break;
        case '\r': sb_put(b, "\\r", 2); break;
        case '\t': sb_put(b, "\\t", 2); break;
        default:
            if (c < 0x20) sb_printf(b, "\\u%04x", c);
            else sb_put(b, s, 1);
        }
    }
    sb_put(b, "\"", 1);
}

/* The data order of the Python library: by dtype, larger alignment first (its Dtype enum
 * order, descending), then by name. */
static int dtype_rank(zi_dtype t) {
    static const int rank[ZI_NDTYPES] = {
        [ZI_BOOL] = 0, [ZI_U8] = 1, [ZI_I8] = 2, [ZI_F8_E5M2] = 3, [ZI_F8_E4M3] = 4, [ZI_I16] = 5,
        [ZI_F16] = 7, [ZI_BF16] = 8, [ZI_I32] = 9, [ZI_F32] = 11, [ZI_F64] = 12, [ZI_I64] = 13,
    };
    return rank[t];
}

static int cmp_stw(const void *a, const void *b) {
    const stw_tensor *x = *(stw_tensor *const *)a, *y = *(stw_tensor *const *)b;
    int rx = dtype_rank(x->dtype), ry = dtype_rank(y->dtype);
    return rx != ry ? ry - rx : strcmp(x->name, y->name);
}

static int write_all(int fd, const void *p, size_t n) {
    const char *s = p;
    while (n) {
        ssize_t k = write(fd, s, n > (1u << 30) ? (1u << 30) : n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        s += k;
        n -= (size_t)k;
    }
    return 0;
}

/* fsync of the directory holding path, so that a rename into it survives a power cut */
static int sync_dir(const char *path) {
    const char *slash = strrchr(path, '/');
    char *dir = slash ? zi_path("%.*s", (int)(slash - path) + (slash == path), path) : zi_strdup(".");
    int fd = open(dir, O_RDONLY | O_DIRECTORY), rc = fd < 0 ? -1 : fsync(fd);
    if (fd >= 0) close(fd);
    free(dir);
    return rc;
}

/* Test hook: ZIMAGE_TEST_SLOW_WRITE=MS sleeps MS milliseconds between writing a file's
 * temporary and renaming it, so that test/test_crash.c can kill a writer inside that window. */
static void test_slow_write(void) {
    const char *ms = getenv("ZIMAGE_TEST_SLOW_WRITE");
    if (ms && atoi(ms) > 0) usleep((useconds_t)atoi(ms) * 1000);
}

int zi_write_atomic(int fd, const char *tmp, const char *path, int n, const void *const *buf, const size_t *len) {
    const char *what = NULL;
    for (int i = 0; i < n && !what; i++)
        if (write_all(fd, buf[i], len[i])) what = "write";
    if (!what && fsync(fd)) what = "fsync";
    if (close(fd) && !what) what = "close";
    if (!what) test_slow_write();
    if (!what && rename(tmp, path)) what = "rename";
    if (what) { int e = errno; unlink(tmp); errno = e; }
    else if (sync_dir(path)) what = "fsync of the directory";
    if (what) zi_seterr("%s: %s failed (temporary %s): %s", path, what, tmp, strerror(errno));
    return what ? -1 : 0;
}

/* The file is written to PATH.tmp and committed by zi_write_atomic. */
int zi_stw_write(zi_stw *w, const char *path) {
    stw_tensor **order = zi_malloc((size_t)(w->n ? w->n : 1) * sizeof *order);
    for (int i = 0; i < w->n; i++) order[i] = &w->t[i];
    qsort(order, (size_t)w->n, sizeof *order, cmp_stw);

    /* the header: compact JSON, __metadata__ first (keys in the order they were added, as
     * the Python library keeps a dict's order), then the tensors in data order */
    strbuf h = {0};
    sb_put(&h, "{", 1);
    if (w->nmeta) {
        sb_put(&h, "\"__metadata__\":{", 16);
        for (int i = 0; i < w->nmeta; i++) {
            if (i) sb_put(&h, ",", 1);
            sb_json_str(&h, w->meta[2 * i]);
            sb_put(&h, ":", 1);
            sb_json_str(&h, w->meta[2 * i + 1]);
        }
        sb_put(&h, "}", 1);
    }
    size_t offset = 0;
    for (int i = 0; i < w->n; i++) {
        const stw_tensor *t = order[i];
        if (i || w->nmeta) sb_put(&h, ",", 1);
        sb_json_str(&h, t->name);
        sb_printf(&h, ":{\"dtype\":\"%s\",\"shape\":[", zi_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++) sb_printf(&h, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        sb_printf(&h, "],\"data_offsets\":[%zu,%zu]}", offset, offset + t->nbytes);
        offset += t->nbytes;
    }
    sb_put(&h, "}", 1);
    while (h.n % 8) sb_put(&h, " ", 1);     /* the data area starts 8-byte aligned */

    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)h.n >> (8 * i));

    /* a fixed temporary name: a writer killed half-way leaves PATH.tmp, which the next write
     * of PATH truncates and reuses (one writer per path at a time) */
    char *tmp = zi_path("%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644), rc = -1;
    if (fd < 0) zi_seterr("%s: create failed (temporary %s): %s", path, tmp, strerror(errno));
    else {
        const void **buf = zi_malloc((size_t)(w->n + 2) * sizeof *buf);
        size_t *len = zi_malloc((size_t)(w->n + 2) * sizeof *len);
        buf[0] = len8, len[0] = 8;
        buf[1] = h.s, len[1] = h.n;
        for (int i = 0; i < w->n; i++) buf[i + 2] = order[i]->data, len[i + 2] = order[i]->nbytes;
        rc = zi_write_atomic(fd, tmp, path, w->n + 2, buf, len);
        free(buf);
        free(len);
    }
    free(tmp);
    free(h.s);
    free(order);
    return rc;
}

/* ================================================================ --dump */
/* The collector: non-NULL while a dump is active. Atomic so that zi_dump() from any thread
 * can test it without the lock (the common case: no dump, nothing to do). */
static _Atomic(zi_stw *) dump_writer;
static pthread_mutex_t dump_lock = PTHREAD_MUTEX_INITIALIZER;

void zi_dump_begin(void) {
    pthread_mutex_lock(&dump_lock);
    if (!dump_writer) dump_writer = zi_stw_new();
    pthread_mutex_unlock(&dump_lock);
}

int zi_dump_active(void) { return dump_writer != NULL; }

static void dump_add(const char *name, zi_dtype dt, int ndim, const int64_t *shape, const void *data) {
    if (!dump_writer) return;
    pthread_mutex_lock(&dump_lock);
    if (dump_writer) zi_stw_add(dump_writer, name, dt, ndim, shape, data);
    pthread_mutex_unlock(&dump_lock);
}

void zi_dump(const char *name, int ndim, const int64_t *shape, const float *data) {
    dump_add(name, ZI_F32, ndim, shape, data);
}

void zi_dump_i64(const char *name, int64_t n, const int64_t *data) {
    dump_add(name, ZI_I64, 1, &n, data);
}

int zi_dump_end(const char *path) {
    pthread_mutex_lock(&dump_lock);
    zi_stw *w = dump_writer;
    dump_writer = NULL;
    pthread_mutex_unlock(&dump_lock);
    if (!w) return zi_seterr("%s: no dump was started", path ? path : "dump"), -1;
    int rc = path ? zi_stw_write(w, path) : 0;
    zi_stw_free(w);
    return rc;
}

/* ================================================================ configs */
zj *zi_config_load(const char *dir, const char *sub) {
    if (!sub) {
        char *p = zi_path("%s/model_index.json", dir);
        zj *cfg = zj_load(p);
        free(p);
        return cfg;
    }
    const char *names[] = { "config.json", "scheduler_config.json" };
    for (int i = 0; i < 2; i++) {
        char *p = *sub ? zi_path("%s/%s/%s", dir, sub, names[i]) : zi_path("%s/%s", dir, names[i]);
        if (!access(p, F_OK)) {
            zj *cfg = zj_load(p);
            if (cfg && cfg->type != ZJ_OBJ) {
                zi_seterr("%s: not a JSON object", p);
                zj_free(cfg);
                cfg = NULL;
            }
            free(p);
            return cfg;
        }
        free(p);
    }
    zi_seterr("%s%s%s: no config.json or scheduler_config.json", dir, *sub ? "/" : "", sub);
    return NULL;
}

/* KEY at top level, else in the first nested object that has it. */
static const zj *cfg_find(const zj *cfg, const char *key) {
    const zj *v = zj_get(cfg, key);
    if (v || !cfg || cfg->type != ZJ_OBJ) return v;
    for (int i = 0; i < cfg->n; i++)
        if ((v = zj_get(&cfg->kids[i], key))) return v;
    return NULL;
}

/* Booleans count as 0/1 ("qk_norm": true); null and other types give the default. */
double zi_cfg_num(const zj *cfg, const char *key, double def) {
    const zj *v = cfg_find(cfg, key);
    if (!v) return def;
    return v->type == ZJ_NUM ? v->num : v->type == ZJ_TRUE ? 1 : v->type == ZJ_FALSE ? 0 : def;
}

static const char *cfg_name(const zj *cfg) {
    const char *s = zj_source(cfg);
    return s ? s : "config";
}

int zi_cfg_need_int(const zj *cfg, const char *key, int *out) {
    const zj *v = cfg_find(cfg, key);
    if (!v) return zi_seterr("%s: '%s' is missing", cfg_name(cfg), key), -1;
    if (v->type != ZJ_NUM || v->num != floor(v->num) || fabs(v->num) > 2147483647.0)
        return zi_seterr("%s: '%s' is not an integer", cfg_name(cfg), key), -1;
    *out = (int)v->num;
    return 0;
}

int zi_cfg_ints(const zj *cfg, const char *key, int *out, int max) {
    const zj *v = cfg_find(cfg, key);
    if (!v) return zi_seterr("%s: '%s' is missing", cfg_name(cfg), key), -1;
    if (v->type != ZJ_ARR) return zi_seterr("%s: '%s' is not an array", cfg_name(cfg), key), -1;
    if (v->n > max)
        return zi_seterr("%s: '%s' has %d values, at most %d expected", cfg_name(cfg), key, v->n, max), -1;
    for (int i = 0; i < v->n; i++) {
        const zj *e = &v->kids[i];
        if (e->type != ZJ_NUM || e->num != floor(e->num) || fabs(e->num) > 2147483647.0)
            return zi_seterr("%s: '%s' holds a value that is not an integer", cfg_name(cfg), key), -1;
        out[i] = (int)e->num;
    }
    return v->n;
}
