// A deep stack: the line is read 200 frames down, each frame holding 1 KiB
// it filled before. Checks, as each frame returns, that its 1 KiB is
// unchanged. Its own flow (CASE_OWN_RUN): the read happens at the bottom
// of the recursion, not in case.h's main.
#define CASE_OWN_RUN
#include "case.h"

static int setup(void) { return 1; }

// 1 when the line came and every frame is intact, 0 when no line came,
// -1 when a frame changed.
static int deep_check(int depth, int (*at_bottom)(void)) {
    volatile char frame[1024];
    for (int i = 0; i < 1024; i++) frame[i] = (char)(depth + i);
    int r = depth == 0 ? at_bottom() : deep_check(depth - 1, at_bottom);
    for (int i = 0; i < 1024; i++)
        if (frame[i] != (char)(depth + i)) return -1;
    return r;
}

static int run_case(void) {
    // 200 frames of 1 KiB below the read; each checks its own after.
    int r = deep_check(200, wait_line);
    if (r == 1) {
        printf("ok\n");
        return 0;
    }
    printf(r == 0 ? "FAIL: no line\n" : "FAIL: a stack frame changed\n");
    return 1;
}
