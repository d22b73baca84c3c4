/* printf and friends on the serial console (COM1), through fmt_vprintf. */
#include "rt.h"

struct ember_file {
	int fd;
};

static struct ember_file out_file = { 1 }, err_file = { 2 };
FILE *stdout = &out_file;
FILE *stderr = &err_file;

struct counter {
	int n;
};

static void console_put(char c, void *ctx)
{
	struct counter *cnt = ctx;

	serial_putc(c);
	cnt->n++;
}

int vprintf(const char *fmt, va_list ap)
{
	struct counter cnt = { 0 };

	fmt_vprintf(console_put, &cnt, fmt, ap);
	return cnt.n;
}

int printf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	int n = vprintf(fmt, ap);
	va_end(ap);
	return n;
}

int vfprintf(FILE *f, const char *fmt, va_list ap)
{
	(void)f;
	return vprintf(fmt, ap);
}

int fprintf(FILE *f, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	int n = vfprintf(f, fmt, ap);
	va_end(ap);
	return n;
}

struct strbuf {
	char *buf;
	size_t size;
	size_t n;
};

static void str_put(char c, void *ctx)
{
	struct strbuf *b = ctx;

	if (b->size && b->n < b->size - 1)
		b->buf[b->n] = c;
	b->n++;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct strbuf b = { buf, size, 0 };

	fmt_vprintf(str_put, &b, fmt, ap);
	if (size)
		buf[b.n < size ? b.n : size - 1] = '\0';
	return (int)b.n;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	int n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

int sprintf(char *buf, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	int n = vsnprintf(buf, (size_t)-1 >> 1, fmt, ap);
	va_end(ap);
	return n;
}

int putchar(int c)
{
	struct counter cnt;

	console_put((char)c, &cnt);
	return (uint8_t)c;
}

int fputc(int c, FILE *f)
{
	(void)f;
	return putchar(c);
}

int putc(int c, FILE *f)
{
	return fputc(c, f);
}

int fputs(const char *s, FILE *f)
{
	(void)f;
	while (*s)
		putchar(*s++);
	return 0;
}

int puts(const char *s)
{
	fputs(s, stdout);
	putchar('\n');
	return 0;
}

int fflush(FILE *f)
{
	(void)f;
	return 0;
}
