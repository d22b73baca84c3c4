/*
 * Pure helpers: cmdline device list, numbers, IPv4 addresses, the Internet
 * checksum and FNV-1a. No hardware access, so build.rs also compiles this
 * file for the host (-DHOST_TEST) and tests it there.
 */
#include "virtio.h"

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Unsigned number, "0x" hex or decimal; returns the characters used (0 = none). */
static size_t parse_num(const char *s, size_t len, uint64_t *out)
{
	size_t i = 0;
	unsigned base = 10;
	uint64_t v = 0;

	if (len >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	}
	size_t start = i;
	for (; i < len; i++) {
		int d = hexval(s[i]);
		if (d < 0 || (unsigned)d >= base)
			break;
		if (v > (UINT64_MAX - (uint64_t)d) / base)
			return 0; /* overflow */
		v = v * base + (uint64_t)d;
	}
	if (i == start)
		return 0;
	*out = v;
	return i;
}

/* Like Linux's memparse: a number with an optional K/M/G/T suffix; all of s. */
bool memparse(const char *s, size_t len, uint64_t *out)
{
	uint64_t v;
	size_t n = parse_num(s, len, &v);

	if (!n)
		return false;
	if (n < len) {
		unsigned shift;
		switch (s[n]) {
		case 'k': case 'K': shift = 10; break;
		case 'm': case 'M': shift = 20; break;
		case 'g': case 'G': shift = 30; break;
		case 't': case 'T': shift = 40; break;
		default: return false;
		}
		if (n + 1 != len || v > (UINT64_MAX >> shift))
			return false;
		v <<= shift;
	}
	*out = v;
	return true;
}

/* "<size>@<base>:<irq>[:<id>]" (the value of virtio_mmio.device=). */
bool virtio_parse_device_arg(const char *s, size_t len, struct virtio_mmio_info *out)
{
	size_t at = 0, colon;
	uint64_t size, base, irq;

	while (at < len && s[at] != '@')
		at++;
	if (at == len || !memparse(s, at, &size) || size == 0)
		return false;
	colon = at + 1;
	while (colon < len && s[colon] != ':')
		colon++;
	if (colon == len || !memparse(s + at + 1, colon - at - 1, &base))
		return false;
	const char *p = s + colon + 1;
	size_t rest = len - colon - 1;
	size_t n = parse_num(p, rest, &irq);
	if (!n || irq > 0xffffffffu)
		return false;
	if (n != rest) {
		/* optional ":<platform device id>", ignored */
		uint64_t id;
		if (p[n] != ':' || n + 1 == rest ||
		    parse_num(p + n + 1, rest - n - 1, &id) != rest - n - 1)
			return false;
	}
	out->size = size;
	out->base = base;
	out->irq = (uint32_t)irq;
	return true;
}

/* Every virtio_mmio.device= word, in cmdline order; returns how many (<= max). */
int virtio_parse_cmdline(const char *cmdline, struct virtio_mmio_info *out, int max)
{
	static const char key[] = "virtio_mmio.device=";
	const size_t klen = sizeof(key) - 1;
	const char *p = cmdline;
	int n = 0;

	while (*p && n < max) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		const char *word = p;
		while (*p && *p != ' ' && *p != '\t' && *p != '\n')
			p++;
		size_t wlen = (size_t)(p - word);
		if (wlen > klen && memcmp(word, key, klen) == 0 &&
		    virtio_parse_device_arg(word + klen, wlen - klen, &out[n]))
			n++;
	}
	return n;
}

bool parse_u32(const char *s, uint32_t *out)
{
	uint64_t v;
	size_t len = strlen(s);

	if (!len || parse_num(s, len, &v) != len || v > 0xffffffffu)
		return false;
	*out = (uint32_t)v;
	return true;
}

/* Dotted quad; *out in host order (10.0.0.2 = 0x0a000002). */
bool parse_ipv4(const char *s, uint32_t *out)
{
	uint32_t ip = 0;

	for (int i = 0; i < 4; i++) {
		uint32_t v = 0;
		int digits = 0;
		while (*s >= '0' && *s <= '9' && digits < 4) {
			v = v * 10 + (uint32_t)(*s++ - '0');
			digits++;
		}
		if (!digits || v > 255)
			return false;
		ip = (ip << 8) | v;
		if (i < 3 && *s++ != '.')
			return false;
	}
	if (*s)
		return false;
	*out = ip;
	return true;
}

/* RFC 1071 checksum of data (big-endian 16-bit words) with a starting sum. */
uint16_t inet_csum(const void *data, size_t len, uint32_t sum)
{
	const uint8_t *p = data;

	for (; len >= 2; len -= 2, p += 2)
		sum += (uint32_t)(p[0] << 8 | p[1]);
	if (len)
		sum += (uint32_t)p[0] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

uint32_t fnv1a32(const uint8_t *p, uint64_t len)
{
	uint32_t h = 0x811c9dc5u;

	/* Word loads keep the (emulated) instruction count down. */
	for (; len >= 8; len -= 8, p += 8) {
		uint64_t w;
		memcpy(&w, p, sizeof(w));
		for (int i = 0; i < 8; i++, w >>= 8)
			h = (h ^ (uint8_t)w) * 0x01000193u;
	}
	for (; len; len--, p++)
		h = (h ^ *p) * 0x01000193u;
	return h;
}
