/* 8250 UART on COM1, polled. */
#include "ember.h"

#define COM1 0x3f8
#define UART_IER 1
#define UART_LCR 3
#define UART_LSR 5
#define UART_LSR_THRE 0x20

void serial_init(void)
{
	outb(COM1 + UART_IER, 0x00); /* no interrupts */
	outb(COM1 + UART_LCR, 0x03); /* 8N1 */
}

void serial_putc(char c)
{
	while (!(inb(COM1 + UART_LSR) & UART_LSR_THRE))
		;
	outb(COM1, (uint8_t)c);
}

void serial_puts(const char *s)
{
	while (*s)
		serial_putc(*s++);
}
