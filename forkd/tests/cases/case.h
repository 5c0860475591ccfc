// What every restore case needs (CRIU's zdtm as the model). A case is one
// program, tests/cases/NAME.c: it sets up one piece of process state
// (`setup`), prints "ready", waits for a line on stdin, then checks that the
// state is still what it set up (`check`) and prints "ok" (exit 0) or
// "FAIL: what differs" (exit 1). Run by tests/corpus.rs in every restore
// mode; a restored child must pass exactly as the original would.
//
// A case includes this header, then defines
//     static int setup(void);  1 when the state is set up
//     static int check(void);  1 ok, or 0 with `failure` set (see CHECK)
// A case that must wait for its line somewhere else (deep_stack) defines
// CASE_OWN_RUN before the include and, instead of `check`,
//     static int run_case(void);  reads the line, prints the verdict,
//                                 returns the exit code
#ifndef CASE_H
#define CASE_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define CASE_UNUSED __attribute__((unused))

// Why `check` failed: the condition that did not hold.
static const char *failure CASE_UNUSED;
#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            failure = #cond;                                                          \
            return 0;                                                                 \
        }                                                                             \
    } while (0)

// A value for word i of a filled region, so any misplaced page shows.
static CASE_UNUSED uint64_t pattern(uint64_t i) {
    return i * 0x9e3779b97f4a7c15ull ^ 0x5bd1e995;
}

// Does reading (write = 0) or writing (write = 1) *p fault with SIGSEGV?
static sigjmp_buf faults_jb;
static void faults_on_segv(int s) {
    (void)s;
    siglongjmp(faults_jb, 1);
}
static CASE_UNUSED int faults(volatile char *p, int write) {
    struct sigaction sa = {0}, old;
    sa.sa_handler = faults_on_segv;
    sigaction(SIGSEGV, &sa, &old);
    int f = 0;
    if (sigsetjmp(faults_jb, 1) == 0) {
        if (write) *p = 1; else (void)*p;
    } else {
        f = 1;
    }
    sigaction(SIGSEGV, &old, NULL);
    return f;
}

// The line that tells the case to check: 1 when it came, 0 at end of input.
static CASE_UNUSED int wait_line(void) {
    char line[64];
    return fgets(line, sizeof line, stdin) != NULL;
}

static int setup(void);
#ifdef CASE_OWN_RUN
static int run_case(void);
#else
static int check(void);
static int run_case(void) {
    if (!wait_line()) return 3;
    if (check()) {
        printf("ok\n");
        return 0;
    }
    printf("FAIL: %s\n", failure);
    return 1;
}
#endif

int main(void) {
    if (!setup()) {
        printf("setup failed\n");
        return 2;
    }
    printf("ready\n");
    fflush(stdout);
    return run_case();
}

#endif
