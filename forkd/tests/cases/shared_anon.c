// A shared anonymous mapping of 1 MiB, one byte written per page. Checks
// every page's byte.
#include "case.h"

static char *shared;

static int setup(void) {
    shared = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED) return 0;
    for (int i = 0; i < (1 << 20); i += 4096) shared[i] = (char)(i >> 12);
    return 1;
}

static int check(void) {
    for (int i = 0; i < (1 << 20); i += 4096) CHECK(shared[i] == (char)(i >> 12));
    return 1;
}
