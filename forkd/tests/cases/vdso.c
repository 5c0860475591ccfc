// The vDSO: CLOCK_MONOTONIC read through it before. Checks it still works
// after restore and does not go backwards.
#include "case.h"

static struct timespec mono_before;

static int setup(void) { return clock_gettime(CLOCK_MONOTONIC, &mono_before) == 0; }

static int check(void) {
    struct timespec now;
    CHECK(clock_gettime(CLOCK_MONOTONIC, &now) == 0);
    CHECK(now.tv_sec > mono_before.tv_sec ||
          (now.tv_sec == mono_before.tv_sec && now.tv_nsec >= mono_before.tv_nsec));
    return 1;
}
