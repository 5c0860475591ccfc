// A big private anonymous mapping: 64 MiB, every word written with
// pattern(). Checks every word.
#include "case.h"

static char *big;
static size_t big_len = 64 << 20;

static int setup(void) {
    big = mmap(NULL, big_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (big == MAP_FAILED) return 0;
    for (size_t i = 0; i < big_len / 8; i++) ((uint64_t *)big)[i] = pattern(i);
    return 1;
}

static int check(void) {
    for (size_t i = 0; i < big_len / 8; i++) CHECK(((uint64_t *)big)[i] == pattern(i));
    return 1;
}
