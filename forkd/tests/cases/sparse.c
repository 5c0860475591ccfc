// A sparse mapping: 1 GiB MAP_NORESERVE with three bytes written (first,
// middle, last). Checks those three and that untouched pages read zero.
#include "case.h"

static char *sparse;
static size_t sparse_len = 1ull << 30;

static int setup(void) {
    sparse = mmap(NULL, sparse_len, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (sparse == MAP_FAILED) return 0;
    sparse[0] = 1;
    sparse[sparse_len / 2] = 2;
    sparse[sparse_len - 1] = 3;
    return 1;
}

static int check(void) {
    CHECK(sparse[0] == 1 && sparse[sparse_len / 2] == 2 && sparse[sparse_len - 1] == 3);
    CHECK(sparse[4096] == 0 && sparse[sparse_len / 4] == 0);
    return 1;
}
