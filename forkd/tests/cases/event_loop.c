// An event loop's kernel objects: one epoll set watching an eventfd whose
// counter is 5, the read end of a pipe holding "queued bytes", a periodic
// timerfd (every 20 ms, never read by the parent, so expirations pile up)
// and a signalfd for SIGUSR1 (blocked). Each watch has its own user data.
// Checks, in the child: the set reports the eventfd and the pipe ready
// with their user data; the eventfd reads 5 + 3 after adding 3; the pipe
// holds exactly the bytes, then more written at its write end come out;
// the timer has expired (at least once more after a read, through epoll);
// SIGUSR1 sent to itself comes through epoll and the signalfd; every
// descriptor kept its number, O_NONBLOCK and FD_CLOEXEC.
// Bounded waits (10 s) only turn a hang into a FAIL line.
#include "case.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

enum { TAG_EVENT = 0x1001, TAG_PIPE = 0x2002, TAG_TIMER = 0x3003, TAG_SIGNAL = 0x4004 };

static const char queued[] = "queued bytes";
static int ep, efd, tfd, sfd, pr, pw;

static int watch(int fd, uint32_t events, uint64_t tag) {
    struct epoll_event e = {.events = events, .data.u64 = tag};
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) == 0;
}

static int setup(void) {
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &m, NULL)) return 0;
    ep = epoll_create1(EPOLL_CLOEXEC);
    efd = eventfd(5, EFD_NONBLOCK);
    int p[2];
    if (pipe2(p, O_NONBLOCK)) return 0;
    pr = p[0];
    pw = p[1];
    if (write(pw, queued, sizeof queued - 1) != sizeof queued - 1) return 0;
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct itimerspec its = {.it_interval = {0, 20000000}, .it_value = {0, 20000000}};
    if (timerfd_settime(tfd, 0, &its, NULL)) return 0;
    sfd = signalfd(-1, &m, SFD_NONBLOCK);
    if (ep < 0 || efd < 0 || tfd < 0 || sfd < 0) return 0;
    if (!watch(efd, EPOLLIN, TAG_EVENT) || !watch(pr, EPOLLIN, TAG_PIPE) ||
        !watch(tfd, EPOLLIN, TAG_TIMER) || !watch(sfd, EPOLLIN, TAG_SIGNAL))
        return 0;
    // Let the timer expire at least once before the capture.
    struct timespec ts = {0, 60000000};
    nanosleep(&ts, NULL);
    return 1;
}

// Wait (up to 10 s) until the set reports `tag`.
static int wait_for(uint64_t tag) {
    for (int i = 0; i < 1000; i++) {
        struct epoll_event ev[8];
        int n = epoll_wait(ep, ev, 8, 10);
        for (int k = 0; k < n; k++)
            if (ev[k].data.u64 == tag) return 1;
    }
    return 0;
}

static int flags_are(int fd, int nonblock, int cloexec) {
    int fl = fcntl(fd, F_GETFL), fd_fl = fcntl(fd, F_GETFD);
    return fl >= 0 && fd_fl >= 0 && !!(fl & O_NONBLOCK) == nonblock &&
           !!(fd_fl & FD_CLOEXEC) == cloexec;
}

static int check(void) {
    CHECK(flags_are(ep, 0, 1));
    CHECK(flags_are(efd, 1, 0));
    CHECK(flags_are(pr, 1, 0) && flags_are(pw, 1, 0));
    CHECK(flags_are(tfd, 1, 1));
    CHECK(flags_are(sfd, 1, 0));
    // Ready at once: the eventfd (counter 5) and the pipe (bytes queued).
    struct epoll_event ev[8];
    int n = epoll_wait(ep, ev, 8, 0), saw_event = 0, saw_pipe = 0;
    for (int k = 0; k < n; k++) {
        saw_event |= ev[k].data.u64 == TAG_EVENT && (ev[k].events & EPOLLIN);
        saw_pipe |= ev[k].data.u64 == TAG_PIPE && (ev[k].events & EPOLLIN);
    }
    CHECK(saw_event);
    CHECK(saw_pipe);
    uint64_t add = 3, count = 0;
    CHECK(write(efd, &add, 8) == 8);
    CHECK(read(efd, &count, 8) == 8);
    CHECK(count == 5 + 3);
    char buf[64] = {0};
    CHECK(read(pr, buf, sizeof buf) == sizeof queued - 1);
    CHECK(memcmp(buf, queued, sizeof queued - 1) == 0);
    CHECK(read(pr, buf, sizeof buf) == -1 && errno == EAGAIN);
    CHECK(write(pw, "more", 4) == 4);
    CHECK(read(pr, buf, sizeof buf) == 4 && memcmp(buf, "more", 4) == 0);
    // The timer: expired already (its unread expirations were kept, and
    // it kept running), and again after a read.
    uint64_t ticks = 0;
    CHECK(wait_for(TAG_TIMER));
    CHECK(read(tfd, &ticks, 8) == 8 && ticks >= 1);
    CHECK(wait_for(TAG_TIMER));
    CHECK(read(tfd, &ticks, 8) == 8 && ticks >= 1);
    struct itimerspec its;
    CHECK(timerfd_gettime(tfd, &its) == 0);
    CHECK(its.it_interval.tv_sec == 0 && its.it_interval.tv_nsec == 20000000);
    // A signal through the signalfd, reported by the set.
    CHECK(kill(getpid(), SIGUSR1) == 0);
    CHECK(wait_for(TAG_SIGNAL));
    struct signalfd_siginfo si;
    CHECK(read(sfd, &si, sizeof si) == sizeof si);
    CHECK(si.ssi_signo == SIGUSR1);
    return 1;
}
