/* A process whose own data segment (a 64-page initialized array, in the
 * executable's private file mapping) is written before it is captured,
 * for the test that template children own, from their start, the pages
 * the first child wrote there. Prints "ready", then serves commands, one
 * per line on stdin:
 *   write  add 1 to one byte of every page of the array, then print
 *          "wrote <sum of those bytes> faults <minor faults the writes took>"
 *   pause N  sleep N milliseconds (a child that lives on after its
 *          answer, as a server does: the first child's pages are sampled)
 *   exit   (or EOF) exit 0 */
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

#define PAGE 4096
#define PAGES 64

/* Initialized: in .data, not .bss. */
static unsigned char data[PAGES * PAGE] = {1};

static long minflt(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_minflt;
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 0; i < PAGES; i++) memset(data + i * PAGE, i * 7 + 3, PAGE);
    printf("ready\n");
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "write", 5)) {
            long f = minflt();
            for (int i = 0; i < PAGES; i++) data[i * PAGE] += 1;
            f = minflt() - f;
            unsigned long sum = 0;
            for (int i = 0; i < PAGES; i++) sum += data[i * PAGE];
            printf("wrote %lu faults %ld\n", sum, f);
        } else if (!strncmp(line, "pause ", 6)) {
            long ms = strtol(line + 6, NULL, 10);
            struct timespec t = {ms / 1000, (ms % 1000) * 1000000};
            nanosleep(&t, NULL);
        } else if (!strncmp(line, "exit", 4))
            break;
    }
    return 0;
}
