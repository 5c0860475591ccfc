// A signal handler: SIGUSR2 caught by a handler, with SA_RESTART and SIGHUP
// in its mask. Checks the disposition is the same after restore, and that
// raising SIGUSR2 runs the handler once.
#include "case.h"

static volatile sig_atomic_t got_usr2;
static void on_usr2(int s) {
    (void)s;
    got_usr2++;
}

static int setup(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_usr2;
    sa.sa_flags = SA_RESTART;
    sigaddset(&sa.sa_mask, SIGHUP);
    return sigaction(SIGUSR2, &sa, NULL) == 0;
}

static int check(void) {
    struct sigaction sa;
    sigaction(SIGUSR2, NULL, &sa);
    CHECK(sa.sa_handler == on_usr2);
    CHECK(sa.sa_flags & SA_RESTART);
    CHECK(sigismember(&sa.sa_mask, SIGHUP));
    raise(SIGUSR2);
    CHECK(got_usr2 == 1);
    return 1;
}
