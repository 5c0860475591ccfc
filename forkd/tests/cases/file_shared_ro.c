// A shared read-only file mapping: the first page of /usr/bin/env. Checks
// it still shows the file's ELF magic.
#include "case.h"

static const char *shared_ro;

static int setup(void) {
    int fd = open("/usr/bin/env", O_RDONLY);
    if (fd < 0) return 0;
    shared_ro = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    return shared_ro != MAP_FAILED;
}

static int check(void) {
    CHECK(shared_ro[0] == 0x7f && shared_ro[1] == 'E' && shared_ro[2] == 'L');
    return 1;
}
