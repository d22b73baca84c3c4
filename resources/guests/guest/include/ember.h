/*
 * Common declarations for the ember test guest. The boot code, serial,
 * format, string, cpu, timer and virtio transport/blk driver files are also
 * compiled into the unikernel runtime (resources/unikernel, built by
 * api_server/build.rs): keep them free of test-mode dependencies.
 */
#ifndef EMBER_H
#define EMBER_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "boot.h"

/* The unikernel runtime (resources/unikernel) overrides it. */
#ifndef LOG_PREFIX
#define LOG_PREFIX "ember-guest: "
#endif

static inline void outb(uint16_t port, uint8_t val)
{
	__asm__ volatile("outb %0, %1" : : "a"(val), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t val;
	__asm__ volatile("inb %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline void *phys_to_virt(uint64_t paddr)
{
	/* The guest runs on an identity map of the first 4 GiB. */
	return (void *)(uintptr_t)paddr;
}

/* string.c */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
bool cmdline_param(const char *cmdline, const char *key, char *val, size_t val_size);

/* serial.c */
void serial_init(void);
void serial_putc(char c);
void serial_puts(const char *s);

/* format.c: fmt_vprintf formats to any sink (put(c, ctx) per character). */
void fmt_vprintf(void (*put)(char c, void *ctx), void *ctx, const char *fmt, va_list ap);
void kvprintf(const char *fmt, va_list ap);
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Prints "ember-guest: <formatted>\n". */
void guest_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* cpu.c */
void busy_delay(uint64_t loops);
void __attribute__((noreturn)) halt_forever(void);
void __attribute__((noreturn)) system_reset(void);
void __attribute__((noreturn)) triple_fault(void);

/* mptable.c: number of enabled processors in the MP table, -1 if none. */
int mptable_count_cpus(void);

/* tests.c */
struct bootinfo;
void __attribute__((noreturn)) run_test(const struct bootinfo *bi);

#endif
