/* CPU control: delays, halting, reset and the deliberate triple fault. */
#include "ember.h"

#define I8042_COMMAND 0x64
#define I8042_CMD_RESET 0xfe

void busy_delay(uint64_t loops)
{
	while (loops--)
		__asm__ volatile("" ::: "memory");
}

void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

void system_reset(void)
{
	outb(I8042_COMMAND, I8042_CMD_RESET);
	/* The VMM should have stopped us; if not, stay quiet. */
	halt_forever();
}

void triple_fault(void)
{
	static const struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) empty_idt = { 0, 0 };

	/*
	 * Any exception now escalates to #DF and then to a triple fault.
	 * ud2 rather than int3: on the nested PVM host int3 in guest ring 0
	 * ends in KVM_EXIT_INTERNAL_ERROR (emulation failure), ud2 gives the
	 * expected KVM_EXIT_SHUTDOWN.
	 */
	__asm__ volatile("lidt %0; ud2" : : "m"(empty_idt));
	halt_forever();
}
