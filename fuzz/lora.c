/* Fuzz target: LoRA key parsing and grouping (zi_lora_load). Raw bytes would seldom get past
 * the safetensors header, so the input describes a file instead, one tensor per line:
 *
 *   line = SHAPE_BYTE KEY          tensor KEY of a shape and dtype picked by SHAPE_BYTE
 *   line = '#' TEXT                the "lora_adapter_metadata" (PEFT config JSON)
 *
 * The file is written with zi_stw_* and loaded; an accepted LoRA is saved in the format the
 * first byte picks and loaded again. */
#include "fuzz.h"
#include "../zimage.h"

#include <string.h>

static const struct { int ndim; int64_t shape[4]; } shapes[8] = {
    {2, {2, 4}}, {2, {4, 2}}, {2, {6, 2}}, {4, {2, 4, 1, 1}}, {0, {0}}, {1, {1}}, {2, {0, 4}}, {2, {4, 0}},
};
static const zi_dtype dtypes[4] = {ZI_F32, ZI_BF16, ZI_F16, ZI_I64};

FUZZ_TARGET(lora) {
    if (size < 1) return 0;
    static const char *const formats[4] = {"diffsynth", "diffusers", "comfyui", "kohya"};
    const char *format = formats[data[0] % 4];
    zi_stw *w = zi_stw_new();
    uint8_t bytes[4 * 4 * 8];
    for (size_t i = 0; i < sizeof bytes; i++) bytes[i] = (uint8_t)(i % 7 ? 0x3c : 0x00);
    const char *p = (const char *)data + 1, *end = (const char *)data + size;
    for (int lines = 0; p < end && lines < 64; lines++) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t len = (size_t)((nl ? nl : end) - p);
        if (len >= 2) {
            char *text = strndup(p + 1, len - 1);
            unsigned code = (unsigned char)p[0];
            if (code == '#') zi_stw_meta(w, "lora_adapter_metadata", text);
            else zi_stw_add(w, text, dtypes[(code / 8) % 4], shapes[code % 8].ndim, shapes[code % 8].shape, bytes);
            free(text);
        }
        p += len + 1;
    }
    const char *path = fuzz_path("lora.safetensors"), *path2 = fuzz_path("lora2.safetensors");
    int rc = zi_stw_write(w, path);
    zi_stw_free(w);
    if (rc) return 0;
    zi_lora *l = zi_lora_load(path);
    unlink(path);
    if (!l) return 0;
    FUZZ_CHECK(l->n > 0);
    for (int i = 0; i < l->n; i++) FUZZ_CHECK(l->m[i].rank > 0 && l->m[i].in >= 0 && l->m[i].out >= 0);
    if (zi_lora_save(l, path2, format, ZI_F32, NULL) == 0) {
        zi_lora *back = zi_lora_load(path2);
        unlink(path2);
        zi_lora_free(back);
    }
    zi_lora_free(l);
    return 0;
}
