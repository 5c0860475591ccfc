// A mapping grown with mremap: 4 written pages moved into 64. Checks the
// 4 pages' content, and that the grown part reads zero.
#include "case.h"

static char *big;

static int setup(void) {
    char *a = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(a, 0x42, 4 * 4096);
    big = mremap(a, 4 * 4096, 64 * 4096, MREMAP_MAYMOVE);
    return big != MAP_FAILED;
}

static int check(void) {
    for (int i = 0; i < 4 * 4096; i++) CHECK(big[i] == 0x42);
    CHECK(big[10 * 4096] == 0);
    return 1;
}
