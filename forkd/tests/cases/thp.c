// Transparent huge pages: 8 MiB advised MADV_HUGEPAGE, one byte written
// per 4 KiB page. Checks every page's byte.
#include "case.h"

static char *thp;
static size_t thp_len = 8 << 20;

static int setup(void) {
    thp = mmap(NULL, thp_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (thp == MAP_FAILED) return 0;
    madvise(thp, thp_len, MADV_HUGEPAGE);
    for (size_t i = 0; i < thp_len; i += 4096) thp[i] = (char)(i >> 12);
    return 1;
}

static int check(void) {
    for (size_t i = 0; i < thp_len; i += 4096) CHECK(thp[i] == (char)(i >> 12));
    return 1;
}
