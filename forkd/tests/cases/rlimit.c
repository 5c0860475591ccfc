// A resource limit: RLIMIT_NOFILE lowered to soft 100, hard 200. Checks
// both values after restore.
#include "case.h"

static int setup(void) {
    struct rlimit r = {100, 200};
    return setrlimit(RLIMIT_NOFILE, &r) == 0;
}

static int check(void) {
    struct rlimit r;
    getrlimit(RLIMIT_NOFILE, &r);
    CHECK(r.rlim_cur == 100 && r.rlim_max == 200);
    return 1;
}
