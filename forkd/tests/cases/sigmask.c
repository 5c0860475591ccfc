// The signal mask: SIGUSR1 and SIGRTMIN+3 blocked. Checks both are still
// blocked after restore, and SIGUSR2 (never blocked) is not.
#include "case.h"

static int setup(void) {
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    sigaddset(&s, SIGRTMIN + 3);
    return sigprocmask(SIG_BLOCK, &s, NULL) == 0;
}

static int check(void) {
    sigset_t s;
    sigprocmask(SIG_BLOCK, NULL, &s);
    CHECK(sigismember(&s, SIGUSR1) && sigismember(&s, SIGRTMIN + 3));
    CHECK(!sigismember(&s, SIGUSR2));
    return 1;
}
