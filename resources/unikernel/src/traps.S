/*
 * CPU exception entry stubs (vectors 0-31). Each pushes a dummy error code
 * when the CPU does not push one, then the vector, and calls
 * rt_trap(frame) (start.c), which reports the fault and ends the program.
 */
	.text
	.code64

.macro STUB vec
	.balign	16
trap_stub_\vec:
	.if (\vec == 8) || (\vec >= 10 && \vec <= 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
	.else
	pushq	$0
	.endif
	pushq	$\vec
	jmp	trap_common
.endm

	.irp	vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	STUB	\vec
	.endr

trap_common:
	cld
	movq	%rsp, %rdi
	andq	$-16, %rsp
	call	rt_trap
1:	cli
	hlt
	jmp	1b

	.section .rodata
	.balign	8
	.globl	rt_trap_stubs
rt_trap_stubs:
	.irp	vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad	trap_stub_\vec
	.endr

	.section .note.GNU-stack, "", @progbits
