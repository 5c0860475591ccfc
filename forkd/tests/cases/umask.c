// The file-mode creation mask: 027. Checks umask is still 027.
#include "case.h"

static int setup(void) {
    umask(027);
    return 1;
}

static int check(void) {
    mode_t m = umask(0);
    CHECK(m == 027);
    return 1;
}
