/*
 * Linker script of the ember test guest, preprocessed by build.rs.
 * -DPVH keeps the Xen PVH note and emits a PT_NOTE for it.
 */
#include "boot.h"

OUTPUT_FORMAT("elf64-x86-64")
OUTPUT_ARCH(i386:x86-64)
ENTRY(elf_start64)

PHDRS
{
	text PT_LOAD FLAGS(7);
#ifdef PVH
	note PT_NOTE FLAGS(4);
#endif
}

SECTIONS
{
	. = GUEST_LOAD_ADDR;
	.head.text : { KEEP(*(.head.text)) } :text
	.text : { *(.text .text.*) } :text
#ifdef PVH
	.note.Xen : { KEEP(*(.note.Xen)) } :text :note
#endif
	.rodata : { *(.rodata .rodata.*) } :text
	.data : { *(.data .data.*) } :text
	. = ALIGN(8);
	__bss_start = .;
	.bss : { *(.bss .bss.*) *(COMMON) . = ALIGN(8); } :text
	__bss_end = .;
	.stack (NOLOAD) : { *(.stack) } :text
	_end = .;

	/DISCARD/ : {
#ifndef PVH
		*(.note.Xen)
#endif
		*(.note.gnu.*) *(.note.GNU-stack) *(.comment) *(.eh_frame) *(.eh_frame_hdr)
	}
}
