// The thread's name (comm): "corpus-named", set with PR_SET_NAME. Checks
// PR_GET_NAME gives it back.
#include "case.h"

static int setup(void) { return prctl(PR_SET_NAME, "corpus-named") == 0; }

static int check(void) {
    char n[32] = {0};
    prctl(PR_GET_NAME, n);
    CHECK(!strcmp(n, "corpus-named"));
    return 1;
}
