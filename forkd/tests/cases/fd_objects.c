// Descriptors that are not files reopened by path, each with state:
//   mfd    a sealed memfd ("memfd contents", F_SEAL_SHRINK|F_SEAL_GROW),
//          offset 3;
//   ufd    an unlinked regular file in /tmp, else /dev/shm (where
//          O_TMPFILE works: not on overlayfs before Linux 6.6; "unlinked
//          contents"), O_APPEND, offset 2;
//   rofd   the memfd opened again read-only (through /proc);
//   s0/s1  a stream socket pair, "to-s0" queued for s0, "to-s1" for s1;
//   d0/d1  a datagram socket pair, two datagrams queued for d0;
//   dupf   a dup of a regular file: one offset for both (read 5 bytes
//          through dupf, the original moved too);
//   dout   a dup of stdout;
//   ep     an epoll set: an edge-triggered watch of s0 and a one-shot watch
//          of d0 that fired already (disarmed).
// Checks each one's contents, offset, seals, flags and queues, and that the
// pairs are still connected to each other; the one-shot stays disarmed.
// Offsets are only read (pread, lseek SEEK_CUR), never moved, except
// through dupf: children forked from one process share open file
// descriptions (and so offsets), as fork() children of the parent would.
#include "case.h"

#include <sys/epoll.h>
#include <sys/socket.h>

static int mfd, ufd, rofd, s0, s1, d0, d1, fdfile, dupf, dout, ep;

static int setup(void) {
    mfd = memfd_create("rf-case", MFD_ALLOW_SEALING | MFD_CLOEXEC);
    if (mfd < 0 || write(mfd, "memfd contents", 14) != 14) return 0;
    if (fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)) return 0;
    if (lseek(mfd, 3, SEEK_SET) != 3) return 0;
    char p[64];
    snprintf(p, sizeof p, "/proc/self/fd/%d", mfd);
    rofd = open(p, O_RDONLY);
    ufd = open("/tmp", O_TMPFILE | O_RDWR | O_APPEND, 0600);
    if (ufd < 0) ufd = open("/dev/shm", O_TMPFILE | O_RDWR | O_APPEND, 0600);
    if (ufd < 0 || write(ufd, "unlinked contents", 17) != 17) return 0;
    if (lseek(ufd, 2, SEEK_SET) != 2) return 0;
    int sp[2], dp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) || socketpair(AF_UNIX, SOCK_DGRAM, 0, dp))
        return 0;
    s0 = sp[0];
    s1 = sp[1];
    d0 = dp[0];
    d1 = dp[1];
    if (write(s1, "to-s0", 5) != 5 || write(s0, "to-s1", 5) != 5) return 0;
    if (write(d1, "first", 5) != 5 || write(d1, "second!", 7) != 7) return 0;
    fdfile = open("/usr/bin/env", O_RDONLY);
    dupf = dup(fdfile);
    dout = dup(1);
    ep = epoll_create1(0);
    struct epoll_event e1 = {.events = EPOLLIN | EPOLLET, .data.u64 = 1};
    struct epoll_event e2 = {.events = EPOLLIN | EPOLLONESHOT, .data.u64 = 2};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, s0, &e1) || epoll_ctl(ep, EPOLL_CTL_ADD, d0, &e2)) return 0;
    // Fire the one-shot (and the edge) once: d0 is disarmed from now on.
    struct epoll_event ev[4];
    int n = epoll_wait(ep, ev, 4, 1000);
    return n == 2 && rofd >= 0 && fdfile >= 0 && dupf >= 0 && dout >= 0;
}

static int check(void) {
    char b[64] = {0};
    // memfd: contents, offset 3, seals, and the read-only reopen.
    CHECK(pread(mfd, b, sizeof b, 0) == 14 && memcmp(b, "memfd contents", 14) == 0);
    CHECK(lseek(mfd, 0, SEEK_CUR) == 3);
    CHECK(fcntl(mfd, F_GET_SEALS) == (F_SEAL_SHRINK | F_SEAL_GROW));
    CHECK(fcntl(mfd, F_GETFD) & FD_CLOEXEC);
    CHECK(ftruncate(mfd, 1) == -1);
    CHECK((fcntl(rofd, F_GETFL) & O_ACCMODE) == O_RDONLY);
    CHECK(pread(rofd, b, 5, 0) == 5 && memcmp(b, "memfd", 5) == 0);
    CHECK(write(rofd, "x", 1) == -1 && errno == EBADF);
    char link[128] = {0};
    char p[64];
    snprintf(p, sizeof p, "/proc/self/fd/%d", mfd);
    CHECK(readlink(p, link, sizeof link - 1) > 0);
    CHECK(strncmp(link, "/memfd:rf-case", 14) == 0);
    // The unlinked file: contents, offset, O_APPEND, still unlinked.
    memset(b, 0, sizeof b);
    CHECK(pread(ufd, b, sizeof b, 0) == 17 && memcmp(b, "unlinked contents", 17) == 0);
    CHECK(lseek(ufd, 0, SEEK_CUR) == 2);
    CHECK(fcntl(ufd, F_GETFL) & O_APPEND);
    struct stat st;
    CHECK(fstat(ufd, &st) == 0 && st.st_nlink == 0 && S_ISREG(st.st_mode));
    // The stream pair: each end's queue, then still connected.
    memset(b, 0, sizeof b);
    CHECK(recv(s0, b, sizeof b, MSG_DONTWAIT) == 5 && memcmp(b, "to-s0", 5) == 0);
    CHECK(recv(s1, b, sizeof b, MSG_DONTWAIT) == 5 && memcmp(b, "to-s1", 5) == 0);
    CHECK(send(s0, "ping", 4, 0) == 4);
    CHECK(recv(s1, b, sizeof b, 0) == 4 && memcmp(b, "ping", 4) == 0);
    // The datagram pair: two datagrams, boundaries kept.
    CHECK(recv(d0, b, sizeof b, MSG_DONTWAIT) == 5 && memcmp(b, "first", 5) == 0);
    CHECK(recv(d0, b, sizeof b, MSG_DONTWAIT) == 7 && memcmp(b, "second!", 7) == 0);
    CHECK(recv(d0, b, sizeof b, MSG_DONTWAIT) == -1 && errno == EAGAIN);
    CHECK(send(d1, "dg", 2, 0) == 2);
    CHECK(recv(d0, b, sizeof b, 0) == 2);
    // One open file description for fdfile and dupf.
    off_t before = lseek(fdfile, 0, SEEK_CUR);
    CHECK(read(dupf, b, 5) == 5);
    CHECK(lseek(fdfile, 0, SEEK_CUR) == before + 5);
    // dout is the child's stdout.
    struct stat a, o;
    CHECK(fstat(dout, &a) == 0 && fstat(1, &o) == 0);
    CHECK(a.st_ino == o.st_ino && a.st_dev == o.st_dev);
    // The one-shot watch of d0 stays disarmed; s0's edge watch fires on new
    // data.
    CHECK(send(d1, "again", 5, 0) == 5);
    CHECK(send(s1, "edge", 4, 0) == 4);
    struct epoll_event ev[4];
    int n = epoll_wait(ep, ev, 4, 10000);
    CHECK(n == 1 && ev[0].data.u64 == 1);
    return 1;
}
