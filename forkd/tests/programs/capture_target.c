/* A process with state in every place capture must look: globals, heap,
 * a large mmap, TLS, an AVX register, a signal handler. It prints a checksum
 * of that state and its addresses, then blocks in read(0). On "go" it
 * prints the checksum again (and what the handler saw) and exits 0. */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define BIG (64u << 20)

static uint64_t global_data[512] = {1, 2, 3};
static __thread uint64_t tls_value = 0x7151;
static volatile sig_atomic_t got_signal;
static unsigned char *big;
static uint64_t *heap;

static void on_usr1(int sig) { got_signal = sig; }

/* glibc registers rseq for every thread; registering the same area again
 * fails with EBUSY exactly when a registration is in place. */
extern const ptrdiff_t __rseq_offset;
extern const unsigned int __rseq_size;
static const char *rseq_state(void) {
    if (__rseq_size == 0) return "rseq unused";
    void *area = (char *)__builtin_thread_pointer() + __rseq_offset;
    long r = syscall(SYS_rseq, area, 32, 0, 0x53053053);
    if (r == -1 && errno == EBUSY) return "rseq registered";
    if (r == 0) return "rseq WAS NOT REGISTERED";
    return "rseq error";
}

/* A calloc after a free must give zeros. */
static const char *calloc_state(void) {
    unsigned char *p = malloc(48 * 1024);
    memset(p, 0xab, 48 * 1024);
    free(p);
    unsigned char *q = calloc(48 * 1024, 1);
    for (int i = 0; i < 48 * 1024; i++)
        if (q[i]) return "calloc NOT ZERO";
    free(q);
    return "calloc ok";
}

static uint64_t fnv(const void *p, size_t n, uint64_t h) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static uint64_t checksum(void) {
    uint64_t h = 0xcbf29ce484222325ull;
    h = fnv(global_data, sizeof global_data, h);
    h = fnv(heap, 100000 * sizeof *heap, h);
    for (size_t off = 0; off < BIG; off += 4096 * 7) h = fnv(big + off, 64, h);
    h = fnv(&tls_value, sizeof tls_value, h);
    return h;
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 3; i < 512; i++) global_data[i] = global_data[i - 1] * 31 + i;
    heap = malloc(100000 * sizeof *heap);
    for (int i = 0; i < 100000; i++) heap[i] = (uint64_t)i * 0x9e3779b97f4a7c15ull;
    big = mmap(NULL, BIG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (big == MAP_FAILED) return 2;
    /* Touch every 7th page with a pattern, and one page with zeros only. */
    for (size_t off = 0; off < BIG; off += 4096 * 7) memset(big + off, (int)(off >> 12), 4096);
    big[4096] = 0;
    tls_value ^= (uint64_t)(uintptr_t)heap;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaddset(&sa.sa_mask, SIGUSR2);
    sigaction(SIGUSR1, &sa, NULL);

    printf("ready %016llx handler=%p big=%p heap=%p tls=%p global=%p\n", (unsigned long long)checksum(),
           (void *)on_usr1, (void *)big, (void *)heap, (void *)&tls_value, (void *)global_data);

    /* Keep a known value in ymm15 across the blocking read: the raw syscall
     * does not touch vector registers. */
    char buf[16];
    long n;
    uint64_t pattern[4] = {0x1111222233334444ull, 0x5555666677778888ull, 0x99990000aaaabbbbull, 0xccccddddeeeeffffull};
    uint64_t after[4];
    __asm__ volatile("vmovdqu %[p], %%ymm15\n\t"
                     "syscall\n\t"
                     "vmovdqu %%ymm15, %[a]\n\t"
                     : "=a"(n), [a] "=m"(after)
                     : "a"(0L), "D"(0L), "S"(buf), "d"(sizeof buf - 1), [p] "m"(pattern)
                     : "rcx", "r11", "memory", "xmm15");
    if (n < 0) { printf("read failed: %ld\n", n); return 3; }
    buf[n] = 0;
    printf("got %s", buf);
    printf("ymm15 %s\n", memcmp(pattern, after, sizeof pattern) == 0 ? "intact" : "CLOBBERED");
    printf("checksum %016llx signal %d\n", (unsigned long long)checksum(), (int)got_signal);
    int cpu = sched_getcpu();
    printf("cpu %s %s %s\n", cpu >= 0 && cpu < 4096 ? "ok" : "BAD", rseq_state(), calloc_state());
    return 0;
}
