/* Owns memory at the husk's own load address (0x5f0000000000): restore must
 * still put this process back exactly. */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    unsigned char *p = mmap((void *)0x5f0000000000, 3 * 4096, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p != (void *)0x5f0000000000) { printf("mmap failed\n"); return 2; }
    for (int i = 0; i < 3 * 4096; i++) p[i] = (unsigned char)(i * 7 + 1);
    printf("ready\n");
    char buf[16];
    if (read(0, buf, sizeof buf) < 0) return 3;
    for (int i = 0; i < 3 * 4096; i++)
        if (p[i] != (unsigned char)(i * 7 + 1)) { printf("husk range CORRUPT at %d\n", i); return 1; }
    printf("husk range ok\n");
    return 0;
}
