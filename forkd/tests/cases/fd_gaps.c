// A descriptor table with gaps: /dev/null at 10 and 20 only. Checks 10
// and 20 are open and 11 is not.
#include "case.h"

static int setup(void) {
    int n = open("/dev/null", O_RDWR);
    if (n < 0 || dup2(n, 10) != 10 || dup2(n, 20) != 20) return 0;
    close(n);
    return 1;
}

static int check(void) {
    CHECK(fcntl(10, F_GETFD) >= 0 && fcntl(20, F_GETFD) >= 0);
    CHECK(fcntl(11, F_GETFD) == -1 && errno == EBADF);
    return 1;
}
