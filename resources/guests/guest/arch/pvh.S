/*
 * PVH entry: 32-bit protected mode, paging off, EBX = hvm_start_info.
 *
 * Enables PAE + long mode on the guest's own 4 GiB identity map and GDT, then
 * joins the common 64-bit path with proto = BOOT_PROTO_PVH.
 *
 * The XEN_ELFNOTE_PHYS32_ENTRY note (type 18, name "Xen") lives in .note.Xen;
 * the linker script keeps it (and emits a PT_NOTE) only for the PVH image.
 */
#include "boot.h"

#define X86_CR0_PE 0x00000001
#define X86_CR0_PG 0x80000000
#define X86_CR4_PAE 0x00000020
#define MSR_EFER 0xc0000080
#define EFER_LME 0x00000100

	.text
	.code32
	.globl	pvh_start32
pvh_start32:
	cli
	cld
	movl	%ebx, %esi		/* hvm_start_info, kept across the switch */

	lgdt	gdt_desc32
	movl	$SEL_DATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs

	movl	%cr4, %eax
	orl	$X86_CR4_PAE, %eax
	movl	%eax, %cr4

	movl	$pml4, %eax
	movl	%eax, %cr3

	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr

	movl	%cr0, %eax
	orl	$(X86_CR0_PG | X86_CR0_PE), %eax
	movl	%eax, %cr0

	ljmp	$SEL_CODE64, $pvh_start64

	.code64
pvh_start64:
	movl	%esi, %esi		/* zero-extend the start_info address */
	movl	$BOOT_PROTO_PVH, %edi
	jmp	common_start64

	.section .rodata
	.balign	8
/* 32-bit lgdt operand: 16-bit limit + 32-bit base. */
gdt_desc32:
	.word	3 * 8 + 8 - 1
	.long	gdt

	.section .note.Xen, "a", @note
	.balign	4
	.long	4			/* namesz: "Xen\0" */
	.long	4			/* descsz */
	.long	18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.long	pvh_start32

	.section .note.GNU-stack, "", @progbits
