// File status flags: /dev/null opened write-only, O_APPEND | O_NONBLOCK.
// Checks the access mode and both flags.
#include "case.h"

static int fd_append;

static int setup(void) {
    fd_append = open("/dev/null", O_WRONLY | O_APPEND | O_NONBLOCK);
    return fd_append >= 0;
}

static int check(void) {
    int fl = fcntl(fd_append, F_GETFL);
    CHECK(fl >= 0 && (fl & O_APPEND) && (fl & O_NONBLOCK) && (fl & O_ACCMODE) == O_WRONLY);
    return 1;
}
