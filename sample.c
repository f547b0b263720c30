/* sample.c: the inference command line (see ../shared/spec/cli.md). */
#include "zimage.h"

#include <stdio.h>

int main(int argc, char **argv) {
    (void)argv;
    if (argc < 2) {
        fprintf(stderr, "usage: sample MODEL_DIR \"PROMPT\" [options]\n");
        return 1;
    }
    fprintf(stderr, "error: not implemented yet\n");
    return 1;
}
