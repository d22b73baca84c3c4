/*
 * Parsing of the boot information handed over by the VMM:
 * - Linux boot protocol: struct boot_params ("zero page"),
 * - PVH: struct hvm_start_info with its memmap table and module list.
 */
#include "bootinfo.h"

/* struct boot_params offsets (Documentation/arch/x86/zero-page.rst). */
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE 0x0c4
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_HDR_BOOT_FLAG 0x1fe
#define BP_HDR_RAMDISK_IMAGE 0x218
#define BP_HDR_RAMDISK_SIZE 0x21c
#define BP_HDR_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0
#define BP_E820_MAX 128
#define E820_ENTRY_SIZE 20 /* packed: u64 addr, u64 size, u32 type */

/* struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h). */
#define XEN_HVM_START_MAGIC 0x336ec578
struct hvm_start_info {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	uint64_t memmap_paddr;	 /* version >= 1 */
	uint32_t memmap_entries; /* version >= 1 */
	uint32_t reserved;
};

struct hvm_modlist_entry {
	uint64_t paddr;
	uint64_t size;
	uint64_t cmdline_paddr;
	uint64_t reserved;
};

struct hvm_memmap_table_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
	uint32_t reserved;
};

static uint8_t rd8(const uint8_t *p, size_t off)
{
	return p[off];
}

static uint16_t rd16(const uint8_t *p, size_t off)
{
	uint16_t v;
	memcpy(&v, p + off, sizeof(v));
	return v;
}

static uint32_t rd32(const uint8_t *p, size_t off)
{
	uint32_t v;
	memcpy(&v, p + off, sizeof(v));
	return v;
}

static uint64_t rd64(const uint8_t *p, size_t off)
{
	uint64_t v;
	memcpy(&v, p + off, sizeof(v));
	return v;
}

static const char *cmdline_at(uint64_t paddr)
{
	return paddr ? (const char *)phys_to_virt(paddr) : "";
}

static void add_mem(struct bootinfo *bi, uint64_t addr, uint64_t size, uint32_t type)
{
	if (bi->nr_mem < MAX_MEM_ENTRIES) {
		bi->mem[bi->nr_mem].addr = addr;
		bi->mem[bi->nr_mem].size = size;
		bi->mem[bi->nr_mem].type = type;
		bi->nr_mem++;
	}
}

static void parse_zero_page(struct bootinfo *bi)
{
	const uint8_t *bp = phys_to_virt(bi->info_paddr);

	bi->info_valid = rd16(bp, BP_HDR_BOOT_FLAG) == 0xaa55;

	uint64_t cmd = rd32(bp, BP_HDR_CMD_LINE_PTR) |
		       ((uint64_t)rd32(bp, BP_EXT_CMD_LINE_PTR) << 32);
	bi->cmdline = cmdline_at(cmd);

	unsigned n = rd8(bp, BP_E820_ENTRIES);
	if (n > BP_E820_MAX)
		n = BP_E820_MAX;
	for (unsigned i = 0; i < n; i++) {
		size_t off = BP_E820_TABLE + (size_t)i * E820_ENTRY_SIZE;
		add_mem(bi, rd64(bp, off), rd64(bp, off + 8), rd32(bp, off + 16));
	}

	uint64_t rd_addr = rd32(bp, BP_HDR_RAMDISK_IMAGE) |
			   ((uint64_t)rd32(bp, BP_EXT_RAMDISK_IMAGE) << 32);
	uint64_t rd_size = rd32(bp, BP_HDR_RAMDISK_SIZE) |
			   ((uint64_t)rd32(bp, BP_EXT_RAMDISK_SIZE) << 32);
	if (rd_addr && rd_size) {
		bi->has_initrd = true;
		bi->initrd_addr = rd_addr;
		bi->initrd_size = rd_size;
	}
}

static void parse_start_info(struct bootinfo *bi)
{
	const struct hvm_start_info *si = phys_to_virt(bi->info_paddr);

	bi->info_valid = si->magic == XEN_HVM_START_MAGIC;
	if (!bi->info_valid)
		return;

	bi->cmdline = cmdline_at(si->cmdline_paddr);

	if (si->version >= 1 && si->memmap_paddr) {
		const struct hvm_memmap_table_entry *e = phys_to_virt(si->memmap_paddr);
		for (uint32_t i = 0; i < si->memmap_entries; i++)
			add_mem(bi, e[i].addr, e[i].size, e[i].type);
	}

	if (si->nr_modules >= 1 && si->modlist_paddr) {
		const struct hvm_modlist_entry *m = phys_to_virt(si->modlist_paddr);
		if (m[0].paddr && m[0].size) {
			bi->has_initrd = true;
			bi->initrd_addr = m[0].paddr;
			bi->initrd_size = m[0].size;
		}
	}
}

void bootinfo_parse(struct bootinfo *bi, int proto, uint64_t info_paddr)
{
	bi->proto = proto;
	bi->info_paddr = info_paddr;
	bi->info_valid = false;
	bi->cmdline = "";
	bi->nr_mem = 0;
	bi->has_initrd = false;
	bi->initrd_addr = 0;
	bi->initrd_size = 0;

	if (!info_paddr)
		return;
	if (proto == BOOT_PROTO_PVH)
		parse_start_info(bi);
	else
		parse_zero_page(bi);
}

const char *boot_proto_name(int proto)
{
	switch (proto) {
	case BOOT_PROTO_LINUX64:
		return "linux64";
	case BOOT_PROTO_BZIMAGE:
		return "bzimage";
	case BOOT_PROTO_PVH:
		return "pvh";
	default:
		return "unknown";
	}
}
