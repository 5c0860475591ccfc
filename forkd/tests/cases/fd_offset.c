// A file descriptor's offset and flags: /usr/bin/env opened O_CLOEXEC,
// sought to 1234. Checks the offset and FD_CLOEXEC.
#include "case.h"

static int fd_file;

static int setup(void) {
    fd_file = open("/usr/bin/env", O_RDONLY | O_CLOEXEC);
    return fd_file >= 0 && lseek(fd_file, 1234, SEEK_SET) == 1234;
}

static int check(void) {
    CHECK(lseek(fd_file, 0, SEEK_CUR) == 1234);
    CHECK(fcntl(fd_file, F_GETFD) & FD_CLOEXEC);
    return 1;
}
