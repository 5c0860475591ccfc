// Sockets: a TCP socket listening on 127.0.0.1 (SO_REUSEPORT, port chosen
// by the kernel), a TCP connection to it made before the capture (both
// ends in the process, so both are connections a child cannot share), and
// a UDP socket connected to the listener's port.
// Checks: the listener is listening on the same address, and a connection
// to its port is accepted by the kernel; the connection is closed, as after
// a network failure (poll reports POLLHUP, reads fail with ENOTCONN, writes
// with EPIPE, and the socket is still TCP); the UDP socket is connected to
// the same peer and sends.
#include "case.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

static int lis, cli, srv, udp;
static struct sockaddr_in addr;

static int setup(void) {
    lis = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lis, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lis, (struct sockaddr *)&addr, sizeof addr) || listen(lis, 16)) return 0;
    socklen_t len = sizeof addr;
    getsockname(lis, (struct sockaddr *)&addr, &len);
    cli = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(cli, (struct sockaddr *)&addr, sizeof addr)) return 0;
    srv = accept(lis, NULL, NULL);
    udp = socket(AF_INET, SOCK_DGRAM, 0);
    if (connect(udp, (struct sockaddr *)&addr, sizeof addr)) return 0;
    signal(SIGPIPE, SIG_IGN);
    return srv >= 0;
}

static int check(void) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int v = 0;
    socklen_t vl = sizeof v;
    CHECK(getsockname(lis, (struct sockaddr *)&a, &len) == 0);
    CHECK(a.sin_port == addr.sin_port && a.sin_addr.s_addr == addr.sin_addr.s_addr);
    CHECK(getsockopt(lis, SOL_SOCKET, SO_ACCEPTCONN, &v, &vl) == 0 && v == 1);
    CHECK(getsockopt(lis, SOL_SOCKET, SO_REUSEPORT, &v, &vl) == 0 && v == 1);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(c, (struct sockaddr *)&addr, sizeof addr) == 0);
    close(c);
    // The connection: closed.
    char b[8];
    for (int *s = &cli; s; s = (s == &cli ? &srv : NULL)) {
        struct pollfd p = {.fd = *s, .events = POLLIN | POLLOUT};
        CHECK(poll(&p, 1, 0) == 1 && (p.revents & POLLHUP));
        CHECK(recv(*s, b, sizeof b, MSG_DONTWAIT) == -1 && errno == ENOTCONN);
        CHECK(send(*s, "x", 1, MSG_DONTWAIT) == -1 && errno == EPIPE);
        CHECK(getsockopt(*s, IPPROTO_TCP, TCP_NODELAY, &v, &vl) == 0);
    }
    // UDP: connected to the same peer.
    len = sizeof a;
    CHECK(getpeername(udp, (struct sockaddr *)&a, &len) == 0);
    CHECK(a.sin_port == addr.sin_port);
    CHECK(send(udp, "u", 1, 0) == 1);
    return 1;
}
