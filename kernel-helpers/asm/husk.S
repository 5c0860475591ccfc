/* The husk: the smallest process forkd can turn into a restored child.
 * Static, no libc, linked at a fixed, rarely used address (see build.rs).
 * forkd starts it under PTRACE_TRACEME and takes over at the exec stop, so
 * this code normally never runs; run by hand, it just waits. */
    .text
    .globl _start
_start:
1:  mov $34, %eax           /* pause() */
    syscall
    jmp 1b

    .section .note.GNU-stack,"",@progbits
