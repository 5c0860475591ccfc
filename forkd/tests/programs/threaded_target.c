/* A process with two threads: non-cooperative capture must refuse it. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static void *sleeper(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

int main(void) {
    pthread_t t;
    setvbuf(stdout, NULL, _IONBF, 0);
    pthread_create(&t, NULL, sleeper, NULL);
    printf("ready\n");
    char buf[16];
    ssize_t n = read(0, buf, sizeof buf);
    printf("alive %zd\n", n);
    return 0;
}
