/* A stand-in forkd for the keeper: forks a sleeper, hands the keeper at
 * argv[1] its pidfd (key "p/sleeper"), prints "sleeper PID", then lets its
 * main thread exit while another thread lives on. The process stays, its
 * leader a zombie and its descriptors (the keeper's connection) open: what
 * a forkd looks like whose exit is held up by one of its threads stuck in
 * the kernel. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

static void *forever(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    pid_t sleeper = fork();
    if (sleeper == 0) {
        for (;;) pause();
    }
    int pidfd = (int)syscall(SYS_pidfd_open, sleeper, 0);
    if (pidfd < 0) return 3;
    int c = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    if (connect(c, (struct sockaddr *)&a, sizeof a)) return 4;
    const char *msg = "{\"op\":\"put\",\"key\":\"p/sleeper\",\"meta\":{},\"pidfd\":0}";
    struct iovec iov = {(void *)msg, strlen(msg)};
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = cbuf;
    m.msg_controllen = sizeof cbuf;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &pidfd, sizeof(int));
    if (sendmsg(c, &m, 0) < 0) return 5;
    printf("sleeper %d\n", (int)sleeper);
    fflush(stdout);
    pthread_t t;
    if (pthread_create(&t, NULL, forever, NULL)) return 6;
    pthread_exit(NULL);
}
