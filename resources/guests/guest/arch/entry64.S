/*
 * 64-bit entry points of the ember test guest.
 *
 * The image is linked at 0x100000. Its first 0x200 bytes (.head.text) follow
 * the bzImage convention: offset 0 is the (unused) 32-bit protocol entry and
 * offset 0x200 is startup_64, the bzImage 64-bit entry. The ELF entry point
 * (elf_start64) lives in .text, so the guest can tell the two apart.
 *
 * Both entries get RSI = zero page and run on the VMM's page tables (1 GiB
 * identity map). common_start64 switches to the guest's own GDT, page tables
 * (4 GiB identity map) and stack, clears .bss and calls
 * ember_main(proto, info_paddr).
 */
#include "boot.h"

#define MSR_IA32_APIC_BASE 0x1b
#define APIC_BASE_BSP 0x100

	.section .head.text, "ax"
	.code32
	.globl _head
_head:
	/* 32-bit boot protocol entry (code32_start): not supported, park. */
1:	cli
	hlt
	jmp	1b

	.code64
	.org	0x200
	.globl	startup_64
startup_64:
	movl	$BOOT_PROTO_BZIMAGE, %edi
	jmp	common_start64

	.text
	.globl	elf_start64
elf_start64:
	movl	$BOOT_PROTO_LINUX64, %edi
	jmp	common_start64

/* EDI = BOOT_PROTO_*, RSI = physical address of the boot information. */
	.globl	common_start64
common_start64:
	cli
	cld
	movl	%edi, %r12d
	movq	%rsi, %r13

	/*
	 * Only the bootstrap processor runs the guest (IA32_APIC_BASE.BSP,
	 * which KVM sets for vCPU 0; the CPUID APIC ID is not reliable when a
	 * VMM passes the host's CPUID through). Some hosts (nested PVM) start
	 * every vCPU at the entry point instead of leaving the APs waiting for
	 * INIT/SIPI; they would share our stack and .bss, so park them
	 * (spinning) before touching memory.
	 */
	movl	$MSR_IA32_APIC_BASE, %ecx
	rdmsr
	testl	$APIC_BASE_BSP, %eax
	jz	ap_park

	movq	$pml4, %rax
	movq	%rax, %cr3
	lgdt	gdt_desc(%rip)
	movq	$stack_top, %rsp
	xorl	%ebp, %ebp

	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	/* Reload CS through a far return. */
	pushq	$SEL_CODE64
	leaq	2f(%rip), %rax
	pushq	%rax
	lretq
2:
	/* Clear .bss (8-byte aligned by the linker script). */
	movq	$__bss_start, %rdi
	movq	$__bss_end, %rcx
	subq	%rdi, %rcx
	shrq	$3, %rcx
	xorl	%eax, %eax
	rep stosq

	movl	%r12d, %edi
	movq	%r13, %rsi
	call	ember_main
3:	cli
	hlt
	jmp	3b

/* hlt would exit to the VMM (KVM_EXIT_HLT) on such hosts: spin instead. */
ap_park:
	pause
	jmp	ap_park

/* ------------------------------------------------------------------------ */
	.section .rodata
	.balign	16
	.globl	gdt
gdt:
	.quad	0			/* null */
	.quad	0x00af9a000000ffff	/* 0x08: code, 64-bit */
	.quad	0x00cf92000000ffff	/* 0x10: data, flat 4 GiB */
	.quad	0x00cf9a000000ffff	/* 0x18: code, 32-bit flat */
gdt_end:

	.balign	16
	.globl	gdt_desc
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt

/*
 * Page tables: identity map of 0..4 GiB with 2 MiB pages, built at assembly
 * time so the (slowly emulated) guest CPU does not have to fill them.
 * This covers RAM below 3.25 GiB and the virtio-mmio window at 0xd0000000.
 */
	.section .data.pagetables, "aw"
	.balign	4096
	.globl	pml4
pml4:
	.quad	pdpt + 0x3		/* present | writable */
	.fill	511, 8, 0
pdpt:
	.quad	pd + 0x0000 + 0x3
	.quad	pd + 0x1000 + 0x3
	.quad	pd + 0x2000 + 0x3
	.quad	pd + 0x3000 + 0x3
	.fill	508, 8, 0
pd:
	.set	addr, 0
	.rept	2048
	.quad	addr + 0x83		/* present | writable | 2 MiB page */
	.set	addr, addr + 0x200000
	.endr

	.section .stack, "aw", @nobits
	.balign	16
stack_bottom:
	.skip	STACK_SIZE
	.globl	stack_top
stack_top:

	.section .note.GNU-stack, "", @progbits
