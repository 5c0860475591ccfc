// A private file mapping (/usr/bin/env, 2 pages) with a copy-on-write
// change. Checks the written bytes, and that the unwritten ELF header is
// still the file's.
#include "case.h"

static char *filemap;

static int setup(void) {
    int fd = open("/usr/bin/env", O_RDONLY);
    if (fd < 0) return 0;
    filemap = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    close(fd);
    if (filemap == MAP_FAILED) return 0;
    memcpy(filemap + 100, "written privately", 17);
    return 1;
}

static int check(void) {
    CHECK(!memcmp(filemap + 100, "written privately", 17));
    CHECK(filemap[0] == 0x7f && filemap[1] == 'E');
    return 1;
}
