/* trainer.c: the pieces of LoRA training that do not depend on a model (training.md):
 * dataset metadata, DiffSynth-Studio's training grid and loss weights, our counter-based
 * random numbers, the trainable LoRA with AdamW + ConstantLR, the flow-matching loss, and the
 * training-state files that make --resume exact. The program train.c drives them.
 *
 * Faithfulness notes (DiffSynth runs in bf16, we in float32):
 *   - the timestep grid, weights and the loss follow DiffSynth's float32 arithmetic; DiffSynth
 *     rounds the chosen timestep to bf16 before using it (training.md §6.4), which collapses the
 *     1000 noise levels onto 353 and moves the DiT's time input by up to 2.7/1000. We do what
 *     DiffSynth does with torch_dtype=float32: σ = grid[i] and t = 1 − σ exactly.
 *   - LoRA master weights, gradients and AdamW moments are float32 (DiffSynth keeps them in
 *     bf16, where an update of lr = 1e-4 is a few ulps).
 *   - DiffSynth draws noise and timesteps from torch's global RNG without a seed; we draw them
 *     from a hash of (--seed, purpose, counter), so a run is a function of its seed and a
 *     resumed run continues with exactly the numbers the uninterrupted run would have used. */
#include "zimage.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ================================================================ metadata */

static void add_item(zi_train_meta *m, const char *image, size_t ilen, const char *prompt, size_t plen) {
    m->items = zi_realloc(m->items, (size_t)(m->n + 1) * sizeof *m->items);
    m->items[m->n].image = strndup(image, ilen);
    m->items[m->n].prompt = strndup(prompt, plen);
    if (!m->items[m->n].image || !m->items[m->n].prompt) zi_die("out of memory");
    m->n++;
}

/* One CSV record (RFC 4180): fields separated by ',', optionally quoted with '"' ("" is a
 * quote inside), quoted fields may hold commas and newlines; records end at LF or CRLF.
 * Unquoted fields are taken verbatim (as pandas does). Returns the position after the record;
 * fields[i] are malloc'd copies, *nf their count. *bad is set on an unterminated quote. */
static const char *csv_record(const char *p, const char *end, char ***fields, size_t **lens, int *nf, int *bad) {
    *nf = 0;
    *fields = NULL;
    *lens = NULL;
    for (;;) {
        char *buf = zi_malloc((size_t)(end - p) + 1);
        size_t n = 0;
        if (p < end && *p == '"') {
            p++;
            for (;;) {
                if (p >= end) { *bad = 1; break; }
                if (*p == '"') {
                    if (p + 1 < end && p[1] == '"') { buf[n++] = '"'; p += 2; continue; }
                    p++;
                    break;
                }
                buf[n++] = *p++;
            }
            /* text between the closing quote and the separator is kept, as pandas does */
            while (p < end && *p != ',' && *p != '\n' && !(*p == '\r' && p + 1 < end && p[1] == '\n')) buf[n++] = *p++;
        } else {
            while (p < end && *p != ',' && *p != '\n' && !(*p == '\r' && p + 1 < end && p[1] == '\n')) buf[n++] = *p++;
        }
        buf[n] = 0;
        *fields = zi_realloc(*fields, (size_t)(*nf + 1) * sizeof **fields);
        *lens = zi_realloc(*lens, (size_t)(*nf + 1) * sizeof **lens);
        (*fields)[*nf] = buf;
        (*lens)[*nf] = n;
        (*nf)++;
        if (p < end && *p == ',') { p++; continue; }
        if (p < end && *p == '\r') p++;
        if (p < end && *p == '\n') p++;
        return p;
    }
}

static void free_fields(char **f, size_t *l, int n) {
    for (int i = 0; i < n; i++) free(f[i]);
    free(f);
    free(l);
}

static int blank_record(char **f, int n) { return n == 1 && f[0][0] == 0; }

static int parse_csv(const char *text, size_t len, const char *path, zi_train_meta *m) {
    const char *p = text, *end = text + len;
    if (len >= 3 && !memcmp(p, "\xEF\xBB\xBF", 3)) p += 3;      /* UTF-8 byte order mark */
    char **h;
    size_t *hl;
    int nh, bad = 0, col_img = -1, col_prompt = -1;
    do p = csv_record(p, end, &h, &hl, &nh, &bad);
    while (!bad && blank_record(h, nh) && p < end && (free_fields(h, hl, nh), 1));
    for (int i = 0; i < nh; i++) {
        if (!strcmp(h[i], "image") && col_img < 0) col_img = i;
        if (!strcmp(h[i], "prompt") && col_prompt < 0) col_prompt = i;
    }
    free_fields(h, hl, nh);
    if (bad) { zi_seterr("%s: header: unterminated quote", path); return -1; }
    if (col_img < 0 || col_prompt < 0) {
        zi_seterr("%s: no '%s' column in the header", path, col_img < 0 ? "image" : "prompt");
        return -1;
    }
    for (int row = 1; p < end; row++) {
        char **f;
        size_t *fl;
        int nf;
        p = csv_record(p, end, &f, &fl, &nf, &bad);
        if (bad) {
            free_fields(f, fl, nf);
            zi_seterr("%s: row %d: unterminated quote", path, row);
            return -1;
        }
        if (blank_record(f, nf)) { free_fields(f, fl, nf); continue; }   /* pandas skips blank lines */
        if (nf <= col_img || nf <= col_prompt) {
            free_fields(f, fl, nf);
            zi_seterr("%s: row %d: %d fields, no '%s'", path, row, nf, nf <= col_img ? "image" : "prompt");
            return -1;
        }
        if (!fl[col_img]) {
            free_fields(f, fl, nf);
            zi_seterr("%s: row %d: empty 'image'", path, row);
            return -1;
        }
        add_item(m, f[col_img], fl[col_img], f[col_prompt], fl[col_prompt]);
        free_fields(f, fl, nf);
    }
    return 0;
}

/* One JSON object of the metadata (row is 1-based, for messages). */
static int json_item(const zj *o, const char *path, int row, zi_train_meta *m) {
    if (!o || o->type != ZJ_OBJ) { zi_seterr("%s: row %d is not an object", path, row); return -1; }
    const zj *img = zj_get(o, "image"), *pr = zj_get(o, "prompt");
    if (!img || !pr) { zi_seterr("%s: row %d has no \"%s\"", path, row, img ? "prompt" : "image"); return -1; }
    if (img->type != ZJ_STR || !img->len || pr->type != ZJ_STR) {
        zi_seterr("%s: row %d: \"%s\" is not a %sstring", path, row, img->type != ZJ_STR || !img->len ? "image" : "prompt",
                  img->type != ZJ_STR || !img->len ? "non-empty " : "");
        return -1;
    }
    add_item(m, img->str, img->len, pr->str, pr->len);
    return 0;
}

static int parse_json(const char *text, size_t len, const char *path, zi_train_meta *m) {
    zj *root = zj_parse(text, len, path);
    if (!root) return -1;
    int rc = 0;
    if (root->type != ZJ_ARR) { zi_seterr("%s: not a JSON array of objects", path); rc = -1; }
    for (int i = 0; !rc && i < root->n; i++) rc = json_item(zj_at(root, i), path, i + 1, m);
    zj_free(root);
    return rc;
}

static int parse_jsonl(const char *text, size_t len, const char *path, zi_train_meta *m) {
    const char *p = text, *end = text + len;
    for (int row = 1; p < end; row++) {
        const char *nl = memchr(p, '\n', (size_t)(end - p)), *e = nl ? nl : end;
        const char *q = p;
        while (q < e && (*q == ' ' || *q == '\t' || *q == '\r')) q++;
        if (q < e) {
            char *what = zi_path("%s: line %d", path, row);
            zj *o = zj_parse(p, (size_t)(e - p), what);
            free(what);
            if (!o) return -1;
            int rc = json_item(o, path, row, m);
            zj_free(o);
            if (rc) return -1;
        }
        p = nl ? nl + 1 : end;
    }
    return 0;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcasecmp(s + n - k, suffix);
}

int zi_train_meta_parse(const char *text, size_t len, const char *path, zi_train_meta *out) {
    *out = (zi_train_meta){0};
    int rc = ends_with(path, ".jsonl") ? parse_jsonl(text, len, path, out)
           : ends_with(path, ".json")  ? parse_json(text, len, path, out)
           : parse_csv(text, len, path, out);
    if (!rc && !out->n) { zi_seterr("%s: no rows", path); rc = -1; }
    if (rc) zi_train_meta_free(out);
    return rc;
}

int zi_train_meta_load(const char *path, zi_train_meta *out) {
    *out = (zi_train_meta){0};
    FILE *f = fopen(path, "rb");
    if (!f) { zi_seterr("%s: cannot open", path); return -1; }
    char *buf = NULL;
    size_t len = 0, cap = 0, k;
    do {
        if (len + 65536 > cap) buf = zi_realloc(buf, cap = 2 * cap + 65536);
        k = fread(buf + len, 1, cap - len, f);
        len += k;
    } while (k > 0);
    int err = ferror(f);
    fclose(f);
    if (err) { free(buf); zi_seterr("%s: read error", path); return -1; }
    int rc = zi_train_meta_parse(buf, len, path, out);
    free(buf);
    return rc;
}

void zi_train_meta_free(zi_train_meta *m) {
    for (int i = 0; i < m->n; i++) { free(m->items[i].image); free(m->items[i].prompt); }
    free(m->items);
    *m = (zi_train_meta){0};
}

/* ================================================================ schedule */

/* torch.linspace(start, end, steps) in float32: the first half counts up from start, the
 * second half down from end (aten RangeFactoriesKernel.cpp; fused multiply-add as built). */
static float linspace_at(float start, float end, int steps, int i) {
    float step = (end - start) / (float)(steps - 1);
    return i < steps / 2 ? fmaf(step, (float)i, start) : fmaf(-step, (float)(steps - i - 1), end);
}

/* Keeps a product from being fused into the following addition: torch rounds each tensor
 * operation on its own (see sampler.c). */
static inline float rnd(float x) {
    __asm__("" : "+m"(x));
    return x;
}

void zi_train_grid(int n, float shift, float *sigmas, float *weights) {
    /* FlowMatchScheduler.set_timesteps_z_image(n, training=True):
     * σ = linspace(1, 0, n + 1)[:-1]; σ = shift·σ / (1 + (shift − 1)·σ), float32 tensors */
    for (int i = 0; i < n; i++) {
        float s = linspace_at(1.0f, 0.0f, n + 1, i);
        sigmas[i] = rnd(shift * s) / (1.0f + rnd((shift - 1.0f) * s));
    }
    /* set_training_weight: x = 1000σ, y = exp(−2((x − 500)/1000)²), z = y − min y,
     * w = z·(1000/Σz); for n != 1000: w·n/1000 + (that)[1]. Σ is float32 in torch (a
     * pairwise sum); we sum in double, which can move w by an ulp. */
    float ymin = INFINITY;
    for (int i = 0; i < n; i++) {
        float d = (sigmas[i] * 1000.0f - 500.0f) / 1000.0f;
        weights[i] = expf(-2.0f * rnd(d * d));
        if (weights[i] < ymin) ymin = weights[i];
    }
    double sum = 0;
    for (int i = 0; i < n; i++) { weights[i] -= ymin; sum += weights[i]; }
    float f = (float)(1000.0 / (float)sum);
    for (int i = 0; i < n; i++) weights[i] *= f;
    if (n != 1000 && n > 1) {
        float r = (float)n / 1000.0f;
        for (int i = 0; i < n; i++) weights[i] *= r;
        float w1 = weights[1];
        for (int i = 0; i < n; i++) weights[i] += w1;
    }
}

/* ================================================================ random numbers */

/* splitmix64's finaliser: a bijective mix of 64 bits. */
static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t zi_train_hash(uint64_t seed, uint64_t stream, uint64_t counter) {
    return mix64(mix64(mix64(seed + 0x9e3779b97f4a7c15ull) ^ stream) + counter * 0x9e3779b97f4a7c15ull);
}

/* uniform double in [0, 1) from the top 53 bits */
static double hash_unit(uint64_t seed, uint64_t stream, uint64_t counter) {
    return (double)(zi_train_hash(seed, stream, counter) >> 11) * 0x1.0p-53;
}

int zi_train_timestep(uint64_t seed, int64_t sample, int n) {
    return (int)(hash_unit(seed, ZI_RNG_TIMESTEP, (uint64_t)sample) * n);
}

uint64_t zi_train_noise_seed(uint64_t seed, int64_t sample) {
    return zi_train_hash(seed, ZI_RNG_NOISE, (uint64_t)sample);
}

void zi_train_perm(int *perm, int n, uint64_t seed, int epoch) {
    /* Fisher–Yates from the last position down, j uniform in [0, i] */
    for (int i = 0; i < n; i++) perm[i] = i;
    for (int i = n - 1; i > 0; i--) {
        uint64_t c = (uint64_t)epoch << 32 | (uint32_t)i;
        int j = (int)(hash_unit(seed, ZI_RNG_SHUFFLE, c) * (i + 1));
        int t = perm[i]; perm[i] = perm[j]; perm[j] = t;
    }
}

/* ================================================================ trainable LoRA */

/* peft's rule for a list of targets: the module name equals a target or ends with "." + target */
static int matches_target(const char *name, const char *targets) {
    size_t n = strlen(name);
    for (const char *t = targets; *t;) {
        const char *c = strchr(t, ',');
        size_t k = c ? (size_t)(c - t) : strlen(t);
        if (k && (n == k || (n > k && name[n - k - 1] == '.')) && !strncmp(name + n - k, t, k)) return 1;
        t += k + (c != NULL);
    }
    return 0;
}

/* Lays out modules [0, n) in one flat buffer per role (A then B of each module) and attaches
 * an adapter per module to its layer, appended after any adapters already there. */
static zi_train_lora *lora_alloc(int n) {
    zi_train_lora *t = zi_calloc(1, sizeof *t);
    t->lora.n = n;
    t->lora.m = zi_calloc((size_t)n, sizeof *t->lora.m);
    t->lora.dtype = ZI_F32;
    t->ad = zi_calloc((size_t)n, sizeof *t->ad);
    t->lin = zi_calloc((size_t)n, sizeof *t->lin);
    return t;
}

static void lora_finish(zi_train_lora *t) {
    int64_t total = 0;
    for (int i = 0; i < t->lora.n; i++) {
        const zi_lora_module *m = &t->lora.m[i];
        total += (int64_t)m->rank * (m->in + m->out);
    }
    t->n_params = total;
    t->w = zi_calloc((size_t)total, sizeof(float));
    t->g = zi_calloc((size_t)total, sizeof(float));
    t->m = zi_calloc((size_t)total, sizeof(float));
    t->v = zi_calloc((size_t)total, sizeof(float));
    int64_t off = 0;
    for (int i = 0; i < t->lora.n; i++) {
        zi_lora_module *m = &t->lora.m[i];
        int64_t na = (int64_t)m->rank * m->in, nb = (int64_t)m->out * m->rank;
        m->A = t->w + off;
        m->B = t->w + off + na;
        zi_lora_adapter *a = &t->ad[i];
        a->A = m->A;
        a->B = m->B;
        a->dA = t->g + off;
        a->dB = t->g + off + na;
        a->rank = m->rank;
        zi_lora_adapter **tail = &t->lin[i]->lora;
        while (*tail) tail = &(*tail)->next;
        *tail = a;
        off += na + nb;
    }
}

zi_train_lora *zi_train_lora_new(zi_lin *const *lins, int nlins, const char *targets, int rank, uint64_t seed) {
    if (rank < 1) { zi_seterr("--lora-rank: must be at least 1 (got %d)", rank); return NULL; }
    int n = 0;
    for (int i = 0; i < nlins; i++) n += matches_target(lins[i]->name, targets);
    if (!n) { zi_seterr("--lora-target-modules: '%s' matches no Linear layer of the model", targets); return NULL; }
    zi_train_lora *t = lora_alloc(n);
    for (int i = 0, k = 0; i < nlins; i++) {
        if (!matches_target(lins[i]->name, targets)) continue;
        t->lin[k] = lins[i];
        t->lora.m[k] = (zi_lora_module){ .name = zi_strdup(lins[i]->name), .rank = rank, .in = (int)lins[i]->W.cols,
                                         .out = (int)lins[i]->W.rows, .alpha = (float)rank };
        t->ad[k].scale = 1.0f;
        k++;
    }
    lora_finish(t);
    /* peft's default: A ~ kaiming_uniform(a=√5) = U(−1/√in, 1/√in), B = 0 */
    uint64_t c = 0;
    for (int i = 0; i < n; i++) {
        zi_lora_module *m = &t->lora.m[i];
        double bound = 1.0 / sqrt((double)m->in);
        float *A = (float *)m->A;
        for (int64_t k = 0; k < (int64_t)m->rank * m->in; k++)
            A[k] = (float)((2.0 * hash_unit(seed, ZI_RNG_INIT, c++) - 1.0) * bound);
    }
    return t;
}

zi_train_lora *zi_train_lora_of(const zi_lora *src, zi_lin *const *lins, int nlins, float strength) {
    int n = 0;
    for (int i = 0; i < src->n; i++)
        for (int j = 0; j < nlins; j++) n += !strcmp(src->m[i].name, lins[j]->name);
    if (!n) { zi_seterr("%s: none of its modules matches a layer of the model", src->path); return NULL; }
    zi_train_lora *t = lora_alloc(n);
    int k = 0;
    for (int i = 0; i < src->n; i++) {
        const zi_lora_module *s = &src->m[i];
        for (int j = 0; j < nlins; j++) {
            if (strcmp(s->name, lins[j]->name)) continue;
            if (lins[j]->W.rows != s->out || lins[j]->W.cols != s->in) {
                zi_seterr("%s: %s: LoRA is %dx%d but the model's weight is %lldx%lld", src->path, s->name, s->out,
                          s->in, (long long)lins[j]->W.rows, (long long)lins[j]->W.cols);
                t->lora.n = k;
                free(t->lin);
                t->lin = NULL;
                zi_train_lora_free(t);
                return NULL;
            }
            t->lin[k] = lins[j];
            t->lora.m[k] = (zi_lora_module){ .name = zi_strdup(s->name), .rank = s->rank, .in = s->in, .out = s->out,
                                             .alpha = s->alpha };
            t->ad[k].scale = zi_lora_scale(s) * strength;
            k++;
        }
    }
    lora_finish(t);
    for (int i = 0; i < n; i++) {
        zi_lora_module *m = &t->lora.m[i];
        const zi_lora_module *s = NULL;
        for (int j = 0; j < src->n && !s; j++)
            if (!strcmp(src->m[j].name, m->name)) s = &src->m[j];
        memcpy((float *)m->A, s->A, (size_t)m->rank * m->in * sizeof(float));
        memcpy((float *)m->B, s->B, (size_t)m->out * m->rank * sizeof(float));
    }
    return t;
}

int zi_train_lora_load_weights(zi_train_lora *t, const zi_lora *src) {
    int found = 0;
    for (int i = 0; i < t->lora.n; i++) {
        zi_lora_module *m = &t->lora.m[i];
        for (int j = 0; j < src->n; j++) {
            const zi_lora_module *s = &src->m[j];
            if (strcmp(s->name, m->name)) continue;
            if (s->rank != m->rank || s->in != m->in || s->out != m->out) {
                zi_seterr("%s: %s is rank %d, %dx%d; training rank %d, %dx%d (set --lora-rank)", src->path, s->name,
                          s->rank, s->out, s->in, m->rank, m->out, m->in);
                return -1;
            }
            /* DiffSynth loads A and B as they are (its files carry no alpha); a file with
             * alpha != rank gets its scale folded into B so that it acts as it did. */
            float sc = zi_lora_scale(s);
            memcpy((float *)m->A, s->A, (size_t)m->rank * m->in * sizeof(float));
            float *B = (float *)m->B;
            for (int64_t k = 0; k < (int64_t)m->out * m->rank; k++) B[k] = s->B[k] * sc;
            found++;
        }
    }
    if (!found) { zi_seterr("%s: none of its modules is among the trained ones", src->path); return -1; }
    return found;
}

void zi_train_lora_zero_grad(zi_train_lora *t) { memset(t->g, 0, (size_t)t->n_params * sizeof(float)); }

void zi_train_lora_free(zi_train_lora *t) {
    if (!t) return;
    for (int i = 0; t->lin && i < t->lora.n; i++) {
        zi_lora_adapter **p = &t->lin[i]->lora;
        while (*p && *p != &t->ad[i]) p = &(*p)->next;
        if (*p) *p = t->ad[i].next;
    }
    for (int i = 0; i < t->lora.n; i++) free(t->lora.m[i].name);
    free(t->lora.m);
    free(t->ad);
    free(t->lin);
    free(t->w); free(t->g); free(t->m); free(t->v);
    free(t);
}

/* ================================================================ optimizer */

double zi_train_lr(double lr, int64_t step) {
    /* torch.optim.lr_scheduler.ConstantLR(factor=1/3, total_iters=5): the first lr is
     * lr·factor; at scheduler step 5 it becomes that times 1/factor (in double, as torch). */
    const double factor = 1.0 / 3.0;
    double l = lr * factor;
    return step <= 5 ? l : l * (1.0 / factor);
}

typedef struct {
    float *w, *m, *v;
    const float *g;
    float decay, b1, one_b1, b2, one_b2, bc2_sqrt, eps, neg_step;
} adamw_ctx;

static void adamw_range(void *ctx, int64_t begin, int64_t end) {
    const adamw_ctx *c = ctx;
    for (int64_t i = begin; i < end; i++) {
        float g = c->g[i];
        c->w[i] *= c->decay;
        c->m[i] += c->one_b1 * (g - c->m[i]);                      /* lerp_(g, 1 − β1) */
        c->v[i] = rnd(c->v[i] * c->b2) + rnd(c->one_b2 * g) * g;    /* mul_(β2).addcmul_(g, g, 1 − β2) */
        float denom = sqrtf(c->v[i]) / c->bc2_sqrt + c->eps;
        c->w[i] += c->neg_step * (c->m[i] / denom);                 /* addcdiv_(m, denom, −step_size) */
    }
}

void zi_adamw(float *w, const float *g, float *m, float *v, int64_t n, int64_t step, double lr,
              double beta1, double beta2, double eps, double weight_decay) {
    /* torch.optim.AdamW (single tensor): the scalars in double, the tensors in float32 */
    double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
    adamw_ctx c = { w, m, v, g, (float)(1.0 - lr * weight_decay), (float)beta1, (float)(1.0 - beta1), (float)beta2,
                    (float)(1.0 - beta2), (float)sqrt(bc2), (float)eps, (float)(-(lr / bc1)) };
    zi_parallel_for(n, 65536, adamw_range, &c);
}

void zi_train_lora_step(zi_train_lora *t, double lr, double weight_decay) {
    t->step++;
    zi_adamw(t->w, t->g, t->m, t->v, t->n_params, t->step, zi_train_lr(lr, t->step), 0.9, 0.999, 1e-8, weight_decay);
}

/* ================================================================ loss */

void zi_train_noisy(float *xt, const float *x0, const float *noise, float sigma, int64_t n) {
    /* FlowMatchScheduler.add_noise: (1 − σ)·x0 + σ·n */
    float a = 1.0f - sigma;
    for (int64_t i = 0; i < n; i++) xt[i] = rnd(a * x0[i]) + rnd(sigma * noise[i]);
}

float zi_train_loss(const float *out, const float *x0, const float *noise, int64_t n, float weight,
                    float grad_scale, float *dout) {
    /* v = −out, target = noise − x0; loss = mean((v − target)²)·weight;
     * dLoss/dout = −2(v − target)·weight/n, times grad_scale (1/accumulation steps) */
    double sum = 0;
    float k = -2.0f * weight * grad_scale / (float)n;
    for (int64_t i = 0; i < n; i++) {
        float d = -out[i] - (noise[i] - x0[i]);
        sum += (double)d * d;
        if (dout) dout[i] = k * d;
    }
    return (float)(sum / (double)n) * weight;
}

/* ================================================================ training state */

int zi_train_state_save(const zi_train_lora *t, const zi_train_pos *pos, const char *config, const char *path) {
    zi_stw *w = zi_stw_new();
    int64_t n = t->n_params;
    zi_stw_add_f32(w, "lora", 1, &n, t->w);
    zi_stw_add_f32(w, "adam.m", 1, &n, t->m);
    zi_stw_add_f32(w, "adam.v", 1, &n, t->v);
    if (pos->partial)   /* saved in the middle of an accumulation: the partial sum */
        zi_stw_add_f32(w, "grad", 1, &n, t->g);
    char buf[64];
    snprintf(buf, sizeof buf, "%lld", (long long)t->step);
    zi_stw_meta(w, "step", buf);
    snprintf(buf, sizeof buf, "%lld", (long long)pos->sample);
    zi_stw_meta(w, "sample", buf);
    snprintf(buf, sizeof buf, "%.17g", pos->loss_sum);
    zi_stw_meta(w, "loss_sum", buf);
    zi_stw_meta(w, "config", config);
    int rc = zi_stw_write(w, path);
    zi_stw_free(w);
    return rc;
}

static int meta_i64(const zi_st *st, const char *key, long long *out) {
    const char *s = zi_st_meta(st, key);
    char *end;
    if (!s) return -1;
    *out = strtoll(s, &end, 10);
    return *end ? -1 : 0;
}

int zi_train_state_load(zi_train_lora *t, zi_train_pos *pos, const char *config, const char *path) {
    zi_st *st = zi_st_open(path);
    if (!st) return -1;
    int rc = -1;
    long long step, sample;
    const char *cfg = zi_st_meta(st, "config"), *ls = zi_st_meta(st, "loss_sum");
    const int64_t shape[1] = { t->n_params };
    const zi_tensor *tw = NULL, *tm = NULL, *tv = NULL, *tg = zi_st_get(st, "grad");
    if (meta_i64(st, "step", &step) || meta_i64(st, "sample", &sample) || !cfg || !ls || step < 0 || sample < 0)
        zi_seterr("%s: not a training-state file (metadata step, sample, loss_sum, config)", path);
    else if (strcmp(cfg, config))
        zi_seterr("%s: written by a run with other settings: %s; this run: %s", path, cfg, config);
    else if (!(tw = zi_st_need(st, "lora", 1, shape)) || !(tm = zi_st_need(st, "adam.m", 1, shape)) ||
             !(tv = zi_st_need(st, "adam.v", 1, shape)) || (tg && !zi_st_need(st, "grad", 1, shape)))
        ;   /* zi_st_need set the error */
    else if (tw->dtype != ZI_F32 || tm->dtype != ZI_F32 || tv->dtype != ZI_F32 || (tg && tg->dtype != ZI_F32))
        zi_seterr("%s: training state must be F32", path);
    else {
        memcpy(t->w, tw->data, tw->nbytes);
        memcpy(t->m, tm->data, tm->nbytes);
        memcpy(t->v, tv->data, tv->nbytes);
        if (tg) memcpy(t->g, tg->data, tg->nbytes);
        else zi_train_lora_zero_grad(t);
        t->step = step;
        pos->sample = sample;
        pos->partial = tg != NULL;
        pos->loss_sum = strtod(ls, NULL);
        rc = 0;
    }
    zi_st_close(st);
    return rc;
}
