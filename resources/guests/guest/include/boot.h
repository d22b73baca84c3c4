/* Constants shared by the assembly entry points and the C code. */
#ifndef EMBER_BOOT_H
#define EMBER_BOOT_H

/* Boot protocol the guest was started with (first argument of ember_main). */
#define BOOT_PROTO_LINUX64 1 /* ELF vmlinux, 64-bit entry, RSI = zero page */
#define BOOT_PROTO_BZIMAGE 2 /* bzImage startup_64, RSI = zero page */
#define BOOT_PROTO_PVH 3     /* PVH 32-bit entry, EBX = hvm_start_info */

/* Load address of the protected-mode image (HIMEM_START in boot-layout.md). */
#define GUEST_LOAD_ADDR 0x100000

/* Selectors of the guest's own GDT (same values as the VMM's). */
#define SEL_CODE64 0x08
#define SEL_DATA 0x10
#define SEL_CODE32 0x18

/* The unikernel runtime (resources/unikernel) builds with a larger stack. */
#ifndef STACK_SIZE
#define STACK_SIZE 16384
#endif

#endif
