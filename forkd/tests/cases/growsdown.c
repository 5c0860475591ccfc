// A MAP_GROWSDOWN mapping of 16 pages, its upper 8 filled with 0x77.
// Checks every filled byte.
#include "case.h"

static char *grows;

static int setup(void) {
    grows = mmap(NULL, 16 * 4096, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN, -1, 0);
    if (grows == MAP_FAILED) return 0;
    memset(grows + 8 * 4096, 0x77, 8 * 4096);
    return 1;
}

static int check(void) {
    for (int i = 8 * 4096; i < 16 * 4096; i++) CHECK(grows[i] == 0x77);
    return 1;
}
