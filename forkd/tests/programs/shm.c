/* Shared memory of three kinds, for fork-semantics tests: a MAP_SHARED
 * anonymous region (4 MiB), a /dev/shm file mapped shared (1 MiB) and a
 * SysV segment (1 MiB, marked for removal once attached). Each page holds
 * a pattern. Prints "ready", then serves one command per stdin line:
 *   check      every page still holds its pattern: "check anon=ok shm=ok sysv=ok"
 *   dontneed   MADV_DONTNEED over the anonymous region, then check it:
 *              "dontneed ok" (shared memory keeps its contents)
 *   mark N     write N into page 1 of each region: "marked N"
 *   show       "show anon=A shm=S sysv=V": page 1's first byte of each
 *   await P    create P.<pid>, wait until P exists: "waiting <pid>" */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <unistd.h>

#define PAGE 4096
#define MB (1u << 20)

static unsigned char pat(int region, size_t page) { return (unsigned char)(page * 7 + region * 50 + 1); }

static void fill(unsigned char *p, size_t len, int region) {
    for (size_t i = 0; i < len / PAGE; i++) memset(p + i * PAGE, pat(region, i), PAGE);
}

static const char *ok(const unsigned char *p, size_t len, int region) {
    for (size_t i = 0; i < len / PAGE; i++) {
        if (i == 1) continue; /* page 1 carries marks */
        for (size_t k = 0; k < PAGE; k += 256)
            if (p[i * PAGE + k] != pat(region, i)) return "WRONG";
    }
    return "ok";
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    unsigned char *anon = mmap(NULL, 4 * MB, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    char name[64];
    snprintf(name, sizeof name, "/dev/shm/rf-shm-test-%d", getpid());
    int fd = open(name, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (anon == MAP_FAILED || fd < 0 || ftruncate(fd, MB) != 0) return 2;
    unsigned char *shm = mmap(NULL, MB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    unlink(name);
    int id = shmget(IPC_PRIVATE, MB, IPC_CREAT | 0600);
    unsigned char *sysv = id < 0 ? (void *)-1 : shmat(id, NULL, 0);
    if (shm == MAP_FAILED || sysv == (void *)-1) return 2;
    shmctl(id, IPC_RMID, NULL);
    fill(anon, 4 * MB, 0);
    fill(shm, MB, 1);
    fill(sysv, MB, 2);
    printf("ready\n");
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (!strcmp(line, "check")) {
            printf("check anon=%s shm=%s sysv=%s\n", ok(anon, 4 * MB, 0), ok(shm, MB, 1), ok(sysv, MB, 2));
        } else if (!strcmp(line, "dontneed")) {
            madvise(anon, 4 * MB, MADV_DONTNEED);
            printf("dontneed %s\n", ok(anon, 4 * MB, 0));
        } else if (!strncmp(line, "mark ", 5)) {
            unsigned char n = (unsigned char)atoi(line + 5);
            anon[PAGE] = n;
            shm[PAGE] = n;
            sysv[PAGE] = n;
            printf("marked %d\n", n);
        } else if (!strcmp(line, "show")) {
            printf("show anon=%d shm=%d sysv=%d\n", anon[PAGE], shm[PAGE], sysv[PAGE]);
        } else if (!strncmp(line, "await ", 6)) {
            char mark[4200];
            snprintf(mark, sizeof mark, "%s.%d", line + 6, getpid());
            FILE *m = fopen(mark, "w");
            if (m) fclose(m);
            printf("waiting %d\n", getpid());
            while (access(line + 6, F_OK) != 0) usleep(10000);
        }
    }
    return 0;
}
