/* Tests of the memory savings of the DiT's inference forward: shared activation buffers and
 * the feed-forward in tiles of rows give the same bits as the training forward, which keeps
 * every intermediate in its own buffer. */
#include "test.h"
#include "../zimage.h"

#include <stdlib.h>
#include <string.h>

/* Runs a batch of two items (different sizes) and returns the outputs concatenated. */
static float *forward2(zi_dit *m, const float *x, const float *cap, int64_t n0, int64_t n1) {
    const zi_dit_cfg *c = zi_dit_config(m);
    float *out = malloc((size_t)(n0 + n1) * sizeof(float));
    const float *xs[2] = { x, x + n0 }, *caps[2] = { cap, cap + 7 * c->cap_feat_dim };
    int h[2] = { 12, 8 }, w[2] = { 10, 16 }, L[2] = { 7, 40 };
    float t[2] = { 0.3f, 0.8f }, *outs[2] = { out, out + n0 };
    if (zi_dit_forward(m, 2, xs, h, w, t, caps, L, outs)) { free(out); return NULL; }
    return out;
}

TEST(dit_ffn_tiles) {
    zi_dit *m = zi_dit_load(zt_golden("tiny-zimage/transformer"));
    CHECK(m, "load: %s", zi_err());
    const zi_dit_cfg *c = zi_dit_config(m);
    int64_t n0 = (int64_t)c->in_channels * 12 * 10, n1 = (int64_t)c->in_channels * 8 * 16;
    float *x = malloc((size_t)(n0 + n1) * sizeof(float)), *cap = malloc((size_t)47 * c->cap_feat_dim * sizeof(float));
    zi_randn(x, n0 + n1, 1, ZI_RNG_CPU);
    zi_randn(cap, (int64_t)47 * c->cap_feat_dim, 2, ZI_RNG_CPU);
    zi_dit_set_ffn_tile(m, 0);
    float *all = forward2(m, x, cap, n0, n1);
    zi_dit_set_ffn_tile(m, 7);              /* tiles that split segments and the last one short */
    float *tiled = forward2(m, x, cap, n0, n1);
    /* training forward (B = 1): every intermediate in its own buffer */
    zi_dit_set_training(m, 1, 0);
    float *single = malloc((size_t)n0 * sizeof(float)), t = 0.3f;
    int h = 12, w = 10, L = 7;
    const float *xp = x, *cp = cap;
    int rc = zi_dit_forward(m, 1, &xp, &h, &w, &t, &cp, &L, &single);
    zi_dit_set_training(m, 0, 0);
    int ok = all && tiled && !rc && !memcmp(all, tiled, (size_t)(n0 + n1) * sizeof(float)) &&
             !memcmp(all, single, (size_t)n0 * sizeof(float));
    free(all); free(tiled); free(single); free(x); free(cap);
    zi_dit_free(m);
    CHECK(ok, "tiled / shared-buffer forward differs from the plain one");
}
