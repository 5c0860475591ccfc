// Five threads, each in a different state, each with its own name (comm)
// and __thread value:
//   rf-main     the main thread, blocked reading stdin; SIGUSR1 blocked;
//   rf-cond     parked in pthread_cond_wait;
//   rf-sigwait  in sigwait for SIGUSR1, with SIGUSR1 and SIGUSR2 blocked
//               (SIGUSR2 in this thread only);
//   rf-spin     spinning in user mode with distinctive values live in
//               xmm8-xmm11 (and ymm12-ymm15 where the CPU has AVX), compared
//               every iteration without ever going through memory;
//   rf-futex    blocked forever in a raw futex(FUTEX_WAIT), no timeout, on a
//               word nobody changes.
// Setup waits until every thread is in its state before "ready". Checks:
// 5 tasks with exactly these names; each thread's signal mask (SigBlk) is
// its own (rf-sigwait's as the kernel shows it inside sigwait: SIGUSR1,
// waited for, unblocked there; once sigwait returns, rf-sigwait checks its
// mask is SIGUSR1 and SIGUSR2 again); the cond, sigwait and futex threads
// are blocked in their syscalls and the futex wait never returned; the spinner's registers never
// changed and it still iterates; pthread_kill of each thread (glibc's cached
// tid) reaches that very thread (a probe signal's handler reports the
// thread's __thread value and gettid(), whose comm must be the thread's
// name); the condvar thread wakes when signalled and the sigwait thread
// when sent SIGUSR1, each answering with its __thread value and gettid().
// Bounded waits (10 s) only turn a hang into a FAIL line.
#include "case.h"

#include <dirent.h>
#include <linux/futex.h>

enum { T_MAIN, T_COND, T_SIG, T_SPIN, T_FUTEX, NTHREADS };

static const char *const names[NTHREADS] = {"rf-main", "rf-cond", "rf-sigwait", "rf-spin",
                                            "rf-futex"};
// What each thread keeps in tls_value.
static const uint64_t tls_of[NTHREADS] = {
    0x6d61696e00000001ull, 0x636f6e6400000002ull, 0x7369677700000003ull,
    0x7370696e00000004ull, 0x6675747800000005ull};
static __thread uint64_t tls_value;

static pthread_t threads[NTHREADS];
// Set by each thread once it is about to block (or spin).
static volatile int started[NTHREADS];

// Failure message with details.
static char why[512];
#define FAILF(...)                                                                    \
    do {                                                                              \
        snprintf(why, sizeof why, __VA_ARGS__);                                       \
        failure = why;                                                                \
        return 0;                                                                     \
    } while (0)

static long gettid_(void) { return syscall(SYS_gettid); }

// Sleep 1 ms; false once `*deadline_ms` (counted down) has run out.
static int tick(int *deadline_ms) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
    return --*deadline_ms > 0;
}

// ---- the probe: a signal whose handler says which thread it ran on ----

#define PROBE_SIG (SIGRTMIN + 2)
static volatile uint64_t probe_tls;
static volatile long probe_tid;
static volatile int probe_done;

static void on_probe(int sig) {
    (void)sig;
    probe_tls = tls_value;
    probe_tid = gettid_();
    __atomic_store_n(&probe_done, 1, __ATOMIC_RELEASE);
}

// ---- rf-cond ----

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int cond_gen;                    // under mu: bumped to wake rf-cond
static volatile int cond_answered_gen;  // rf-cond's answer: for this generation
static volatile uint64_t cond_tls;
static volatile long cond_tid;

static void *cond_thread(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), names[T_COND]);
    tls_value = tls_of[T_COND];
    pthread_mutex_lock(&mu);
    int seen = cond_gen;
    started[T_COND] = 1;
    for (;;) {
        while (cond_gen == seen) pthread_cond_wait(&cv, &mu);
        seen = cond_gen;
        cond_tls = tls_value;
        cond_tid = gettid_();
        __atomic_store_n(&cond_answered_gen, seen, __ATOMIC_RELEASE);
    }
    return NULL;
}

// ---- rf-sigwait ----

static volatile int sig_answers;
static volatile int sig_got;
static volatile uint64_t sig_tls;
static volatile long sig_tid;
static volatile int sig_mask_ok;  // its mask after sigwait: SIGUSR1 and SIGUSR2 only

static void *sigwait_thread(void *arg) {
    (void)arg;
    sigset_t mine;
    sigemptyset(&mine);
    sigaddset(&mine, SIGUSR1);
    sigaddset(&mine, SIGUSR2);
    pthread_sigmask(SIG_SETMASK, &mine, NULL);
    pthread_setname_np(pthread_self(), names[T_SIG]);
    tls_value = tls_of[T_SIG];
    sigset_t wait_for;
    sigemptyset(&wait_for);
    sigaddset(&wait_for, SIGUSR1);
    started[T_SIG] = 1;
    for (;;) {
        int sig = 0;
        if (sigwait(&wait_for, &sig) != 0) continue;
        sig_got = sig;
        sig_tls = tls_value;
        sig_tid = gettid_();
        sigset_t now;
        pthread_sigmask(SIG_BLOCK, NULL, &now);
        int ok = 1;
        for (int s = 1; s <= SIGRTMAX; s++)
            if (sigismember(&now, s) != (s == SIGUSR1 || s == SIGUSR2)) ok = 0;
        sig_mask_ok = ok;
        __atomic_add_fetch(&sig_answers, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

// ---- rf-spin ----

// Written only by the spinner's loop.
static volatile uint64_t spin_count;
static volatile uint32_t spin_failed;
// The values the spinner keeps in its registers (read-only copies to
// compare against; the registers themselves are never stored).
static const uint64_t xmm_want[4][2] __attribute__((aligned(16))) = {
    {0x1111222233334444ull, 0x5555666677778888ull},
    {0x0123456789abcdefull, 0xfedcba9876543210ull},
    {0xdeadbeefcafef00dull, 0x8badf00d0badc0deull},
    {0x5a5a5a5aa5a5a5a5ull, 0x3c3c3c3cc3c3c3c3ull},
};
static const uint64_t ymm_want[4][4] __attribute__((aligned(32))) = {
    {0xa1a1a1a1a1a1a1a1ull, 0xb2b2b2b2b2b2b2b2ull, 0xc3c3c3c3c3c3c3c3ull, 0xd4d4d4d4d4d4d4d4ull},
    {0x0f0e0d0c0b0a0908ull, 0x0706050403020100ull, 0x1f1e1d1c1b1a1918ull, 0x1716151413121110ull},
    {0x7fffffffffffffffull, 0x8000000000000000ull, 0x00000000ffffffffull, 0xffffffff00000000ull},
    {0x243f6a8885a308d3ull, 0x13198a2e03707344ull, 0xa4093822299f31d0ull, 0x082efa98ec4e6c89ull},
};
static int spin_uses_avx;

static void *spin_thread(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), names[T_SPIN]);
    tls_value = tls_of[T_SPIN];
    started[T_SPIN] = 1;
    if (spin_uses_avx) {
        // ymm8-11 hold xmm_want in their low halves and zero above (VEX
        // loads zero the upper half); ymm12-15 hold ymm_want whole. Each
        // is XORed with its wanted value into a scratch register; all
        // scratch ORed together must be zero (AVX, not AVX2, instructions).
        __asm__ volatile(
            "vmovdqa 0(%[x]), %%xmm8\n\t"
            "vmovdqa 16(%[x]), %%xmm9\n\t"
            "vmovdqa 32(%[x]), %%xmm10\n\t"
            "vmovdqa 48(%[x]), %%xmm11\n\t"
            "vmovdqa 0(%[y]), %%ymm12\n\t"
            "vmovdqa 32(%[y]), %%ymm13\n\t"
            "vmovdqa 64(%[y]), %%ymm14\n\t"
            "vmovdqa 96(%[y]), %%ymm15\n\t"
            "1:\n\t"
            "vxorps 0(%[x]), %%xmm8, %%xmm0\n\t"
            "vxorps 16(%[x]), %%xmm9, %%xmm1\n\t"
            "vxorps 32(%[x]), %%xmm10, %%xmm2\n\t"
            "vxorps 48(%[x]), %%xmm11, %%xmm3\n\t"
            "vorps %%ymm1, %%ymm0, %%ymm0\n\t"
            "vorps %%ymm3, %%ymm2, %%ymm2\n\t"
            "vorps %%ymm2, %%ymm0, %%ymm0\n\t"
            "vextractf128 $1, %%ymm8, %%xmm4\n\t"
            "vextractf128 $1, %%ymm9, %%xmm5\n\t"
            "vorps %%xmm5, %%xmm4, %%xmm4\n\t"
            "vextractf128 $1, %%ymm10, %%xmm5\n\t"
            "vorps %%xmm5, %%xmm4, %%xmm4\n\t"
            "vextractf128 $1, %%ymm11, %%xmm5\n\t"
            "vorps %%xmm5, %%xmm4, %%xmm4\n\t"
            "vorps %%ymm4, %%ymm0, %%ymm0\n\t"
            "vxorps 0(%[y]), %%ymm12, %%ymm1\n\t"
            "vxorps 32(%[y]), %%ymm13, %%ymm2\n\t"
            "vxorps 64(%[y]), %%ymm14, %%ymm3\n\t"
            "vxorps 96(%[y]), %%ymm15, %%ymm5\n\t"
            "vorps %%ymm1, %%ymm0, %%ymm0\n\t"
            "vorps %%ymm2, %%ymm0, %%ymm0\n\t"
            "vorps %%ymm3, %%ymm0, %%ymm0\n\t"
            "vorps %%ymm5, %%ymm0, %%ymm0\n\t"
            "vptest %%ymm0, %%ymm0\n\t"
            "jz 3f\n\t"
            "movl $1, (%[failed])\n\t"
            "3:\n\t"
            "addq $1, (%[count])\n\t"
            "pause\n\t"
            "jmp 1b\n\t"
            :
            : [x] "r"(xmm_want), [y] "r"(ymm_want), [failed] "r"(&spin_failed),
              [count] "r"(&spin_count)
            : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm8", "xmm9", "xmm10", "xmm11",
              "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
    } else {
        __asm__ volatile(
            "movdqa 0(%[x]), %%xmm8\n\t"
            "movdqa 16(%[x]), %%xmm9\n\t"
            "movdqa 32(%[x]), %%xmm10\n\t"
            "movdqa 48(%[x]), %%xmm11\n\t"
            "1:\n\t"
            "movdqa %%xmm8, %%xmm0\n\t"
            "pcmpeqd 0(%[x]), %%xmm0\n\t"
            "movdqa %%xmm9, %%xmm1\n\t"
            "pcmpeqd 16(%[x]), %%xmm1\n\t"
            "movdqa %%xmm10, %%xmm2\n\t"
            "pcmpeqd 32(%[x]), %%xmm2\n\t"
            "movdqa %%xmm11, %%xmm3\n\t"
            "pcmpeqd 48(%[x]), %%xmm3\n\t"
            "pand %%xmm1, %%xmm0\n\t"
            "pand %%xmm3, %%xmm2\n\t"
            "pand %%xmm2, %%xmm0\n\t"
            "pmovmskb %%xmm0, %%eax\n\t"
            "cmpl $0xffff, %%eax\n\t"
            "je 3f\n\t"
            "movl $1, (%[failed])\n\t"
            "3:\n\t"
            "addq $1, (%[count])\n\t"
            "pause\n\t"
            "jmp 1b\n\t"
            :
            : [x] "r"(xmm_want), [failed] "r"(&spin_failed), [count] "r"(&spin_count)
            : "rax", "xmm0", "xmm1", "xmm2", "xmm3", "xmm8", "xmm9", "xmm10", "xmm11", "memory",
              "cc");
    }
    __builtin_unreachable();
}

// ---- rf-futex ----

static uint32_t futex_word;  // never changed, never woken
static volatile int futex_returns;
static volatile int futex_errno;

static void *futex_thread(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), names[T_FUTEX]);
    tls_value = tls_of[T_FUTEX];
    started[T_FUTEX] = 1;
    for (;;) {
        long r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        // A wait nobody wakes, with no timeout, whose interruptions
        // (ptrace stops, the probe's SA_RESTART handler) restart: it
        // never returns.
        futex_errno = r < 0 ? errno : 0;
        __atomic_add_fetch(&futex_returns, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

// ---- looking at the threads from /proc ----

// The tids in /proc/self/task (at most `max`); how many there are.
static int task_tids(long *tids, int max) {
    DIR *d = opendir("/proc/self/task");
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        if (n < max) tids[n] = strtol(e->d_name, NULL, 10);
        n++;
    }
    closedir(d);
    return n;
}

// /proc/self/task/TID/FILE into buf (NUL-terminated, trailing newline cut).
static int task_file(long tid, const char *file, char *buf, size_t size) {
    char path[96];
    snprintf(path, sizeof path, "/proc/self/task/%ld/%s", tid, file);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0) return 0;
    buf[n] = 0;
    if (n > 0 && buf[n - 1] == '\n' && strchr(buf, '\n') == buf + n - 1) buf[n - 1] = 0;
    return 1;
}

// Which of our threads task `tid` is, by its comm; -1 if none.
static int thread_of_tid(long tid) {
    char comm[64];
    if (!task_file(tid, "comm", comm, sizeof comm)) return -1;
    for (int i = 0; i < NTHREADS; i++)
        if (!strcmp(comm, names[i])) return i;
    return -1;
}

// The tid of thread `which`, found by its comm in /proc/self/task; 0 if
// it is not there.
static long tid_of(int which) {
    long tids[64];
    int n = task_tids(tids, 64);
    for (int i = 0; i < n && i < 64; i++)
        if (thread_of_tid(tids[i]) == which) return tids[i];
    return 0;
}

// Its SigBlk line as a number.
static int sigblk(long tid, uint64_t *out) {
    char st[4096];
    if (!task_file(tid, "status", st, sizeof st)) return 0;
    char *p = strstr(st, "\nSigBlk:");
    if (!p) return 0;
    *out = strtoull(p + 8, NULL, 16);
    return 1;
}

// The syscall number task `tid` is blocked in (/proc/.../syscall), or -1
// while it runs (or on error).
static long blocked_in(long tid) {
    char sc[256];
    if (!task_file(tid, "syscall", sc, sizeof sc)) return -1;
    if (sc[0] < '0' || sc[0] > '9') return -1;  // "running"
    return strtol(sc, NULL, 10);
}

static uint64_t bit(int sig) { return 1ull << (sig - 1); }

// What each thread's SigBlk must be, seen while it is where it waits:
// rf-sigwait blocks SIGUSR1 and SIGUSR2, but inside sigwait the kernel
// unblocks the signals waited for (and puts them back when it returns:
// rf-sigwait checks its own mask then).
static uint64_t mask_of(int which) {
    switch (which) {
    case T_MAIN: return bit(SIGUSR1);
    case T_SIG: return bit(SIGUSR2);
    default: return 0;
    }
}

// The syscall each blocked thread sits in (-1: not checked).
static long syscall_of(int which) {
    switch (which) {
    case T_COND: return SYS_futex;
    case T_SIG: return SYS_rt_sigtimedwait;
    case T_FUTEX: return SYS_futex;
    default: return -1;
    }
}

// The tasks are exactly our five threads, each blocked where it should be
// (waiting up to 10 s for a thread to get there), each with its own mask,
// the spinner iterating with its registers intact.
static int threads_in_place(void) {
    long tids[64];
    int n = task_tids(tids, 64);
    if (n != NTHREADS) FAILF("%d tasks in /proc/self/task, not %d", n, NTHREADS);
    int seen[NTHREADS] = {0};
    for (int i = 0; i < n; i++) {
        int w = thread_of_tid(tids[i]);
        char comm[64] = "?";
        task_file(tids[i], "comm", comm, sizeof comm);
        if (w < 0) FAILF("task %ld has comm \"%s\", not one of ours", tids[i], comm);
        if (seen[w]++) FAILF("two tasks named %s", names[w]);
    }
    for (int i = 0; i < n; i++) {
        int w = thread_of_tid(tids[i]);
        long want = syscall_of(w);
        int left = 10000;
        long in;
        while (want >= 0 && (in = blocked_in(tids[i])) != want)
            if (!tick(&left))
                FAILF("%s (task %ld) is not blocked in syscall %ld after 10 s (in %ld)", names[w],
                      tids[i], want, in);
        uint64_t m;
        if (!sigblk(tids[i], &m)) FAILF("no SigBlk for %s (task %ld)", names[w], tids[i]);
        if (m != mask_of(w))
            FAILF("%s's SigBlk is %016llx, not %016llx", names[w], (unsigned long long)m,
                  (unsigned long long)mask_of(w));
    }
    if (futex_returns)
        FAILF("the futex wait returned %d times (last errno %d)", futex_returns, futex_errno);
    if (spin_failed) FAILF("the spinner's %s registers changed", spin_uses_avx ? "xmm/ymm" : "xmm");
    uint64_t c0 = spin_count;
    int left = 10000;
    while (spin_count == c0)
        if (!tick(&left)) FAILF("the spinner stopped iterating (count %llu)", (unsigned long long)c0);
    return 1;
}

// pthread_kill(thread `which`, PROBE_SIG): it must reach that very thread.
static int probe(int which) {
    __atomic_store_n(&probe_done, 0, __ATOMIC_RELEASE);
    int r = pthread_kill(threads[which], PROBE_SIG);
    if (r) FAILF("pthread_kill of %s: %s", names[which], strerror(r));
    int left = 10000;
    while (!__atomic_load_n(&probe_done, __ATOMIC_ACQUIRE))
        if (!tick(&left)) FAILF("pthread_kill's probe never ran in %s (10 s)", names[which]);
    if (probe_tls != tls_of[which])
        FAILF("pthread_kill of %s ran its handler with __thread value %016llx, not %016llx",
              names[which], (unsigned long long)probe_tls, (unsigned long long)tls_of[which]);
    int on = thread_of_tid(probe_tid);
    if (on != which)
        FAILF("pthread_kill of %s ran its handler in task %ld (%s)", names[which], probe_tid,
              on < 0 ? "not ours" : names[on]);
    return 1;
}

static int setup(void) {
    pthread_setname_np(pthread_self(), names[T_MAIN]);
    tls_value = tls_of[T_MAIN];
    threads[T_MAIN] = pthread_self();
    spin_uses_avx = __builtin_cpu_supports("avx");
    struct sigaction sa = {0};
    sa.sa_handler = on_probe;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(PROBE_SIG, &sa, NULL)) return 0;
    // Created with main's mask still empty; rf-sigwait sets its own.
    if (pthread_create(&threads[T_COND], NULL, cond_thread, NULL)) return 0;
    if (pthread_create(&threads[T_SIG], NULL, sigwait_thread, NULL)) return 0;
    if (pthread_create(&threads[T_SPIN], NULL, spin_thread, NULL)) return 0;
    if (pthread_create(&threads[T_FUTEX], NULL, futex_thread, NULL)) return 0;
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    if (pthread_sigmask(SIG_BLOCK, &s, NULL)) return 0;
    int left = 10000;
    for (int i = 1; i < NTHREADS; i++)
        while (!started[i])
            if (!tick(&left)) return 0;
    // Everything in its state before "ready" (so a capture sees it so).
    if (!threads_in_place()) {
        fprintf(stderr, "threads_state setup: %s\n", failure);
        return 0;
    }
    return 1;
}

static int check(void) {
    if (tls_value != tls_of[T_MAIN]) FAILF("main's __thread value is %016llx", (unsigned long long)tls_value);
    if (!threads_in_place()) return 0;
    // glibc's cached tids: pthread_kill reaches each thread itself.
    if (!probe(T_MAIN) || !probe(T_COND) || !probe(T_SPIN) || !probe(T_FUTEX)) return 0;

    // rf-cond wakes on the condvar and answers.
    pthread_mutex_lock(&mu);
    int gen = ++cond_gen;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    int left = 10000;
    while (__atomic_load_n(&cond_answered_gen, __ATOMIC_ACQUIRE) != gen)
        if (!tick(&left)) FAILF("rf-cond did not wake on the condvar within 10 s");
    if (cond_tls != tls_of[T_COND])
        FAILF("rf-cond answered with __thread value %016llx", (unsigned long long)cond_tls);
    if (thread_of_tid(cond_tid) != T_COND) FAILF("rf-cond's gettid() %ld is not named rf-cond", cond_tid);

    // rf-sigwait wakes on SIGUSR1 sent to it by pthread_kill.
    int before = sig_answers;
    int r = pthread_kill(threads[T_SIG], SIGUSR1);
    if (r) FAILF("pthread_kill(rf-sigwait, SIGUSR1): %s", strerror(r));
    left = 10000;
    while (__atomic_load_n(&sig_answers, __ATOMIC_ACQUIRE) == before)
        if (!tick(&left)) FAILF("rf-sigwait did not get SIGUSR1 within 10 s");
    if (sig_got != SIGUSR1) FAILF("rf-sigwait got signal %d", sig_got);
    if (sig_tls != tls_of[T_SIG])
        FAILF("rf-sigwait answered with __thread value %016llx", (unsigned long long)sig_tls);
    if (thread_of_tid(sig_tid) != T_SIG)
        FAILF("rf-sigwait's gettid() %ld is not named rf-sigwait", sig_tid);
    if (!sig_mask_ok) FAILF("rf-sigwait's mask after sigwait is not SIGUSR1 and SIGUSR2 alone");

    // After all that, still every thread in place (the probes interrupted
    // the futex wait and the spinner; neither noticed).
    if (!threads_in_place()) return 0;
    if (tid_of(T_MAIN) != gettid_()) FAILF("main's gettid() %ld is not named rf-main", gettid_());
    return 1;
}
