/* The cooperative API from C: warm state, rf_checkpoint(), children compute. */
#include <stdio.h>
#include <string.h>
#include "remotefork.h"

static unsigned long long table[100000];

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 0; i < 100000; i++) table[i] = (unsigned long long)i * 7 + 3;
    rf_checkpoint_t cp;
    memset(&cp, 0, sizeof cp);
    int r = rf_checkpoint("coop-c", &cp);
    if (r < 0) { fprintf(stderr, "rf_checkpoint: %s\n", cp.error); return 2; }
    unsigned long long sum = 0;
    for (int i = 0; i < 100000; i++) sum += table[i];
    if (r == 1) {
        printf("{\"child\": %u, \"instance\": \"%s\", \"args\": \"%s\", \"sum\": %llu}\n", cp.index, cp.instance_id, cp.args, sum);
        return 0;
    }
    printf("parent seed=%s\n", cp.seed_id);
    printf("parent continues %llu\n", sum);
    return 0;
}
