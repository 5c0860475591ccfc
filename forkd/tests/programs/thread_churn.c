/* Threads are created and exit all the time: a churner thread starts a
 * short-lived worker and joins it, in a loop. Captured while churning,
 * some worker is being created or exiting at the freeze. On a line from
 * stdin, main checks that the churn goes on (workers keep being created
 * and joined: none of them, present or gone at the capture, is lost) and
 * prints "ok N" or "FAIL: why". */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static atomic_long started, joined;

static void *worker(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    return NULL;
}

static void *churner(void *arg) {
    (void)arg;
    for (;;) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, NULL) != 0) continue;
        pthread_join(t, NULL);
        atomic_fetch_add(&joined, 1);
    }
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    pthread_t c;
    pthread_create(&c, NULL, churner, NULL);
    while (atomic_load(&joined) < 100) usleep(1000);
    printf("ready\n");
    char buf[64];
    while (fgets(buf, sizeof buf, stdin)) {
        long j0 = atomic_load(&joined);
        /* 1,000 more joins; a lost worker would hang the churner. */
        struct timespec t0, t;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        while (atomic_load(&joined) < j0 + 1000) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            if (t.tv_sec - t0.tv_sec > 60) {
                printf("FAIL: the churn stopped at %ld joins\n", atomic_load(&joined));
                return 1;
            }
            usleep(1000);
        }
        printf("ok %ld\n", atomic_load(&joined) - j0 >= 1000);
    }
    return 0;
}
