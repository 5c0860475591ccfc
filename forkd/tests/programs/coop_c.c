/* The cooperative API from C: warm state, rf_checkpoint(), children compute;
 * an rf_on_restore hook gives each child state of its own. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "remotefork.h"

static unsigned long long table[100000];
static int hook_pid;

static void restored(void *arg) { *(int *)arg = getpid(); }

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 0; i < 100000; i++) table[i] = (unsigned long long)i * 7 + 3;
    if (rf_on_restore(restored, &hook_pid) != 0) return 3;
    rf_checkpoint_t cp;
    memset(&cp, 0, sizeof cp);
    int r = rf_checkpoint("coop-c", &cp);
    if (r < 0) { fprintf(stderr, "rf_checkpoint: %s\n", cp.error); return 2; }
    unsigned long long sum = 0;
    for (int i = 0; i < 100000; i++) sum += table[i];
    if (r == 1) {
        printf("{\"child\": %u, \"instance\": \"%s\", \"args\": \"%s\", \"sum\": %llu, \"hook_pid\": %d}\n", cp.index, cp.instance_id, cp.args, sum, hook_pid);
        return 0;
    }
    printf("parent seed=%s\n", cp.seed_id);
    printf("parent continues %llu\n", sum);
    return 0;
}
