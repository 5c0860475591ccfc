// The restore-case corpus (CRIU's zdtm as the model): `corpus CASE` sets
// up one piece of process state, prints "ready", waits for a line on stdin,
// then checks that the state is still what it set up and prints "ok" (exit
// 0) or "FAIL: what differs" (exit 1). Run by tests/corpus.rs in every
// restore mode; a restored child must pass exactly as the original would.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/time.h>
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
#include <time.h>
#include <unistd.h>

static const char *failure;
#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            failure = #cond;                                                          \
            return 0;                                                                 \
        }                                                                             \
    } while (0)

static uint64_t pattern(uint64_t i) { return i * 0x9e3779b97f4a7c15ull ^ 0x5bd1e995; }

/* --- signals --- */
static volatile sig_atomic_t got_usr2;
static void on_usr2(int s) { (void)s; got_usr2++; }

static sigjmp_buf jb;
static void on_segv(int s) { (void)s; siglongjmp(jb, 1); }
static int faults(volatile char *p, int write) {
    struct sigaction sa = {0}, old;
    sa.sa_handler = on_segv;
    sigaction(SIGSEGV, &sa, &old);
    int f = 0;
    if (sigsetjmp(jb, 1) == 0) {
        if (write) *p = 1; else (void)*p;
    } else {
        f = 1;
    }
    sigaction(SIGSEGV, &old, NULL);
    return f;
}

/* --- state kept between setup and check --- */
static char *big, *sparse, *ro, *guard, *shared, *grows, *filemap, *code;
static size_t big_len = 64 << 20, sparse_len = 1ull << 30;
static char tmpfile_path[256];
static int fd_file, fd_append;
static __thread uint64_t tls_value;
static char *heap_small[1000];
static void *brk_start;
static struct timespec mono_before;
static char *environ_copy;
static unsigned long at_random_copy[2];
static int fd_dir;
static char *thp, *untouched, *mixed;
static const char *shared_ro;
static size_t thp_len = 8 << 20, untouched_len = 16 << 20;
static int rand_expect[8];
static volatile int stack_sum;
static pthread_mutex_t robust;
static struct timeval real_before;
static volatile sig_atomic_t got_info;
static void on_info(int s, siginfo_t *si, void *u) {
    (void)u;
    if (s == SIGURG && si->si_signo == SIGURG) got_info++;
}

/* Deep recursion: the frames below the read stay live across restore. */
static int deep_check(int depth, int (*at_bottom)(void));
static int wait_line(void) {
    char line[64];
    return fgets(line, sizeof line, stdin) != NULL;
}
static int deep_check(int depth, int (*at_bottom)(void)) {
    volatile char frame[1024];
    for (int i = 0; i < 1024; i++) frame[i] = (char)(depth + i);
    int r = depth == 0 ? at_bottom() : deep_check(depth - 1, at_bottom);
    for (int i = 0; i < 1024; i++)
        if (frame[i] != (char)(depth + i)) return -1;
    return r;
}

static int setup(const char *c) {
    if (!strcmp(c, "sigmask")) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGUSR1);
        sigaddset(&s, SIGRTMIN + 3);
        return sigprocmask(SIG_BLOCK, &s, NULL) == 0;
    }
    if (!strcmp(c, "sigaction")) {
        struct sigaction sa = {0};
        sa.sa_handler = on_usr2;
        sa.sa_flags = SA_RESTART;
        sigaddset(&sa.sa_mask, SIGHUP);
        return sigaction(SIGUSR2, &sa, NULL) == 0;
    }
    if (!strcmp(c, "sigign")) return signal(SIGPIPE, SIG_IGN) != SIG_ERR;
    if (!strcmp(c, "sigaltstack")) {
        stack_t ss = {.ss_sp = malloc(65536), .ss_size = 65536, .ss_flags = 0};
        return sigaltstack(&ss, NULL) == 0;
    }
    if (!strcmp(c, "rlimit")) {
        struct rlimit r = {100, 200};
        return setrlimit(RLIMIT_NOFILE, &r) == 0;
    }
    if (!strcmp(c, "cwd")) return chdir("/usr/lib") == 0;
    if (!strcmp(c, "umask")) { umask(027); return 1; }
    if (!strcmp(c, "personality")) return personality(PER_LINUX | ADDR_COMPAT_LAYOUT) != -1;
    if (!strcmp(c, "environ")) {
        setenv("CORPUS_VALUE", "forty-two", 1);
        environ_copy = strdup(getenv("PATH") ? getenv("PATH") : "");
        return 1;
    }
    if (!strcmp(c, "auxv")) {
        memcpy(at_random_copy, (void *)getauxval(AT_RANDOM), 16);
        return getauxval(AT_PAGESZ) == 4096;
    }
    if (!strcmp(c, "vdso")) return clock_gettime(CLOCK_MONOTONIC, &mono_before) == 0;
    if (!strcmp(c, "rseq")) return sched_getcpu() >= 0;
    if (!strcmp(c, "big")) {
        big = mmap(NULL, big_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (big == MAP_FAILED) return 0;
        for (size_t i = 0; i < big_len / 8; i++) ((uint64_t *)big)[i] = pattern(i);
        return 1;
    }
    if (!strcmp(c, "sparse")) {
        sparse = mmap(NULL, sparse_len, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (sparse == MAP_FAILED) return 0;
        sparse[0] = 1;
        sparse[sparse_len / 2] = 2;
        sparse[sparse_len - 1] = 3;
        return 1;
    }
    if (!strcmp(c, "readonly")) {
        ro = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        strcpy(ro, "read only now");
        return mprotect(ro, 8192, PROT_READ) == 0;
    }
    if (!strcmp(c, "guard")) {
        guard = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        guard[0] = 'a';
        guard[2 * 4096] = 'c';
        return mprotect(guard + 4096, 4096, PROT_NONE) == 0;
    }
    if (!strcmp(c, "shared_anon")) {
        shared = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (shared == MAP_FAILED) return 0;
        for (int i = 0; i < (1 << 20); i += 4096) shared[i] = (char)(i >> 12);
        return 1;
    }
    if (!strcmp(c, "growsdown")) {
        grows = mmap(NULL, 16 * 4096, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN, -1, 0);
        if (grows == MAP_FAILED) return 0;
        memset(grows + 8 * 4096, 0x77, 8 * 4096);
        return 1;
    }
    if (!strcmp(c, "file_private")) {
        snprintf(tmpfile_path, sizeof tmpfile_path, "%s", "/etc/hostname");
        int fd = open("/usr/bin/env", O_RDONLY);
        if (fd < 0) return 0;
        filemap = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        close(fd);
        if (filemap == MAP_FAILED) return 0;
        memcpy(filemap + 100, "written privately", 17);
        return 1;
    }
    if (!strcmp(c, "jit")) {
        code = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (code == MAP_FAILED) return 0;
        // mov eax, 42; ret
        unsigned char insns[] = {0xb8, 42, 0, 0, 0, 0xc3};
        memcpy(code, insns, sizeof insns);
        return mprotect(code, 4096, PROT_READ | PROT_EXEC) == 0;
    }
    if (!strcmp(c, "fd_offset")) {
        fd_file = open("/usr/bin/env", O_RDONLY | O_CLOEXEC);
        return fd_file >= 0 && lseek(fd_file, 1234, SEEK_SET) == 1234;
    }
    if (!strcmp(c, "fd_append")) {
        fd_append = open("/dev/null", O_WRONLY | O_APPEND | O_NONBLOCK);
        return fd_append >= 0;
    }
    if (!strcmp(c, "tls")) { tls_value = 0xfeedfacecafebeefull; return 1; }
    if (!strcmp(c, "heap")) {
        for (int i = 0; i < 1000; i++) {
            heap_small[i] = malloc(16 + i * 7);
            memset(heap_small[i], i & 0xff, 16 + i * 7);
        }
        return 1;
    }
    if (!strcmp(c, "brk")) {
        brk_start = sbrk(0);
        char *p = sbrk(3 * 4096);
        if (p == (void *)-1) return 0;
        memset(p, 0x3c, 3 * 4096);
        return 1;
    }
    if (!strcmp(c, "mxcsr")) {
        // SSE rounding toward zero (bits 13-14), as fesetround would set it.
        unsigned m;
        __asm__ volatile("stmxcsr %0" : "=m"(m));
        m = (m & ~0x6000u) | 0x6000u;
        __asm__ volatile("ldmxcsr %0" : : "m"(m));
        return 1;
    }
    if (!strcmp(c, "comm")) return prctl(PR_SET_NAME, "corpus-named") == 0;
    if (!strcmp(c, "dontneed")) {
        big = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(big, 0x11, 1 << 20);
        return madvise(big + 4096, 4096, MADV_DONTNEED) == 0;
    }
    if (!strcmp(c, "mremap")) {
        char *a = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(a, 0x42, 4 * 4096);
        big = mremap(a, 4 * 4096, 64 * 4096, MREMAP_MAYMOVE);
        return big != MAP_FAILED;
    }
    if (!strcmp(c, "dir_fd")) {
        fd_dir = open("/usr", O_RDONLY | O_DIRECTORY);
        return fd_dir >= 0;
    }
    if (!strcmp(c, "fd_gaps")) {
        int n = open("/dev/null", O_RDWR);
        if (n < 0 || dup2(n, 10) != 10 || dup2(n, 20) != 20) return 0;
        close(n);
        return 1;
    }
    if (!strcmp(c, "thp")) {
        thp = mmap(NULL, thp_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (thp == MAP_FAILED) return 0;
        madvise(thp, thp_len, MADV_HUGEPAGE);
        for (size_t i = 0; i < thp_len; i += 4096) thp[i] = (char)(i >> 12);
        return 1;
    }
    if (!strcmp(c, "file_shared_ro")) {
        int fd = open("/usr/bin/env", O_RDONLY);
        if (fd < 0) return 0;
        shared_ro = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
        close(fd);
        return shared_ro != MAP_FAILED;
    }
    if (!strcmp(c, "anon_untouched")) {
        untouched = mmap(NULL, untouched_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        return untouched != MAP_FAILED;
    }
    if (!strcmp(c, "mixed_prot")) {
        mixed = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mixed == MAP_FAILED) return 0;
        for (int i = 0; i < 8; i++) mixed[i * 4096] = (char)('a' + i);
        for (int i = 1; i < 8; i += 2)
            if (mprotect(mixed + i * 4096, 4096, PROT_READ)) return 0;
        return 1;
    }
    if (!strcmp(c, "rand_state")) {
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
    if (!strcmp(c, "siginfo_onstack")) {
        stack_t ss = {.ss_sp = malloc(65536), .ss_size = 65536};
        struct sigaction sa = {0};
        sa.sa_sigaction = on_info;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        return sigaltstack(&ss, NULL) == 0 && sigaction(SIGURG, &sa, NULL) == 0;
    }
    if (!strcmp(c, "realtime")) return gettimeofday(&real_before, NULL) == 0;
    if (!strcmp(c, "robust_mutex")) {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        return pthread_mutex_init(&robust, &a) == 0 && pthread_mutex_lock(&robust) == 0;
    }
    if (!strcmp(c, "deep_stack")) return 1;
    fprintf(stderr, "unknown case %s\n", c);
    return 0;
}

static int check(const char *c) {
    if (!strcmp(c, "sigmask")) {
        sigset_t s;
        sigprocmask(SIG_BLOCK, NULL, &s);
        CHECK(sigismember(&s, SIGUSR1) && sigismember(&s, SIGRTMIN + 3));
        CHECK(!sigismember(&s, SIGUSR2));
        return 1;
    }
    if (!strcmp(c, "sigaction")) {
        struct sigaction sa;
        sigaction(SIGUSR2, NULL, &sa);
        CHECK(sa.sa_handler == on_usr2);
        CHECK(sa.sa_flags & SA_RESTART);
        CHECK(sigismember(&sa.sa_mask, SIGHUP));
        raise(SIGUSR2);
        CHECK(got_usr2 == 1);
        return 1;
    }
    if (!strcmp(c, "sigign")) {
        struct sigaction sa;
        sigaction(SIGPIPE, NULL, &sa);
        CHECK(sa.sa_handler == SIG_IGN);
        return 1;
    }
    if (!strcmp(c, "sigaltstack")) {
        stack_t ss;
        sigaltstack(NULL, &ss);
        CHECK(ss.ss_size == 65536 && ss.ss_sp != NULL && !(ss.ss_flags & SS_DISABLE));
        return 1;
    }
    if (!strcmp(c, "rlimit")) {
        struct rlimit r;
        getrlimit(RLIMIT_NOFILE, &r);
        CHECK(r.rlim_cur == 100 && r.rlim_max == 200);
        return 1;
    }
    if (!strcmp(c, "cwd")) {
        char b[256];
        CHECK(getcwd(b, sizeof b) && !strcmp(b, "/usr/lib"));
        return 1;
    }
    if (!strcmp(c, "umask")) {
        mode_t m = umask(0);
        CHECK(m == 027);
        return 1;
    }
    if (!strcmp(c, "personality")) {
        int p = personality(0xffffffff);
        CHECK(p & ADDR_COMPAT_LAYOUT);
        return 1;
    }
    if (!strcmp(c, "environ")) {
        CHECK(getenv("CORPUS_VALUE") && !strcmp(getenv("CORPUS_VALUE"), "forty-two"));
        CHECK(!strcmp(environ_copy, getenv("PATH") ? getenv("PATH") : ""));
        return 1;
    }
    if (!strcmp(c, "auxv")) {
        CHECK(getauxval(AT_PAGESZ) == 4096);
        CHECK(!memcmp(at_random_copy, (void *)getauxval(AT_RANDOM), 16));
        return 1;
    }
    if (!strcmp(c, "vdso")) {
        struct timespec now;
        CHECK(clock_gettime(CLOCK_MONOTONIC, &now) == 0);
        CHECK(now.tv_sec > mono_before.tv_sec ||
              (now.tv_sec == mono_before.tv_sec && now.tv_nsec >= mono_before.tv_nsec));
        return 1;
    }
    if (!strcmp(c, "rseq")) {
        CHECK(sched_getcpu() >= 0);
        return 1;
    }
    if (!strcmp(c, "big")) {
        for (size_t i = 0; i < big_len / 8; i++) CHECK(((uint64_t *)big)[i] == pattern(i));
        return 1;
    }
    if (!strcmp(c, "sparse")) {
        CHECK(sparse[0] == 1 && sparse[sparse_len / 2] == 2 && sparse[sparse_len - 1] == 3);
        CHECK(sparse[4096] == 0 && sparse[sparse_len / 4] == 0);
        return 1;
    }
    if (!strcmp(c, "readonly")) {
        CHECK(!strcmp(ro, "read only now"));
        CHECK(faults(ro, 1));
        return 1;
    }
    if (!strcmp(c, "guard")) {
        CHECK(guard[0] == 'a' && guard[2 * 4096] == 'c');
        CHECK(faults(guard + 4096, 0));
        return 1;
    }
    if (!strcmp(c, "shared_anon")) {
        for (int i = 0; i < (1 << 20); i += 4096) CHECK(shared[i] == (char)(i >> 12));
        return 1;
    }
    if (!strcmp(c, "growsdown")) {
        for (int i = 8 * 4096; i < 16 * 4096; i++) CHECK(grows[i] == 0x77);
        return 1;
    }
    if (!strcmp(c, "file_private")) {
        CHECK(!memcmp(filemap + 100, "written privately", 17));
        CHECK(filemap[0] == 0x7f && filemap[1] == 'E');
        return 1;
    }
    if (!strcmp(c, "jit")) {
        int (*f)(void) = (int (*)(void))code;
        CHECK(f() == 42);
        return 1;
    }
    if (!strcmp(c, "fd_offset")) {
        CHECK(lseek(fd_file, 0, SEEK_CUR) == 1234);
        CHECK(fcntl(fd_file, F_GETFD) & FD_CLOEXEC);
        return 1;
    }
    if (!strcmp(c, "fd_append")) {
        int fl = fcntl(fd_append, F_GETFL);
        CHECK(fl >= 0 && (fl & O_APPEND) && (fl & O_NONBLOCK) && (fl & O_ACCMODE) == O_WRONLY);
        return 1;
    }
    if (!strcmp(c, "tls")) {
        CHECK(tls_value == 0xfeedfacecafebeefull);
        return 1;
    }
    if (!strcmp(c, "heap")) {
        for (int i = 0; i < 1000; i++)
            for (int j = 0; j < 16 + i * 7; j++) CHECK(heap_small[i][j] == (char)(i & 0xff));
        char *more = malloc(1 << 20);
        CHECK(more != NULL);
        free(more);
        return 1;
    }
    if (!strcmp(c, "brk")) {
        char *p = (char *)brk_start;
        for (int i = 0; i < 3 * 4096; i++) CHECK(p[i] == 0x3c);
        // (stdio may have grown the heap since: at least ours is there.)
        CHECK((char *)sbrk(0) >= p + 3 * 4096);
        return 1;
    }
    if (!strcmp(c, "mxcsr")) {
        unsigned m;
        __asm__ volatile("stmxcsr %0" : "=m"(m));
        CHECK((m & 0x6000u) == 0x6000u);
        return 1;
    }
    if (!strcmp(c, "comm")) {
        char n[32] = {0};
        prctl(PR_GET_NAME, n);
        CHECK(!strcmp(n, "corpus-named"));
        return 1;
    }
    if (!strcmp(c, "dontneed")) {
        CHECK(big[0] == 0x11 && big[2 * 4096] == 0x11);
        CHECK(big[4096] == 0);
        return 1;
    }
    if (!strcmp(c, "mremap")) {
        for (int i = 0; i < 4 * 4096; i++) CHECK(big[i] == 0x42);
        CHECK(big[10 * 4096] == 0);
        return 1;
    }
    if (!strcmp(c, "dir_fd")) {
        struct stat st;
        CHECK(fstat(fd_dir, &st) == 0 && S_ISDIR(st.st_mode));
        CHECK(fchdir(fd_dir) == 0);
        char b[64];
        CHECK(getcwd(b, sizeof b) && !strcmp(b, "/usr"));
        return 1;
    }
    if (!strcmp(c, "fd_gaps")) {
        CHECK(fcntl(10, F_GETFD) >= 0 && fcntl(20, F_GETFD) >= 0);
        CHECK(fcntl(11, F_GETFD) == -1 && errno == EBADF);
        return 1;
    }
    if (!strcmp(c, "thp")) {
        for (size_t i = 0; i < thp_len; i += 4096) CHECK(thp[i] == (char)(i >> 12));
        return 1;
    }
    if (!strcmp(c, "file_shared_ro")) {
        CHECK(shared_ro[0] == 0x7f && shared_ro[1] == 'E' && shared_ro[2] == 'L');
        return 1;
    }
    if (!strcmp(c, "anon_untouched")) {
        for (size_t i = 0; i < untouched_len; i += 512) CHECK(untouched[i] == 0);
        return 1;
    }
    if (!strcmp(c, "mixed_prot")) {
        for (int i = 0; i < 8; i++) CHECK(mixed[i * 4096] == (char)('a' + i));
        for (int i = 0; i < 8; i++) CHECK(faults(mixed + i * 4096, 1) == (i % 2));
        return 1;
    }
    if (!strcmp(c, "rand_state")) {
        // A fork child draws what its parent would have drawn.
        for (int i = 0; i < 8; i++) CHECK(rand() == rand_expect[i]);
        return 1;
    }
    if (!strcmp(c, "siginfo_onstack")) {
        struct sigaction sa;
        sigaction(SIGURG, NULL, &sa);
        CHECK((sa.sa_flags & (SA_SIGINFO | SA_ONSTACK)) == (SA_SIGINFO | SA_ONSTACK));
        raise(SIGURG);
        CHECK(got_info == 1);
        return 1;
    }
    if (!strcmp(c, "realtime")) {
        struct timeval now;
        CHECK(gettimeofday(&now, NULL) == 0);
        CHECK(now.tv_sec >= real_before.tv_sec);
        return 1;
    }
    if (!strcmp(c, "robust_mutex")) {
        CHECK(pthread_mutex_trylock(&robust) == EBUSY);
        CHECK(pthread_mutex_unlock(&robust) == 0);
        CHECK(pthread_mutex_lock(&robust) == 0);
        return 1;
    }
    if (!strcmp(c, "deep_stack")) return 1;
    failure = "unknown case";
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: corpus CASE\n");
        return 2;
    }
    if (!setup(argv[1])) {
        printf("setup failed\n");
        return 2;
    }
    printf("ready\n");
    fflush(stdout);
    if (!strcmp(argv[1], "deep_stack")) {
        // 200 frames of 1 KiB below the read; each checks its own after.
        int r = deep_check(200, wait_line);
        if (r == 1) {
            printf("ok\n");
            return 0;
        }
        printf(r == 0 ? "FAIL: no line\n" : "FAIL: a stack frame changed\n");
        return 1;
    }
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 3;
    if (check(argv[1])) {
        printf("ok\n");
        return 0;
    }
    printf("FAIL: %s\n", failure);
    return 1;
}
