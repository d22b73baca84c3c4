/*
 * ember.test=mempattern: a guest whose memory says whether a snapshot
 * restored it right (tests/tests/snapshot_memory.rs).
 *
 * At start it marks 4 MiB of RAM at 16 MiB with a fixed word per page (so
 * a Full snapshot holds those 1024 pages) and never writes them again. Each
 * round then checks those words, checks that 64 pages of .bss hold the
 * previous round's pattern, writes this round's pattern into them, and
 * prints "mempattern <round> bad <words that differed>". A restore whose
 * memory is older or newer than its vCPU state (a diff not merged, a wrong
 * page served, a base page lost) shows as a bad count above 0. A Diff taken
 * between rounds holds the 64 pages and the stack, not the 4 MiB.
 * Needs 32 MiB of RAM.
 */
#include "bootinfo.h"

#define MP_PAGES 64
#define MP_WORDS (MP_PAGES * 4096 / 8)
#define MP_FIXED_BASE (16ULL << 20)
#define MP_FIXED_PAGES 1024
#define MP_DELAY 100000

static uint64_t mp_buf[MP_WORDS] __attribute__((aligned(4096)));

static uint64_t mp_val(uint64_t round, uint64_t i)
{
	return (round * 0x9e3779b97f4a7c15ULL) ^ (i * 0x100000001b3ULL) ^ i;
}

static bool mp_fixed_is_ram(const struct bootinfo *bi)
{
	for (uint32_t i = 0; i < bi->nr_mem; i++) {
		const struct mem_entry *e = &bi->mem[i];
		if (e->type == MEM_TYPE_RAM && e->addr <= MP_FIXED_BASE &&
		    e->addr + e->size >= MP_FIXED_BASE + MP_FIXED_PAGES * 4096ULL)
			return true;
	}
	return false;
}

void mode_mempattern(const struct bootinfo *bi)
{
	volatile uint64_t *fixed = phys_to_virt(MP_FIXED_BASE);

	if (!mp_fixed_is_ram(bi)) {
		guest_log("mempattern needs RAM at 16..20 MiB");
		return;
	}
	for (uint64_t p = 0; p < MP_FIXED_PAGES; p++)
		fixed[p * 512] = mp_val(0, p) | 1;
	for (uint64_t round = 1;; round++) {
		uint64_t bad = 0;

		for (uint64_t p = 0; p < MP_FIXED_PAGES; p++)
			if (fixed[p * 512] != (mp_val(0, p) | 1))
				bad++;
		for (uint64_t i = 0; i < MP_WORDS; i++) {
			if (round > 1 && mp_buf[i] != mp_val(round - 1, i))
				bad++;
			mp_buf[i] = mp_val(round, i);
		}
		guest_log("mempattern %llu bad %llu", (unsigned long long)round,
			  (unsigned long long)bad);
		busy_delay(MP_DELAY);
	}
}

/*
 * ember.test=mempattern-rng: like mempattern's check, for a page only the
 * VMM writes. Each round the guest checks that a page virtio-rng filled in
 * the previous round still hashes as it did, then asks the device to fill
 * it again and records the new hash. The guest only reads that page, so
 * KVM's dirty log never sees it change: a Diff snapshot has it only through
 * the VMM's own dirty bitmap. Prints "mempattern-rng <round> bad <0|1>".
 */
#include "virtio.h"

#define MP_RNG_TIMEOUT_MS 5000

static uint8_t mp_rng_page[4096] __attribute__((aligned(4096)));
static uint32_t mp_rng_hash;

void mode_mempattern_rng(const struct bootinfo *bi)
{
	struct virtio_dev d;

	if (!virtio_find(bi, 4, &d)) {
		guest_log("mempattern-rng needs an entropy device");
		return;
	}
	if (!virtio_init(&d, 0, "rng"))
		return;
	for (uint64_t round = 1;; round++) {
		struct virtq *vq = &d.vq[0];
		struct vbuf b = { mp_rng_page, sizeof(mp_rng_page), true };
		uint32_t got = 0;
		uint64_t bad = 0;

		if (round > 1 && fnv1a32(mp_rng_page, sizeof(mp_rng_page)) != mp_rng_hash)
			bad++;
		if (virtq_add(vq, &b, 1) < 0)
			return;
		virtq_kick(&d, vq);
		if (virtq_wait(&d, vq, &got, MP_RNG_TIMEOUT_MS) < 0 || got != sizeof(mp_rng_page)) {
			guest_log("mempattern-rng request failed");
			return;
		}
		mp_rng_hash = fnv1a32(mp_rng_page, sizeof(mp_rng_page));
		guest_log("mempattern-rng %llu bad %llu", (unsigned long long)round,
			  (unsigned long long)bad);
		busy_delay(MP_DELAY);
	}
}
