// The SSE control register: MXCSR rounding set toward zero (bits 13-14),
// as fesetround would set it. Checks both bits are still set.
#include "case.h"

static int setup(void) {
    unsigned m;
    __asm__ volatile("stmxcsr %0" : "=m"(m));
    m = (m & ~0x6000u) | 0x6000u;
    __asm__ volatile("ldmxcsr %0" : : "m"(m));
    return 1;
}

static int check(void) {
    unsigned m;
    __asm__ volatile("stmxcsr %0" : "=m"(m));
    CHECK((m & 0x6000u) == 0x6000u);
    return 1;
}
