// A page dropped with MADV_DONTNEED inside a written 1 MiB mapping. Checks
// its neighbours keep their content and the dropped page reads zero.
#include "case.h"

static char *big;

static int setup(void) {
    big = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(big, 0x11, 1 << 20);
    return madvise(big + 4096, 4096, MADV_DONTNEED) == 0;
}

static int check(void) {
    CHECK(big[0] == 0x11 && big[2 * 4096] == 0x11);
    CHECK(big[4096] == 0);
    return 1;
}
