// The execution domain: PER_LINUX with ADDR_COMPAT_LAYOUT. Checks the flag
// is still set.
#include "case.h"

static int setup(void) { return personality(PER_LINUX | ADDR_COMPAT_LAYOUT) != -1; }

static int check(void) {
    int p = personality(0xffffffff);
    CHECK(p & ADDR_COMPAT_LAYOUT);
    return 1;
}
