// One mapping split by protection: 8 written pages, every odd one made
// read-only. Checks each page's byte, and that writing faults on exactly
// the odd pages.
#include "case.h"

static char *mixed;

static int setup(void) {
    mixed = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mixed == MAP_FAILED) return 0;
    for (int i = 0; i < 8; i++) mixed[i * 4096] = (char)('a' + i);
    for (int i = 1; i < 8; i += 2)
        if (mprotect(mixed + i * 4096, 4096, PROT_READ)) return 0;
    return 1;
}

static int check(void) {
    for (int i = 0; i < 8; i++) CHECK(mixed[i * 4096] == (char)('a' + i));
    for (int i = 0; i < 8; i++) CHECK(faults(mixed + i * 4096, 1) == (i % 2));
    return 1;
}
