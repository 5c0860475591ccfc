/* rf_checkpoint_all_threads(): a worker thread parked on a condition
 * variable is in the seed; each child wakes it with a job and gets its
 * answer. */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "remotefork.h"

static unsigned long long table[100000];
static int hook_pid;
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t c = PTHREAD_COND_INITIALIZER;
static int job, done;
static unsigned long long answer;

static void restored(void *arg) { *(int *)arg = getpid(); }

static void *worker(void *arg) {
    (void)arg;
    pthread_mutex_lock(&m);
    for (;;) {
        while (!job) pthread_cond_wait(&c, &m);
        unsigned long long sum = 0;
        for (int i = 0; i < 100000; i++) sum += table[i];
        answer = sum;
        job = 0;
        done = 1;
        pthread_cond_broadcast(&c);
    }
    return NULL;
}

static unsigned long long ask(void) {
    pthread_mutex_lock(&m);
    job = 1;
    done = 0;
    pthread_cond_broadcast(&c);
    while (!done) pthread_cond_wait(&c, &m);
    unsigned long long a = answer;
    pthread_mutex_unlock(&m);
    return a;
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 0; i < 100000; i++) table[i] = (unsigned long long)i * 7 + 3;
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    ask(); /* warm: the worker has run and waits again */
    if (rf_on_restore(restored, &hook_pid) != 0) return 3;
    rf_checkpoint_t cp;
    memset(&cp, 0, sizeof cp);
    int r = rf_checkpoint_all_threads("coop-c-threads", &cp);
    if (r < 0) { fprintf(stderr, "rf_checkpoint_all_threads: %s\n", cp.error); return 2; }
    unsigned long long sum = ask();
    if (r == 1) {
        printf("{\"child\": %u, \"instance\": \"%s\", \"args\": \"%s\", \"sum\": %llu, \"hook_pid\": %d}\n", cp.index, cp.instance_id, cp.args, sum, hook_pid);
        return 0;
    }
    printf("parent seed=%s\n", cp.seed_id);
    printf("parent continues %llu\n", sum);
    return 0;
}
