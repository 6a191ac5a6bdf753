/* Entry of the test guest: tell the boot timer we are running, set a stack, call C with
 * the zero page (boot_params) the VMM passed in %rsi. */
    .section .text.entry, "ax"
    .globl _start
_start:
    mov $0x440, %dx
    mov $1, %al
    out %al, %dx
    lea stack_top(%rip), %rsp
    mov %rsi, %rdi
    call guest_main
1:  hlt
    jmp 1b

/* Interrupt entry points of the idle mode (tessera.mode=idle, guest.c). The LAPIC timer's
 * handler counts the tick; every other vector is acknowledged and ignored; an exception
 * is a bug in the guest, reported by guest_exception, which never returns. */
    .text
    .globl tick_isr, other_isr, exception_isr
tick_isr:
    push %rax
    incq ticks(%rip)
    movabs $0xfee000b0, %rax    /* LAPIC EOI */
    movl $0, (%rax)
    pop %rax
    iretq
other_isr:
    push %rax
    movabs $0xfee000b0, %rax
    movl $0, (%rax)
    pop %rax
    iretq
exception_isr:
    call guest_exception
2:  hlt
    jmp 2b

    .section .bss
    .align 16
stack:
    .space 16384
stack_top:
