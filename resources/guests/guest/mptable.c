/* Intel MultiProcessor Specification 1.4 table walking. */
#include "ember.h"

#define MPF_SIGNATURE "_MP_"
#define MPC_SIGNATURE "PCMP"

#define MPC_HEADER_SIZE 44
#define MP_ENTRY_PROCESSOR 0
#define MP_PROCESSOR_SIZE 20
#define MP_OTHER_ENTRY_SIZE 8
#define MP_CPU_ENABLED 0x01

struct mpf_intel {
	char signature[4];
	uint32_t physptr;
	uint8_t length; /* in 16-byte units */
	uint8_t specification;
	uint8_t checksum;
	uint8_t feature1;
	uint8_t feature2;
	uint8_t feature3;
	uint8_t feature4;
	uint8_t feature5;
} __attribute__((packed));

struct mpc_table {
	char signature[4];
	uint16_t length;
	uint8_t spec;
	uint8_t checksum;
	char oem[8];
	char productid[12];
	uint32_t oemptr;
	uint16_t oemsize;
	uint16_t oemcount; /* number of entries */
	uint32_t lapic;
	uint16_t ext_length;
	uint8_t ext_checksum;
	uint8_t reserved;
} __attribute__((packed));

static uint8_t checksum(const uint8_t *p, size_t len)
{
	uint8_t sum = 0;

	while (len--)
		sum = (uint8_t)(sum + *p++);
	return sum;
}

static const struct mpf_intel *scan(uint64_t start, uint64_t end)
{
	for (uint64_t a = start; a + sizeof(struct mpf_intel) <= end; a += 16) {
		const struct mpf_intel *mpf = phys_to_virt(a);
		if (memcmp(mpf->signature, MPF_SIGNATURE, 4) == 0 && mpf->length >= 1 &&
		    checksum((const uint8_t *)mpf, (size_t)mpf->length * 16) == 0)
			return mpf;
	}
	return NULL;
}

int mptable_count_cpus(void)
{
	const struct mpf_intel *mpf = scan(0x9fc00, 0xa0000);

	if (!mpf)
		mpf = scan(0xf0000, 0x100000);
	if (!mpf) {
		guest_log("mptable: no floating pointer");
		return -1;
	}
	if (!mpf->physptr) {
		guest_log("mptable: default configuration %u not supported", mpf->feature1);
		return -1;
	}

	const struct mpc_table *mpc = phys_to_virt(mpf->physptr);
	if (memcmp(mpc->signature, MPC_SIGNATURE, 4) != 0) {
		guest_log("mptable: bad config table signature at 0x%x", mpf->physptr);
		return -1;
	}
	if (mpc->length < MPC_HEADER_SIZE) {
		guest_log("mptable: bad config table length %u", mpc->length);
		return -1;
	}
	if (checksum((const uint8_t *)mpc, mpc->length) != 0)
		guest_log("mptable: bad config table checksum");

	const uint8_t *p = (const uint8_t *)mpc + MPC_HEADER_SIZE;
	const uint8_t *end = (const uint8_t *)mpc + mpc->length;
	int cpus = 0;
	for (unsigned i = 0; i < mpc->oemcount && p < end; i++) {
		if (p[0] == MP_ENTRY_PROCESSOR) {
			if (p + MP_PROCESSOR_SIZE > end)
				break;
			if (p[3] & MP_CPU_ENABLED)
				cpus++;
			p += MP_PROCESSOR_SIZE;
		} else if (p[0] <= 4) {
			p += MP_OTHER_ENTRY_SIZE;
		} else {
			guest_log("mptable: unknown entry type %u", p[0]);
			break;
		}
	}
	return cpus;
}
