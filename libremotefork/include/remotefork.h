/* remotefork cooperative API (link with -lremotefork).
 *
 * rf_checkpoint() returns twice, like fork(): 0 in the caller, once forkd
 * has made a seed of it (out->seed_id, out->key); 1 in every child later
 * started from that seed (out->instance_id, out->index, out->args); -1 on
 * error (out->error). forkd's cooperative socket comes from
 * FORKD_COOP_SOCKET, default /run/forkd/forkd.sock.coop. Like fork(),
 * it keeps only the calling thread (a warning says how many others are
 * left out); rf_checkpoint_all_threads() keeps every thread: the process
 * itself is captured while the calling thread waits, and in each child
 * every thread runs on where it was (no atfork handler runs).
 *
 * rf_on_restore(fn, arg) registers fn(arg) to run in every child started
 * from a later rf_checkpoint() of this process, before rf_checkpoint()
 * returns 1 there (in registration order): for what must differ per child,
 * such as random seeds, tokens, connection pools. 0 on success, -1 if fn is
 * NULL. */
#ifndef REMOTEFORK_H
#define REMOTEFORK_H

#include <stdint.h>

typedef struct rf_checkpoint {
    int is_child;
    char seed_id[64];
    char key[64];
    char instance_id[128];
    uint32_t index;
    char args[4096];
    char error[512];
} rf_checkpoint_t;

int rf_checkpoint(const char *name, rf_checkpoint_t *out);
int rf_checkpoint_all_threads(const char *name, rf_checkpoint_t *out);
int rf_on_restore(void (*fn)(void *arg), void *arg);

/* The scheduler API: capture, open seeds, spawn and follow children.
 *
 * Every call that can fail returns NULL or -1 and leaves the reason for
 * rf_last_error() (per thread, valid until the next failing call).
 *
 * The thread that calls rf_spawn() is the child's parent thread: a lazy
 * child dies with it (PR_SET_PDEATHSIG), so spawn from threads that live as
 * long as the children should. The caller reaps its children with
 * rf_child_wait(). Restore needs root, or CAP_CHECKPOINT_RESTORE and
 * CAP_SYS_PTRACE. */

typedef struct rf_seed rf_seed_t;   /* a seed that children start from */
typedef struct rf_child rf_child_t; /* a started child (holds a pidfd) */

typedef struct rf_spawn_opts {
    int lazy;          /* 1: pages on demand; 0: all written before it runs */
    int prefetch;      /* 0 off, 1 window, 2 recorded working set */
    int share;         /* 1: share the node cache between children */
    int from_template; /* 1: fork from the node's template of the seed */
} rf_spawn_opts_t;

/* Streams for rf_spawn: a descriptor (the child gets a copy) or one of: */
#define RF_STDIO_NULL (-1)    /* /dev/null */
#define RF_STDIO_INHERIT (-2) /* the caller's own */
#define RF_STDIO_PIPED (-3)   /* a new pipe: rf_child_take_fd() */

const char *rf_last_error(void);
/* Capture process pid into the seed directory dir. 0 or -1. */
int rf_capture(int pid, const char *dir);
/* Open a seed directory, or a seed on another node by "ADDR/ID#KEY". */
rf_seed_t *rf_seed_open(const char *dir);
rf_seed_t *rf_seed_open_remote(const char *reference);
/* Close a seed; its children keep running. */
void rf_seed_close(rf_seed_t *seed);
/* Defaults: lazy, window prefetch, shared cache, from a template. */
void rf_spawn_opts_default(rf_spawn_opts_t *opts);
/* Start a child; opts NULL for the defaults. */
rf_child_t *rf_spawn(const rf_seed_t *seed, const rf_spawn_opts_t *opts,
                     int stdin_fd, int stdout_fd, int stderr_fd);
int rf_child_pid(const rf_child_t *child);
/* The caller's end of a piped stream (0, 1, 2), now the caller's to close. */
int rf_child_take_fd(rf_child_t *child, int stream);
/* Signal the child through its pidfd. 0 or -1. */
int rf_child_signal(const rf_child_t *child, int sig);
/* Wait and reap: exit status, 128 + signal, or -1. When the library killed
 * it (a page could not be served), rf_last_error() says why. */
int rf_child_wait(rf_child_t *child);
void rf_child_free(rf_child_t *child);

#endif
