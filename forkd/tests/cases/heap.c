// The malloc heap: 1000 small blocks of growing size, each filled. Checks
// every byte of every block, and that malloc still gives a new 1 MiB block.
#include "case.h"

static char *heap_small[1000];

static int setup(void) {
    for (int i = 0; i < 1000; i++) {
        heap_small[i] = malloc(16 + i * 7);
        memset(heap_small[i], i & 0xff, 16 + i * 7);
    }
    return 1;
}

static int check(void) {
    for (int i = 0; i < 1000; i++)
        for (int j = 0; j < 16 + i * 7; j++) CHECK(heap_small[i][j] == (char)(i & 0xff));
    char *more = malloc(1 << 20);
    CHECK(more != NULL);
    free(more);
    return 1;
}
