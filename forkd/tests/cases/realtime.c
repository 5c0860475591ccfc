// The wall clock: gettimeofday read before. Checks it still works after
// restore and has not gone back a second.
#include "case.h"

static struct timeval real_before;

static int setup(void) { return gettimeofday(&real_before, NULL) == 0; }

static int check(void) {
    struct timeval now;
    CHECK(gettimeofday(&now, NULL) == 0);
    CHECK(now.tv_sec >= real_before.tv_sec);
    return 1;
}
