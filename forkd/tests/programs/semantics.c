/* Memory-semantics checks for lazily restored children. The parent builds
 * its memory, prints "ready", blocks reading stdin; the restored child then
 * runs the check named by argv[1] and prints one result line.
 *   absent    pages never touched in the parent read as zeros
 *   dontneed  after MADV_DONTNEED, pages read as zeros, never parent data
 *   mremap    a 64 MiB buffer moved with mremap keeps its content
 *   munmap    a range unmapped and mapped again reads as zeros
 *   fork      a grandchild sees the parent's memory (not zero fill)
 *   threads   two threads faulting the same pages see the same data
 *   grow      a mapping grown in place with mremap reads zeros past its old end
 *   mprotect  the buffer cut into many mappings by mprotect (no event tells
 *             the pager) still reads as the parent's, page runs and all
 *   slow      touch 4000 pages slowly, then print the checksum */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define MB (1u << 20)
#define BIG (64 * MB)
#define PAGE 4096

static unsigned char *buf;

static unsigned char pattern(size_t page) { return (unsigned char)(page * 13 + 7); }

static uint64_t checksum(const unsigned char *p, size_t len) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i += 64) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static int all_zero(const unsigned char *p, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (p[i]) return 0;
    return 1;
}

static int has_pattern(const unsigned char *p, size_t first_page, size_t pages) {
    for (size_t i = 0; i < pages; i++)
        for (size_t k = 0; k < PAGE; k += 512)
            if (p[i * PAGE + k] != pattern(first_page + i)) return 0;
    return 1;
}

static void *toucher(void *arg) {
    uint64_t *out = arg;
    *out = checksum(buf, BIG);
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "absent";
    setvbuf(stdout, NULL, _IONBF, 0);
    buf = mmap(NULL, BIG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) return 2;
    /* Every page has the pattern, except the last 1024 pages (never touched). */
    size_t touched = BIG / PAGE - 1024;
    for (size_t i = 0; i < touched; i++) memset(buf + i * PAGE, pattern(i), PAGE);
    /* A 1 MiB mapping with 1 MiB of free space after it, for "grow". */
    unsigned char *g = mmap(NULL, 2 * MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g == MAP_FAILED) return 2;
    munmap(g + MB, MB);
    memset(g, 0x5a, MB);
    uint64_t before = checksum(buf, BIG);
    printf("ready %016llx\n", (unsigned long long)before);
    char line[16];
    if (read(0, line, sizeof line) < 0) return 3;

    if (!strcmp(mode, "absent")) {
        int ok = all_zero(buf + touched * PAGE, 1024 * PAGE) && has_pattern(buf, 0, 16);
        printf("absent %s\n", ok ? "ok" : "WRONG");
    } else if (!strcmp(mode, "dontneed")) {
        /* Fault half of these pages in first, leave the rest unfetched. */
        volatile unsigned char sink = 0;
        for (size_t i = 0; i < 256; i += 2) sink ^= buf[i * PAGE];
        (void)sink;
        madvise(buf, 256 * PAGE, MADV_DONTNEED);
        int ok = all_zero(buf, 256 * PAGE) && has_pattern(buf + 256 * PAGE, 256, 256);
        /* glibc's calloc relies on exactly this for memory it got back. */
        printf("dontneed %s\n", ok ? "ok" : "WRONG (parent data after MADV_DONTNEED)");
    } else if (!strcmp(mode, "mremap")) {
        unsigned char *dst = mmap(NULL, BIG + PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        unsigned char *moved = mremap(buf, BIG, BIG, MREMAP_MAYMOVE | MREMAP_FIXED, dst + PAGE);
        if (moved == MAP_FAILED) { printf("mremap failed\n"); return 4; }
        int ok = has_pattern(moved, 0, touched) && all_zero(moved + touched * PAGE, 1024 * PAGE);
        printf("mremap %s %016llx\n", ok ? "ok" : "WRONG", (unsigned long long)checksum(moved, BIG));
    } else if (!strcmp(mode, "munmap")) {
        munmap(buf, 64 * PAGE);
        unsigned char *again = mmap(buf, 64 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        int ok = again == buf && all_zero(again, 64 * PAGE) && has_pattern(buf + 64 * PAGE, 64, 64);
        printf("munmap %s\n", ok ? "ok" : "WRONG");
    } else if (!strcmp(mode, "fork")) {
        int fds[2];
        if (pipe(fds)) return 5;
        pid_t pid = fork();
        if (pid == 0) {
            uint64_t h = checksum(buf, BIG);
            if (write(fds[1], &h, sizeof h) != sizeof h) _exit(1);
            _exit(0);
        }
        uint64_t h = 0;
        if (read(fds[0], &h, sizeof h) != sizeof h) return 6;
        int st;
        waitpid(pid, &st, 0);
        printf("fork %s %016llx\n", h == before ? "ok" : "WRONG", (unsigned long long)h);
    } else if (!strcmp(mode, "threads")) {
        pthread_t t[2];
        uint64_t r[2];
        for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, toucher, &r[i]);
        for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
        printf("threads %s\n", r[0] == before && r[1] == before ? "ok" : "WRONG");
    } else if (!strcmp(mode, "grow")) {
        unsigned char *same = mremap(g, MB, 2 * MB, 0);
        int ok = same == g;
        for (size_t i = 0; ok && i < MB; i += 512) ok = g[i] == 0x5a;
        ok = ok && all_zero(g + MB, MB);
        printf("grow %s\n", ok ? "ok" : "WRONG");
    } else if (!strcmp(mode, "mprotect")) {
        /* Every 7th page read-only: each is a mapping of its own, and a run
         * of pages the pager fills at once crosses their edges. */
        int ok = 1;
        for (size_t i = 3; i < touched; i += 7)
            if (mprotect(buf + i * PAGE, PAGE, PROT_READ)) ok = 0;
        ok = ok && checksum(buf, BIG) == before && has_pattern(buf, 0, touched);
        printf("mprotect %s\n", ok ? "ok" : "WRONG");
    } else if (!strcmp(mode, "slow")) {
        uint64_t h = 0;
        for (size_t i = 0; i < 4000; i++) {
            h += buf[i * PAGE];
            usleep(1000);
        }
        printf("slow %016llx %016llx\n", (unsigned long long)h, (unsigned long long)checksum(buf, BIG));
    }
    return 0;
}
