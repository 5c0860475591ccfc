// Thread-local storage (the fs base): a __thread value set. Checks it
// reads back the same.
#include "case.h"

static __thread uint64_t tls_value;

static int setup(void) {
    tls_value = 0xfeedfacecafebeefull;
    return 1;
}

static int check(void) {
    CHECK(tls_value == 0xfeedfacecafebeefull);
    return 1;
}
