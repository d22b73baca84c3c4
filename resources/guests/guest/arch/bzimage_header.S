/*
 * Real-mode setup sectors of ember-guest.bzImage: a boot sector whose setup
 * header (at 0x1f1) describes the protected-mode image that follows.
 *
 * Assembled on its own and converted to a flat binary. build.rs patches
 * syssize (0x1f4) and init_size (0x260) once the protected-mode image is
 * linked, like Linux's arch/x86/boot/tools/build.c does.
 */
#define SETUP_SECTS 1

	.code16
	.section .text, "ax"
	.globl	_start
_start:
	/* Not bootable from a disk: park the CPU if someone tries. */
	cli
1:	hlt
	jmp	1b

	.org	0x1f1
hdr:
setup_sects:		.byte	SETUP_SECTS
root_flags:		.word	0
syssize:		.long	0		/* patched: image size / 16 */
ram_size:		.word	0
vid_mode:		.word	0xffff		/* normal */
root_dev:		.word	0
boot_flag:		.word	0xaa55
	/* 0x200 */
jump:			.byte	0xeb, start_of_setup - 1f
1:
header:			.ascii	"HdrS"		/* 0x202 */
version:		.word	0x020c		/* boot protocol 2.12 */
realmode_swtch:		.long	0
start_sys_seg:		.word	0x1000
kernel_version:		.word	0
type_of_loader:		.byte	0
loadflags:		.byte	0x01		/* LOADED_HIGH */
setup_move_size:	.word	0x8000
code32_start:		.long	0x100000	/* 0x214 */
ramdisk_image:		.long	0		/* 0x218 */
ramdisk_size:		.long	0		/* 0x21c */
bootsect_kludge:	.long	0
heap_end_ptr:		.word	0
ext_loader_ver:		.byte	0
ext_loader_type:	.byte	0
cmd_line_ptr:		.long	0		/* 0x228 */
initrd_addr_max:	.long	0x7fffffff
kernel_alignment:	.long	0x200000	/* 0x230 */
relocatable_kernel:	.byte	0
min_alignment:		.byte	21
xloadflags:		.word	0x0001		/* XLF_KERNEL_64 */
cmdline_size:		.long	4095		/* 0x238 */
hardware_subarch:	.long	0
hardware_subarch_data:	.quad	0
payload_offset:		.long	0
payload_length:		.long	0
setup_data:		.quad	0
pref_address:		.quad	0x100000	/* 0x258 */
init_size:		.long	0		/* 0x260, patched */
handover_offset:	.long	0

start_of_setup:
	/* The 16-bit real-mode entry is not supported either. */
	cli
2:	hlt
	jmp	2b

	.org	(SETUP_SECTS + 1) * 512

	.section .note.GNU-stack, "", @progbits
