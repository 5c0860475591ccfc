// The auxiliary vector: AT_PAGESZ and the 16 bytes at AT_RANDOM. Checks
// the page size and that AT_RANDOM's bytes are the ones seen before.
#include "case.h"

static unsigned long at_random_copy[2];

static int setup(void) {
    memcpy(at_random_copy, (void *)getauxval(AT_RANDOM), 16);
    return getauxval(AT_PAGESZ) == 4096;
}

static int check(void) {
    CHECK(getauxval(AT_PAGESZ) == 4096);
    CHECK(!memcmp(at_random_copy, (void *)getauxval(AT_RANDOM), 16));
    return 1;
}
