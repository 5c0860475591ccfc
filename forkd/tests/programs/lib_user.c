/* Uses libfixture.so; prints what it returns after reading a line. */
#include <stdio.h>
#include <unistd.h>
int fixture_value(void);
int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready %d\n", fixture_value());
    char buf[16];
    if (read(0, buf, sizeof buf) < 0) return 3;
    printf("fixture %d\n", fixture_value());
    return 0;
}
