/* remotefork cooperative API (link with -lremotefork).
 *
 * rf_checkpoint() returns twice, like fork(): 0 in the caller, once forkd
 * has made a seed of it (out->seed_id, out->key); 1 in every child later
 * started from that seed (out->instance_id, out->index, out->args); -1 on
 * error (out->error). forkd's cooperative socket comes from
 * FORKD_COOP_SOCKET, default /run/forkd/forkd.sock.coop.
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
int rf_on_restore(void (*fn)(void *arg), void *arg);

#endif
