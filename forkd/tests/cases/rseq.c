// Restartable sequences: glibc registers rseq, sched_getcpu reads it.
// Checks sched_getcpu still answers a CPU after restore.
#include "case.h"

static int setup(void) { return sched_getcpu() >= 0; }

static int check(void) {
    CHECK(sched_getcpu() >= 0);
    return 1;
}
