/* The C API (libremotefork/include/remotefork.h) end to end: start a
 * parent (a shell blocked reading its stdin), capture it with rf_capture,
 * open the seed (a directory, or a reference ADDR/ID#KEY when given), and
 * start children in several modes, each answering the square of the
 * number written to it. Prints "ok N children" or "FAIL ...".
 *
 *   api_c SCRATCH_DIR [REFERENCE]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "remotefork.h"

static int fail(const char *what) {
    printf("FAIL %s: %s\n", what, rf_last_error());
    return 1;
}

/* Wait (up to 60 s: a loaded machine) until pid sleeps in read(0, ...)
 * (x86_64 syscall 0). */
static int blocked_in_read(int pid) {
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/syscall", pid);
    for (int i = 0; i < 6000; i++) {
        FILE *f = fopen(path, "r");
        if (f) {
            size_t n = fread(buf, 1, sizeof buf - 1, f);
            fclose(f);
            buf[n] = 0;
            if (strncmp(buf, "0 0x0 ", 6) == 0) return 1;
        }
        usleep(10000);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: api_c SCRATCH_DIR [REFERENCE]\n");
        return 2;
    }
    /* Bad input is refused with a reason, and nothing else breaks. */
    if (rf_seed_open("/nonexistent/seed") != NULL || strlen(rf_last_error()) == 0)
        return fail("opening a missing seed was not refused");
    if (rf_seed_open_remote("no-key-here") != NULL || !strstr(rf_last_error(), "ADDR/"))
        return fail("a bad reference was not refused by name");

    rf_seed_t *seed;
    int parent = -1;
    if (argc > 2) {
        seed = rf_seed_open_remote(argv[2]);
        if (!seed) return fail("rf_seed_open_remote");
    } else {
        int in[2];
        if (pipe(in) != 0) return 1;
        parent = fork();
        if (parent == 0) {
            dup2(in[0], 0);
            close(in[0]);
            close(in[1]);
            execl("/bin/sh", "sh", "-c", "read x; echo $((x * x))", (char *)NULL);
            _exit(127);
        }
        close(in[0]);
        if (!blocked_in_read(parent)) return fail("the parent never blocked in read");
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/seed", argv[1]);
        if (rf_capture(parent, dir) != 0) return fail("rf_capture");
        seed = rf_seed_open(dir);
        if (!seed) return fail("rf_seed_open");
    }

    /* lazy+template, lazy from scratch, eager, recorded prefetch */
    rf_spawn_opts_t modes[4];
    for (int m = 0; m < 4; m++) rf_spawn_opts_default(&modes[m]);
    modes[1].from_template = 0;
    modes[2].lazy = 0;
    modes[3].prefetch = 2;
    int n = 0;
    for (int m = 0; m < 4; m++) {
        for (int i = 0; i < 3; i++) {
            rf_child_t *c = rf_spawn(seed, &modes[m], RF_STDIO_PIPED, RF_STDIO_PIPED, RF_STDIO_NULL);
            if (!c) return fail("rf_spawn");
            int in = rf_child_take_fd(c, 0), out = rf_child_take_fd(c, 1);
            if (in < 0 || out < 0) return fail("rf_child_take_fd");
            if (rf_child_take_fd(c, 0) != -1) return fail("a stream was taken twice");
            int x = 10 * m + i + 2;
            dprintf(in, "%d\n", x);
            close(in);
            char buf[64] = {0};
            ssize_t r = read(out, buf, sizeof buf - 1);
            close(out);
            long got = r > 0 ? strtol(buf, NULL, 10) : -1;
            if (got != (long)x * x) {
                printf("FAIL mode %d child %d (pid %d) answered %ld for %d\n", m, i,
                       rf_child_pid(c), got, x);
                return 1;
            }
            int st = rf_child_wait(c);
            if (st != 0) {
                printf("FAIL child %d ended with %d: %s\n", rf_child_pid(c), st, rf_last_error());
                return 1;
            }
            rf_child_free(c);
            n++;
        }
    }
    /* A killed child is reported as killed, by signal. */
    rf_child_t *c = rf_spawn(seed, NULL, RF_STDIO_PIPED, RF_STDIO_NULL, RF_STDIO_NULL);
    if (!c) return fail("rf_spawn");
    if (rf_child_signal(c, SIGKILL) != 0) return fail("rf_child_signal");
    if (rf_child_wait(c) != 128 + SIGKILL) return fail("a killed child's status");
    if (rf_child_signal(c, SIGTERM) != -1 || !strstr(rf_last_error(), "reaped"))
        return fail("signalling a reaped child was not refused");
    rf_child_free(c);
    rf_seed_close(seed);
    if (parent > 0) {
        kill(parent, SIGKILL);
        waitpid(parent, NULL, 0);
    }
    printf("ok %d children\n", n);
    return 0;
}
