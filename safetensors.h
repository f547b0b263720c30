/* safetensors.h: the JSON parser, the safetensors reader/writer and model-directory configs
 * (safetensors.c). */
#ifndef ZIMAGE_SAFETENSORS_H
#define ZIMAGE_SAFETENSORS_H

#include "tensor.h"

/* ---------------------------------------------------------------- JSON
 * A strict parser (RFC 8259) building a read-only tree. Strings are UTF-8, NUL-terminated,
 * with their byte length kept (a "\u0000" escape may put a NUL inside). Objects keep their
 * members in file order; duplicate keys: the last one wins on lookup. */
typedef enum { ZJ_NULL, ZJ_FALSE, ZJ_TRUE, ZJ_NUM, ZJ_STR, ZJ_ARR, ZJ_OBJ } zj_type;
typedef struct zj zj;
struct zj {
    zj_type type;
    int n;              /* ZJ_ARR: elements, ZJ_OBJ: members */
    double num;         /* ZJ_NUM */
    const char *str;    /* ZJ_STR */
    size_t len;         /* ZJ_STR: bytes */
    zj *kids;           /* ZJ_ARR, ZJ_OBJ: n values */
    const char **keys;  /* ZJ_OBJ: n keys */
    size_t *keylens;    /* ZJ_OBJ: n key lengths */
};
/* Parses text[0..len). On error returns NULL and sets an error "WHAT: line L col C: reason". */
zj *zj_parse(const char *text, size_t len, const char *what);
zj *zj_load(const char *path);                  /* whole file; errors name the path */
void zj_free(zj *root);                         /* frees the tree returned by parse/load */
const zj *zj_get(const zj *obj, const char *key);   /* NULL when absent or obj is no object */
const zj *zj_at(const zj *arr, int i);
/* Typed accessors: the default when absent or of another type. */
double zj_num(const zj *obj, const char *key, double def);
const char *zj_str(const zj *obj, const char *key, const char *def);
int zj_bool(const zj *obj, const char *key, int def);

/* ---------------------------------------------------------------- safetensors
 * zi_st_open() accepts a .safetensors file, a *.safetensors.index.json (sharded checkpoint),
 * or a directory holding exactly one of those. Files are mmap'd read-only; every header,
 * shape, dtype and offset is checked against the file size before any tensor is exposed. */
#define ZI_MAXDIM 8
typedef struct {
    const char *name;
    zi_dtype dtype;
    int ndim;
    int64_t shape[ZI_MAXDIM];
    int64_t numel;
    const void *data;   /* inside the mapping */
    size_t nbytes;
    int shard;          /* which file of the set */
} zi_tensor;

typedef struct zi_st zi_st;
zi_st *zi_st_open(const char *path);
void zi_st_close(zi_st *st);                    /* unmaps everything: the memory goes back */
int zi_st_count(const zi_st *st);
const zi_tensor *zi_st_at(const zi_st *st, int i);
const zi_tensor *zi_st_get(const zi_st *st, const char *name);  /* NULL when absent */
const char *zi_st_meta(const zi_st *st, const char *key);       /* __metadata__ of the first file */
const char *zi_st_path(const zi_st *st);        /* what was opened, for messages */
int zi_st_nshards(const zi_st *st);
size_t zi_st_shard_bytes(const zi_st *st, int shard);

/* Checked access for model loaders: the tensor must exist with exactly this shape
 * (ndim values); errors name the file and tensor. */
const zi_tensor *zi_st_need(const zi_st *st, const char *name, int ndim, const int64_t *shape);
/* A float32 copy (malloc'd) of a float tensor of any float dtype; NULL on a non-float dtype. */
float *zi_tensor_f32(const zi_tensor *t);
/* View of a 2-D float tensor (or a conv weight flattened to [shape0, rest]) as a weight. */
zi_mat zi_tensor_mat(const zi_tensor *t);
/* zi_st_need, then: a float32 copy (malloc'd) of a float tensor (biases, norm weights), or a
 * weight view in a dtype the GEMM takes (F32, BF16, F16; returns 0 or -1). Errors name the
 * file and tensor. */
float *zi_st_need_f32(const zi_st *st, const char *name, int ndim, const int64_t *shape);
int zi_st_need_mat(const zi_st *st, const char *name, int ndim, const int64_t *shape, zi_mat *out);

/* Writer: collects tensors (the data is copied), then writes "path.tmp" and renames it to
 * path, so a reader never sees a half-written file. */
typedef struct zi_stw zi_stw;
zi_stw *zi_stw_new(void);
void zi_stw_add(zi_stw *w, const char *name, zi_dtype dtype, int ndim, const int64_t *shape,
                const void *data);
void zi_stw_add_f32(zi_stw *w, const char *name, int ndim, const int64_t *shape, const float *data);
void zi_stw_meta(zi_stw *w, const char *key, const char *value);
int zi_stw_write(zi_stw *w, const char *path);  /* 0 or -1 (error set); w stays valid */
void zi_stw_free(zi_stw *w);

/* ---------------------------------------------------------------- intermediate dumps
 * --dump: while zi_dump_begin() is active, every zi_dump() call records a float32 tensor
 * (copied) under its name; zi_dump_end() writes them all to the file (temp + rename).
 * Model code calls zi_dump() at the points the golden files name (te.hidden.K,
 * dit.block.NAME, latents.step{i}, ...); it costs nothing when no dump is active. */
void zi_dump_begin(void);
int zi_dump_active(void);
void zi_dump(const char *name, int ndim, const int64_t *shape, const float *data);
void zi_dump_i64(const char *name, int64_t n, const int64_t *data);
int zi_dump_end(const char *path);              /* 0 or -1 (error set); NULL discards the dump */

/* ---------------------------------------------------------------- model-directory configs
 * Reads DIR/SUB/config.json (or scheduler_config.json). Numbers may sit at top level or
 * under a nested object that real files use (e.g. "rope_parameters": {"rope_theta": ...}). */
zj *zi_config_load(const char *dir, const char *sub);
/* Looks KEY up at top level, then in nested objects (one level); the default when absent.
 * zi_cfg_need_* fail (error naming the file and key) when absent. */
double zi_cfg_num(const zj *cfg, const char *key, double def);
int zi_cfg_need_int(const zj *cfg, const char *key, int *out);
/* Reads an integer array into out[max]; returns its length or -1. */
int zi_cfg_ints(const zj *cfg, const char *key, int *out, int max);

/* Path helper: snprintf into a malloc'd string. */
char *zi_path(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The whole file (malloc'd, with a NUL after its *len bytes); NULL with "path: strerror". */
char *zi_read_file(const char *path, size_t *len);
/* Finishes an atomic file write; fd is open on tmp, a new file in path's directory. Writes the
 * n buffers, fsyncs, closes, renames tmp over path and fsyncs the directory: a reader (or a run
 * killed at any moment) sees the old file or the new one, never a part, and the new one
 * survives a power cut. On failure tmp is removed and the error names path, the failed step
 * and tmp. 0 or -1. */
int zi_write_atomic(int fd, const char *tmp, const char *path, int n, const void *const *buf, const size_t *len);

#endif
