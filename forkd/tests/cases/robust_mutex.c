// A robust mutex held by the main thread (on glibc's robust list). Checks
// it is still held by this thread: trylock gives EBUSY, unlock and lock
// again succeed.
#include "case.h"

static pthread_mutex_t robust;

static int setup(void) {
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    return pthread_mutex_init(&robust, &a) == 0 && pthread_mutex_lock(&robust) == 0;
}

static int check(void) {
    CHECK(pthread_mutex_trylock(&robust) == EBUSY);
    CHECK(pthread_mutex_unlock(&robust) == 0);
    CHECK(pthread_mutex_lock(&robust) == 0);
    return 1;
}
