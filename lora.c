/* lora.c: Linear layers with LoRA adapters; LoRA files (load, merge, save, convert). */
#include "zimage.h"

#include <stdlib.h>

void zi_lin_forward(const zi_lin *l, const float *x, int M, float *y) {
    zi_linear(y, x, M, &l->W, l->bias);
    for (const zi_lora_adapter *a = l->lora; a; a = a->next) {
        /* h = x·Aᵀ [M, rank], then y += scale · h·Bᵀ */
        float *h = zi_malloc((size_t)M * a->rank * sizeof(float));
        zi_gemm(0, 1, M, a->rank, (int)l->W.cols, 1.0f, x, l->W.cols, a->A, ZI_F32, l->W.cols, 0.0f, h, a->rank);
        zi_gemm(0, 1, M, (int)l->W.rows, a->rank, a->scale, h, a->rank, a->B, ZI_F32, a->rank, 1.0f, y, l->W.rows);
        free(h);
    }
}
