// Generated code: `mov eax, 42; ret` written to an anonymous page, then
// made PROT_READ | PROT_EXEC. Checks calling it returns 42.
#include "case.h"

static char *code;

static int setup(void) {
    code = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED) return 0;
    // mov eax, 42; ret
    unsigned char insns[] = {0xb8, 42, 0, 0, 0, 0xc3};
    memcpy(code, insns, sizeof insns);
    return mprotect(code, 4096, PROT_READ | PROT_EXEC) == 0;
}

static int check(void) {
    int (*f)(void) = (int (*)(void))code;
    CHECK(f() == 42);
    return 1;
}
