// The environment: CORPUS_VALUE set at run time (on libc's heap), PATH as
// inherited. Checks both read back the same.
#include "case.h"

static char *environ_copy;

static int setup(void) {
    setenv("CORPUS_VALUE", "forty-two", 1);
    environ_copy = strdup(getenv("PATH") ? getenv("PATH") : "");
    return 1;
}

static int check(void) {
    CHECK(getenv("CORPUS_VALUE") && !strcmp(getenv("CORPUS_VALUE"), "forty-two"));
    CHECK(!strcmp(environ_copy, getenv("PATH") ? getenv("PATH") : ""));
    return 1;
}
