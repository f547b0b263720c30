/* train.c: LoRA training on the CPU (DiffSynth-Studio's train.py flags). */
#include "zimage.h"

#include <stdio.h>

int main(int argc, char **argv) {
    (void)argc; (void)argv;
    fprintf(stderr, "error: train is not implemented yet\n");
    return 1;
}
