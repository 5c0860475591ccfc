// A guard page: three pages, the middle one PROT_NONE. Checks the outer
// pages' content, and that reading the middle one faults.
#include "case.h"

static char *guard;

static int setup(void) {
    guard = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    guard[0] = 'a';
    guard[2 * 4096] = 'c';
    return mprotect(guard + 4096, 4096, PROT_NONE) == 0;
}

static int check(void) {
    CHECK(guard[0] == 'a' && guard[2 * 4096] == 'c');
    CHECK(faults(guard + 4096, 0));
    return 1;
}
