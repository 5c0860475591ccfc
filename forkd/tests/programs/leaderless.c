/* The main thread exits (pthread_exit) while another thread runs on, and
 * answers stdin: a process whose main thread is gone, which capture must
 * refuse by name. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static void *run(void *arg) {
    (void)arg;
    usleep(100000); /* the main thread is gone by now */
    printf("ready\n");
    char buf[16];
    ssize_t n = read(0, buf, sizeof buf);
    printf("alive %zd\n", n);
    _exit(0);
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    pthread_t t;
    pthread_create(&t, NULL, run, NULL);
    pthread_exit(NULL);
}
