// The program break: grown by three pages with sbrk, filled with 0x3c.
// Checks those pages, and that the break has not moved below them.
#include "case.h"

static void *brk_start;

static int setup(void) {
    brk_start = sbrk(0);
    char *p = sbrk(3 * 4096);
    if (p == (void *)-1) return 0;
    memset(p, 0x3c, 3 * 4096);
    return 1;
}

static int check(void) {
    char *p = (char *)brk_start;
    for (int i = 0; i < 3 * 4096; i++) CHECK(p[i] == 0x3c);
    // (stdio may have grown the heap since: at least ours is there.)
    CHECK((char *)sbrk(0) >= p + 3 * 4096);
    return 1;
}
