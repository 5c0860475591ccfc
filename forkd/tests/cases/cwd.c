// The working directory: /usr/lib. Checks getcwd still says /usr/lib.
#include "case.h"

static int setup(void) { return chdir("/usr/lib") == 0; }

static int check(void) {
    char b[256];
    CHECK(getcwd(b, sizeof b) && !strcmp(b, "/usr/lib"));
    return 1;
}
