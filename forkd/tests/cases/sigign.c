// An ignored signal: SIGPIPE set to SIG_IGN. Checks it is still ignored.
#include "case.h"

static int setup(void) { return signal(SIGPIPE, SIG_IGN) != SIG_ERR; }

static int check(void) {
    struct sigaction sa;
    sigaction(SIGPIPE, NULL, &sa);
    CHECK(sa.sa_handler == SIG_IGN);
    return 1;
}
