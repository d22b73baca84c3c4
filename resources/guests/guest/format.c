/*
 * Tiny printf: %c %s %d %i %u %x %X %o %p %% with the hh, h, l, ll and z
 * length modifiers, the '-' and '0' flags and a field width (also '*').
 * fmt_vprintf writes to any sink; kprintf/guest_log write to the serial port.
 * Shared with the unikernel runtime (its printf/snprintf).
 */
#include "ember.h"

struct fmt_out {
	void (*put)(char c, void *ctx);
	void *ctx;
};

static void pad_out(const struct fmt_out *o, char c, int n)
{
	while (n-- > 0)
		o->put(c, o->ctx);
}

/* Digits of v (reversed) into buf; returns how many. */
static int utoa_rev(uint64_t v, unsigned base, bool upper, char *buf)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	int n = 0;

	do {
		buf[n++] = digits[v % base];
		v /= base;
	} while (v);
	return n;
}

/* A number with optional sign/prefix, padded to width. */
static void put_num(const struct fmt_out *o, uint64_t v, unsigned base, bool upper,
		    const char *prefix, int width, bool left, bool zero)
{
	char buf[24];
	int n = utoa_rev(v, base, upper, buf);
	int plen = (int)strlen(prefix);
	int fill = width - n - plen;

	if (!left && !zero)
		pad_out(o, ' ', fill);
	for (const char *p = prefix; *p; p++)
		o->put(*p, o->ctx);
	if (!left && zero)
		pad_out(o, '0', fill);
	while (n)
		o->put(buf[--n], o->ctx);
	if (left)
		pad_out(o, ' ', fill);
}

void fmt_vprintf(void (*put)(char c, void *ctx), void *ctx, const char *fmt, va_list ap)
{
	const struct fmt_out o = { put, ctx };

	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(*fmt, ctx);
			continue;
		}
		fmt++;
		bool left = false, zero = false;
		int width = 0, lng = 0;
		for (;; fmt++) {
			if (*fmt == '-')
				left = true;
			else if (*fmt == '0')
				zero = true;
			else
				break;
		}
		if (*fmt == '*') {
			width = va_arg(ap, int);
			if (width < 0) {
				left = true;
				width = -width;
			}
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z' || *fmt == 'h') {
			if (*fmt != 'h')
				lng++;
			fmt++;
		}
		switch (*fmt) {
		case 'c':
			if (!left)
				pad_out(&o, ' ', width - 1);
			put((char)va_arg(ap, int), ctx);
			if (left)
				pad_out(&o, ' ', width - 1);
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			int len = (int)strlen(s);
			if (!left)
				pad_out(&o, ' ', width - len);
			while (*s)
				put(*s++, ctx);
			if (left)
				pad_out(&o, ' ', width - len);
			break;
		}
		case 'd':
		case 'i': {
			int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
			if (v < 0)
				put_num(&o, (uint64_t)0 - (uint64_t)v, 10, false, "-", width, left,
					zero);
			else
				put_num(&o, (uint64_t)v, 10, false, "", width, left, zero);
			break;
		}
		case 'u':
		case 'x':
		case 'X':
		case 'o': {
			uint64_t v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
			unsigned base = *fmt == 'u' ? 10 : *fmt == 'o' ? 8 : 16;
			put_num(&o, v, base, *fmt == 'X', "", width, left, zero);
			break;
		}
		case 'p':
			put_num(&o, (uint64_t)(uintptr_t)va_arg(ap, void *), 16, false, "0x", width,
				left, zero);
			break;
		case '%':
			put('%', ctx);
			break;
		case '\0':
			return;
		default:
			put('%', ctx);
			put(*fmt, ctx);
			break;
		}
	}
}

static void serial_sink(char c, void *ctx)
{
	(void)ctx;
	serial_putc(c);
}

void kvprintf(const char *fmt, va_list ap)
{
	fmt_vprintf(serial_sink, NULL, fmt, ap);
}

void kprintf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
}

void guest_log(const char *fmt, ...)
{
	va_list ap;

	serial_puts(LOG_PREFIX);
	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
	serial_putc('\n');
}
