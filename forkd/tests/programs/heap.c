/* A process with a big private heap, for memory-sharing tests and the
 * heap-walk benchmark. argv[1]: heap size in MiB (default 256).
 * Fills every page with a pattern, prints "checksum <checksum>" and "ready",
 * then serves
 * commands, one per line on stdin:
 *   sum    read the whole heap, print "sum <checksum> <pid>"
 *   tsum   the same, timed: "tsum <checksum> <microseconds>"
 *   hold   print "holding <pid>" and wait for the next line
 *   sleep N  print "sleeping <pid>", then sleep N seconds
 *   await PATH  print "waiting <pid>", create PATH.<pid>, then wait until
 *          PATH exists
 *   exit   (or EOF) exit 0 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static uint64_t checksum(const unsigned char *p, size_t len) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i += 64) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

int main(int argc, char **argv) {
    size_t mb = argc > 1 ? strtoul(argv[1], NULL, 10) : 256;
    size_t len = mb << 20;
    setvbuf(stdout, NULL, _IONBF, 0);
    unsigned char *heap = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (heap == MAP_FAILED) return 2;
    for (size_t i = 0; i < len / PAGE; i++) memset(heap + i * PAGE, (int)(i * 31 + 1), PAGE);
    printf("checksum %016llx\nready\n", (unsigned long long)checksum(heap, len));
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "sum", 3))
            printf("sum %016llx %d\n", (unsigned long long)checksum(heap, len), getpid());
        else if (!strncmp(line, "tsum", 4)) {
            struct timespec a, b;
            clock_gettime(CLOCK_MONOTONIC, &a);
            unsigned long long c = (unsigned long long)checksum(heap, len);
            clock_gettime(CLOCK_MONOTONIC, &b);
            printf("tsum %016llx %lld\n", c,
                   (long long)(b.tv_sec - a.tv_sec) * 1000000 + (b.tv_nsec - a.tv_nsec) / 1000);
        } else if (!strncmp(line, "hold", 4))
            printf("holding %d\n", getpid());
        else if (!strncmp(line, "sleep", 5)) {
            printf("sleeping %d\n", getpid());
            sleep((unsigned)strtoul(line + 5, NULL, 10));
        } else if (!strncmp(line, "await ", 6)) {
            line[strcspn(line, "\n")] = 0;
            printf("waiting %d\n", getpid());
            char mark[4200];
            snprintf(mark, sizeof mark, "%s.%d", line + 6, getpid());
            FILE *m = fopen(mark, "w");
            if (m) fclose(m);
            while (access(line + 6, F_OK) != 0) usleep(10000);
        } else if (!strncmp(line, "exit", 4))
            break;
    }
    return 0;
}
