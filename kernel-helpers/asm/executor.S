/* The injected syscall executor. Position independent; forkd copies it into
 * a page of the husk, points rip at it and sets:
 *   r12 = first table entry, r13 = number of entries, r15 = 0.
 * Each 72-byte entry: nr, a0..a5, flags, extra (see executor.rs).
 * It runs every entry, then stops with int3 and r13 == 0. On a failed
 * syscall (without IGNORE_ERR) or a failed EXPECT it stops with int3 and
 * r13 != 0: r15 is the failing entry's index and rax its result.
 * With LOAD_ARG0 (flag bit 12) the first argument is the address of a
 * 32-bit int (an fd pipe2() or socketpair() wrote) and that int is passed.
 * Entry number -2 is not a syscall but a touch: a0 is a list of a1 runs
 * (16 bytes each: first page's address, page count), a2 the address of a
 * word that stops it when nonzero (checked before each page). One byte of
 * each page is read, in order; the result is the count of pages read.
 * Registers used: r14 = previous result, rbp = saved result, rbx = flags. */
    .text
    .globl rf_executor
rf_executor:
.Lloop:
    test %r13, %r13
    jz .Ldone
    mov 56(%r12), %rbx
    mov 8(%r12), %rdi
    mov 16(%r12), %rsi
    mov 24(%r12), %rdx
    mov 32(%r12), %r10
    mov 40(%r12), %r8
    mov 48(%r12), %r9
    bt $0, %rbx
    jnc 1f
    mov %r14, %rdi
1:  bt $1, %rbx
    jnc 1f
    mov %r14, %rsi
1:  bt $2, %rbx
    jnc 1f
    mov %r14, %rdx
1:  bt $3, %rbx
    jnc 1f
    mov %r14, %r10
1:  bt $4, %rbx
    jnc 1f
    mov %r14, %r8
1:  bt $5, %rbx
    jnc 1f
    mov %r14, %r9
1:  bt $16, %rbx
    jnc 1f
    mov %rbp, %rdi
1:  bt $17, %rbx
    jnc 1f
    mov %rbp, %rsi
1:  bt $18, %rbx
    jnc 1f
    mov %rbp, %rdx
1:  bt $19, %rbx
    jnc 1f
    mov %rbp, %r10
1:  bt $20, %rbx
    jnc 1f
    mov %rbp, %r8
1:  bt $21, %rbx
    jnc 1f
    mov %rbp, %r9
1:  bt $12, %rbx
    jnc 1f
    movslq (%rdi), %rdi
1:  mov 0(%r12), %rax
    cmp $-2, %rax
    je .Ltouch
    syscall
.Lresult:
    mov %rax, %r14
    bt $9, %rbx
    jnc 1f
    mov %rax, %rbp
1:  bt $10, %rbx
    jnc 1f
    mov 64(%r12), %rcx
    mov %rax, (%rcx)
1:  bt $11, %rbx
    jnc 1f
    cmp 64(%r12), %rax
    jne .Lfail
1:  cmp $-4095, %rax
    jae .Lerr
.Lnext:
    add $72, %r12
    inc %r15
    dec %r13
    jmp .Lloop
.Lerr:
    bt $8, %rbx
    jc .Lnext
.Lfail:
    int3
    jmp .Lfail
.Ldone:
    int3
    jmp .Ldone
.Ltouch:
    xor %eax, %eax
.Ltrun:
    test %rsi, %rsi
    jz .Lresult
    mov 0(%rdi), %rcx
    mov 8(%rdi), %r8
.Ltpage:
    test %r8, %r8
    jz .Ltnext
    cmpq $0, (%rdx)
    jne .Lresult
    movb (%rcx), %r9b
    add $4096, %rcx
    dec %r8
    inc %rax
    jmp .Ltpage
.Ltnext:
    add $16, %rdi
    dec %rsi
    jmp .Ltrun

    .section .note.GNU-stack,"",@progbits
