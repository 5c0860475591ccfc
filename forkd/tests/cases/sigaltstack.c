// An alternate signal stack of 64 KiB. Checks it is still installed, with
// its size, and enabled.
#include "case.h"

static int setup(void) {
    stack_t ss = {.ss_sp = malloc(65536), .ss_size = 65536, .ss_flags = 0};
    return sigaltstack(&ss, NULL) == 0;
}

static int check(void) {
    stack_t ss;
    sigaltstack(NULL, &ss);
    CHECK(ss.ss_size == 65536 && ss.ss_sp != NULL && !(ss.ss_flags & SS_DISABLE));
    return 1;
}
