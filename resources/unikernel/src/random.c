/*
 * ember_random: a ChaCha20 keystream (RFC 8439 block function, integer
 * only) keyed with 32 bytes, re-keyed from its own output after every call
 * (fast key erasure), so earlier output cannot be recomputed from the state.
 *
 * Seeding:
 * - cold: on first use, from RDRAND when CPUID says the CPU has it, mixed
 *   with RDTSC samples (the only source every vCPU has);
 * - after a snapshot restore: rt_random_seed() with the host's 32-byte
 *   `seed` (warm.c) and the TSC, so guests restored from one snapshot never
 *   share a stream.
 */
#include "rt.h"

static uint32_t key[8];
static uint64_t counter;
static uint8_t block[64];
static unsigned block_pos = sizeof(block); /* bytes of block already used */
static bool seeded;
/* rt_random_seed's key not yet erased by a rekey: done on first use. */
static bool rekey_pending;

static uint32_t rotl(uint32_t v, int n)
{
	return v << n | v >> (32 - n);
}

#define QR(a, b, c, d)                                                                             \
	do {                                                                                       \
		a += b, d = rotl(d ^ a, 16);                                                       \
		c += d, b = rotl(b ^ c, 12);                                                       \
		a += b, d = rotl(d ^ a, 8);                                                        \
		c += d, b = rotl(b ^ c, 7);                                                        \
	} while (0)

/* One 64-byte ChaCha20 block of (key, counter, nonce 0) into out. */
static void chacha_block(uint8_t out[64])
{
	uint32_t in[16] = { 0x61707865, 0x3320646e, 0x79622d32, 0x6b206574 };
	uint32_t x[16];

	for (int i = 0; i < 8; i++)
		in[4 + i] = key[i];
	in[12] = (uint32_t)counter;
	in[13] = (uint32_t)(counter >> 32);
	in[14] = in[15] = 0;
	counter++;
	for (int i = 0; i < 16; i++)
		x[i] = in[i];
	for (int r = 0; r < 10; r++) {
		QR(x[0], x[4], x[8], x[12]);
		QR(x[1], x[5], x[9], x[13]);
		QR(x[2], x[6], x[10], x[14]);
		QR(x[3], x[7], x[11], x[15]);
		QR(x[0], x[5], x[10], x[15]);
		QR(x[1], x[6], x[11], x[12]);
		QR(x[2], x[7], x[8], x[13]);
		QR(x[3], x[4], x[9], x[14]);
	}
	for (int i = 0; i < 16; i++) {
		uint32_t v = x[i] + in[i];
		out[4 * i] = (uint8_t)v;
		out[4 * i + 1] = (uint8_t)(v >> 8);
		out[4 * i + 2] = (uint8_t)(v >> 16);
		out[4 * i + 3] = (uint8_t)(v >> 24);
	}
}

static uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

static bool has_rdrand(void)
{
	uint32_t a = 1, b, c = 0, d;

	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	return (c >> 30) & 1;
}

/* One RDRAND value; false when the CPU has none or keeps failing. */
static bool rdrand64(uint64_t *v)
{
	static int have = -1;

	if (have < 0)
		have = has_rdrand();
	if (!have)
		return false;
	for (int i = 0; i < 10; i++) {
		uint8_t ok;
		__asm__ volatile("rdrand %0; setc %1" : "=r"(*v), "=qm"(ok)::"cc");
		if (ok)
			return true;
	}
	return false;
}

/* XORs RDRAND output (if any) and the TSC into the key. */
static void mix_cpu_entropy(void)
{
	for (int i = 0; i < 8; i += 2) {
		uint64_t v;
		if (rdrand64(&v)) {
			key[i] ^= (uint32_t)v;
			key[i + 1] ^= (uint32_t)(v >> 32);
		}
	}
	uint64_t t = rdtsc();
	key[6] ^= (uint32_t)t;
	key[7] ^= (uint32_t)(t >> 32);
}

static void rekey(void)
{
	uint8_t b[64];

	chacha_block(b);
	for (int i = 0; i < 8; i++)
		key[i] = (uint32_t)b[4 * i] | (uint32_t)b[4 * i + 1] << 8 |
			 (uint32_t)b[4 * i + 2] << 16 | (uint32_t)b[4 * i + 3] << 24;
	memset(b, 0, sizeof(b));
	block_pos = sizeof(block);
}

static void cold_seed(void)
{
	/* TSC samples a few hundred cycles apart: their low bits jitter. */
	for (int round = 0; round < 4; round++) {
		for (int i = 0; i < 8; i++) {
			uint64_t t = rdtsc();
			key[i] ^= (uint32_t)t * 0x9e3779b1u ^ (uint32_t)(t >> 32);
			busy_delay(64 + (t & 63));
		}
		mix_cpu_entropy();
		rekey();
	}
	seeded = true;
}

void rt_random_seed(const uint8_t seed[32])
{
	for (int i = 0; i < 8; i++)
		key[i] = (uint32_t)seed[4 * i] | (uint32_t)seed[4 * i + 1] << 8 |
			 (uint32_t)seed[4 * i + 2] << 16 | (uint32_t)seed[4 * i + 3] << 24;
	/*
	 * The host's seed is already 32 bytes of getrandom: only the TSC is
	 * mixed in. CPUID and RDRAND can cost a VM exit each (over a
	 * millisecond together on a nested host), on the warm start's path.
	 */
	uint64_t t = rdtsc();
	key[6] ^= (uint32_t)t;
	key[7] ^= (uint32_t)(t >> 32);
	counter = 0;
	/*
	 * The rekey (one ChaCha20 block, a few thousand instructions, which a
	 * nested host emulates at ~0.3 us each) waits for the first
	 * ember_random call instead of delaying main.
	 */
	rekey_pending = true;
	seeded = true;
}

void ember_random(void *buf, size_t n)
{
	uint8_t *p = buf;

	if (!seeded)
		cold_seed();
	if (rekey_pending) {
		rekey_pending = false;
		rekey();
	}
	while (n) {
		if (block_pos == sizeof(block)) {
			chacha_block(block);
			block_pos = 0;
		}
		size_t k = sizeof(block) - block_pos;
		if (k > n)
			k = n;
		memcpy(p, block + block_pos, k);
		memset(block + block_pos, 0, k);
		block_pos += (unsigned)k;
		p += k;
		n -= k;
	}
	rekey();
}
