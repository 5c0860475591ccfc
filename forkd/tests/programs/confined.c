// A parent that may confine itself ("filter": a seccomp filter under which
// sysinfo(2) fails with EPERM; "dropcaps": no CAP_NET_RAW, even in its
// bounding set; "nodump": PR_SET_DUMPABLE 0), prints "ready", then obeys
// one command per stdin line:
//   report          what it is now (uid, capabilities, filter, session);
//                   also any JSON object (a gateway's event)
//   killgroup       kill(0, SIGTERM) with SIGTERM ignored here
//   joinparent      setpgid(0, getpgid(getppid())): join its parent's group
//   outlive         fork a grandchild that leaves the session and sleeps
//   read PATH       try to open PATH for reading
//   exit            exit 0
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <unistd.h>

static void status_field(const char *key, char *out, size_t n) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    out[0] = 0;
    size_t kl = strlen(key);
    while (f && fgets(line, sizeof line, f)) {
        if (strncmp(line, key, kl) == 0 && line[kl] == ':') {
            char *v = line + kl + 1;
            while (*v == ' ' || *v == '\t') v++;
            v[strcspn(v, "\n")] = 0;
            snprintf(out, n, "%s", v);
        }
    }
    if (f) fclose(f);
}

static void report(void) {
    struct sysinfo si;
    errno = 0;
    int r = sysinfo(&si);
    int e = errno;
    char capeff[64], capprm[64], capbnd[64], nnp[8], sec[8];
    status_field("CapBnd", capbnd, sizeof capbnd);
    status_field("CapEff", capeff, sizeof capeff);
    status_field("CapPrm", capprm, sizeof capprm);
    status_field("NoNewPrivs", nnp, sizeof nnp);
    status_field("Seccomp", sec, sizeof sec);
    printf("{\"pid\":%d,\"uid\":%d,\"euid\":%d,\"gid\":%d,\"sid\":%d,\"pgid\":%d,"
           "\"sysinfo\":%d,\"errno\":%d,\"capeff\":\"%s\",\"capprm\":\"%s\","
           "\"capbnd\":\"%s\",\"nnp\":%s,\"seccomp\":%s,\"dumpable\":%d}\n",
           getpid(), getuid(), geteuid(), getgid(), getsid(0), getpgid(0), r, e,
           capeff, capprm, capbnd, nnp, sec, prctl(PR_GET_DUMPABLE, 0, 0, 0, 0));
    fflush(stdout);
}

int main(int argc, char **argv) {
    int filter = 0, dropcaps = 0;
    for (int i = 1; i < argc; i++) {
        filter |= strcmp(argv[i], "filter") == 0;
        dropcaps |= strcmp(argv[i], "dropcaps") == 0;
        if (strcmp(argv[i], "nodump") == 0) prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    if (dropcaps) {
        // Root without CAP_NET_RAW, in every set and the bounding set.
        struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct __user_cap_data_struct d[2];
        if (syscall(SYS_capget, &h, d) != 0 || prctl(PR_CAPBSET_DROP, CAP_NET_RAW, 0, 0, 0) != 0) {
            perror("dropping CAP_NET_RAW");
            return 1;
        }
        d[0].effective &= ~(1u << CAP_NET_RAW);
        d[0].permitted &= ~(1u << CAP_NET_RAW);
        d[0].inheritable &= ~(1u << CAP_NET_RAW);
        if (syscall(SYS_capset, &h, d) != 0) {
            perror("capset");
            return 1;
        }
    }
    if (filter) {
        struct sock_filter f[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_sysinfo, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        struct sock_fprog prog = {sizeof f / sizeof f[0], f};
        if (geteuid() != 0) prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) {
            perror("seccomp");
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (strcmp(line, "report") == 0 || line[0] == '{') {
            report();
        } else if (strcmp(line, "killgroup") == 0) {
            signal(SIGTERM, SIG_IGN);
            int r = kill(0, SIGTERM);
            printf("killgroup %d\n", r);
            fflush(stdout);
        } else if (strcmp(line, "joinparent") == 0) {
            errno = 0;
            int r = setpgid(0, getpgid(getppid()));
            printf("joinparent %d %d\n", r, r ? errno : 0);
            fflush(stdout);
        } else if (strcmp(line, "outlive") == 0) {
            pid_t p = fork();
            if (p == 0) {
                setsid();
                int null = open("/dev/null", O_RDWR);
                dup2(null, 0);
                dup2(null, 1);
                dup2(null, 2);
                sleep(3600);
                _exit(0);
            }
            printf("outlive %d\n", p);
            fflush(stdout);
        } else if (strncmp(line, "read ", 5) == 0) {
            errno = 0;
            int fd = open(line + 5, O_RDONLY);
            printf("read %d %d\n", fd >= 0 ? 0 : -1, fd >= 0 ? 0 : errno);
            fflush(stdout);
            if (fd >= 0) close(fd);
        } else if (strcmp(line, "exit") == 0) {
            return 0;
        }
    }
    return 0;
}
