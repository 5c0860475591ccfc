// libc's rand() state: seeded and advanced 100 draws. Checks the next 8
// draws are the ones the process itself would have drawn (a fork child
// draws what its parent would have).
#include "case.h"

static int rand_expect[8];

static int setup(void) {
    srand(12345);
    for (int i = 0; i < 100; i++) rand();
    // What the parent itself would draw next: saved, then rewound.
    srand(12345);
    for (int i = 0; i < 100; i++) rand();
    for (int i = 0; i < 8; i++) rand_expect[i] = rand();
    srand(12345);
    for (int i = 0; i < 100; i++) rand();
    return 1;
}

static int check(void) {
    // A fork child draws what its parent would have drawn.
    for (int i = 0; i < 8; i++) CHECK(rand() == rand_expect[i]);
    return 1;
}
