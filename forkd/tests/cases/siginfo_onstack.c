// An SA_SIGINFO | SA_ONSTACK handler for SIGURG on a 64 KiB alternate
// stack. Checks both flags, and that raising SIGURG runs the handler once
// with its siginfo.
#include "case.h"

static volatile sig_atomic_t got_info;
static void on_info(int s, siginfo_t *si, void *u) {
    (void)u;
    if (s == SIGURG && si->si_signo == SIGURG) got_info++;
}

static int setup(void) {
    stack_t ss = {.ss_sp = malloc(65536), .ss_size = 65536};
    struct sigaction sa = {0};
    sa.sa_sigaction = on_info;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    return sigaltstack(&ss, NULL) == 0 && sigaction(SIGURG, &sa, NULL) == 0;
}

static int check(void) {
    struct sigaction sa;
    sigaction(SIGURG, NULL, &sa);
    CHECK((sa.sa_flags & (SA_SIGINFO | SA_ONSTACK)) == (SA_SIGINFO | SA_ONSTACK));
    raise(SIGURG);
    CHECK(got_info == 1);
    return 1;
}
