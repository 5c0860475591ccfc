// A read-only mapping written before mprotect(PROT_READ). Checks its
// content, and that a write still faults.
#include "case.h"

static char *ro;

static int setup(void) {
    ro = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    strcpy(ro, "read only now");
    return mprotect(ro, 8192, PROT_READ) == 0;
}

static int check(void) {
    CHECK(!strcmp(ro, "read only now"));
    CHECK(faults(ro, 1));
    return 1;
}
