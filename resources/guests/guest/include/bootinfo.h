/* Boot information gathered from the Linux zero page or PVH start_info. */
#ifndef EMBER_BOOTINFO_H
#define EMBER_BOOTINFO_H

#include "ember.h"

#define MAX_MEM_ENTRIES 64

#define MEM_TYPE_RAM 1

struct mem_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
};

struct bootinfo {
	int proto;	      /* BOOT_PROTO_* */
	uint64_t info_paddr;  /* zero page or hvm_start_info address */
	bool info_valid;      /* magic / sanity checks passed */
	const char *cmdline;  /* never NULL, "" when absent */
	uint32_t nr_mem;
	struct mem_entry mem[MAX_MEM_ENTRIES];
	bool has_initrd;
	uint64_t initrd_addr;
	uint64_t initrd_size;
};

void bootinfo_parse(struct bootinfo *bi, int proto, uint64_t info_paddr);
const char *boot_proto_name(int proto);

#endif
