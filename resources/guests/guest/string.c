/* Minimal string helpers (gcc may emit calls to memcpy/memset/memcmp). */
#include "ember.h"

/* The host tests (-DHOST_TEST) take these from the C library. */
#ifndef HOST_TEST

/*
 * memcpy and memset move eight bytes per step where the alignment allows:
 * on a nested host every guest instruction is emulated (~0.3 us each), and
 * the vsock driver copies every packet.
 */
typedef uint64_t __attribute__((may_alias)) word_t;

void *memcpy(void *dst, const void *src, size_t n)
{
	uint8_t *d = dst;
	const uint8_t *s = src;

	if ((((uintptr_t)d ^ (uintptr_t)s) & 7) == 0) {
		for (; n && ((uintptr_t)d & 7); n--)
			*d++ = *s++;
		for (; n >= 8; n -= 8, d += 8, s += 8)
			*(word_t *)d = *(const word_t *)s;
	}
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	uint8_t *d = dst;
	const uint8_t *s = src;

	if (d < s) {
		while (n--)
			*d++ = *s++;
	} else {
		while (n--)
			d[n] = s[n];
	}
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	uint8_t *d = dst;
	word_t w = (uint8_t)c * 0x0101010101010101ull;

	for (; n && ((uintptr_t)d & 7); n--)
		*d++ = (uint8_t)c;
	for (; n >= 8; n -= 8, d += 8)
		*(word_t *)d = w;
	while (n--)
		*d++ = (uint8_t)c;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const uint8_t *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

size_t strnlen(const char *s, size_t max)
{
	size_t n = 0;

	while (n < max && s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return (uint8_t)*a - (uint8_t)*b;
}

#endif /* HOST_TEST */

/*
 * Finds "key=value" among the space-separated words of cmdline and copies
 * value (NUL-terminated, truncated to val_size - 1) into val.
 * The last occurrence wins, like the kernel's parameter parsing.
 */
bool cmdline_param(const char *cmdline, const char *key, char *val, size_t val_size)
{
	size_t klen = strlen(key);
	bool found = false;
	const char *p = cmdline;

	while (*p) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		if (!*p)
			break;
		const char *word = p;
		while (*p && *p != ' ' && *p != '\t' && *p != '\n')
			p++;
		size_t wlen = (size_t)(p - word);
		if (wlen > klen && word[klen] == '=' && memcmp(word, key, klen) == 0) {
			size_t n = wlen - klen - 1;
			if (n >= val_size)
				n = val_size - 1;
			memcpy(val, word + klen + 1, n);
			val[n] = '\0';
			found = true;
		}
	}
	return found;
}
