// An anonymous mapping never touched: 16 MiB. Checks it reads zero (every
// 512th byte).
#include "case.h"

static char *untouched;
static size_t untouched_len = 16 << 20;

static int setup(void) {
    untouched =
        mmap(NULL, untouched_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return untouched != MAP_FAILED;
}

static int check(void) {
    for (size_t i = 0; i < untouched_len; i += 512) CHECK(untouched[i] == 0);
    return 1;
}
