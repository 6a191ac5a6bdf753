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

    .section .bss
    .align 16
stack:
    .space 16384
stack_top:
