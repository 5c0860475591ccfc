// A directory descriptor: /usr opened O_DIRECTORY. Checks it is still a
// directory, and that fchdir to it lands in /usr.
#include "case.h"

static int fd_dir;

static int setup(void) {
    fd_dir = open("/usr", O_RDONLY | O_DIRECTORY);
    return fd_dir >= 0;
}

static int check(void) {
    struct stat st;
    CHECK(fstat(fd_dir, &st) == 0 && S_ISDIR(st.st_mode));
    CHECK(fchdir(fd_dir) == 0);
    char b[64];
    CHECK(getcwd(b, sizeof b) && !strcmp(b, "/usr"));
    return 1;
}
