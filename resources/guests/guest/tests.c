/*
 * Test modes, selected with ember.test=<mode> on the kernel command line.
 * Every mode prints lines starting with "ember-guest: "; modes that finish
 * print "ember-guest: done" and reset the machine (i8042 0xfe).
 */
#include "bootinfo.h"
#include "virtio.h"

void mode_mempattern(const struct bootinfo *bi); /* mempattern.c */
void mode_mempattern_rng(const struct bootinfo *bi); /* mempattern.c */

#define DEFAULT_MODE "hello"
#define MODE_MAX 64

#define I8042_DATA 0x60
#define I8042_STATUS 0x64
#define I8042_STR_OBF 0x01

/* Loop counts for busy_delay(); the guest CPU may be emulated (slow). */
#define TICK_DELAY 200000
#define POLL_DELAY 2000

static void mode_hello(const struct bootinfo *bi)
{
	guest_log("hello from %s boot", boot_proto_name(bi->proto));
}

static void mode_cmdline(const struct bootinfo *bi)
{
	guest_log("cmdline: %s", bi->cmdline);
}

static void mode_memmap(const struct bootinfo *bi)
{
	uint64_t ram = 0;

	for (uint32_t i = 0; i < bi->nr_mem; i++) {
		const struct mem_entry *e = &bi->mem[i];
		guest_log("mem 0x%llx 0x%llx %u", (unsigned long long)e->addr,
			  (unsigned long long)e->size, e->type);
		if (e->type == MEM_TYPE_RAM)
			ram += e->size;
	}
	guest_log("ram-total %llu MiB", (unsigned long long)(ram >> 20));
}

static void mode_cpus(const struct bootinfo *bi)
{
	(void)bi;
	int cpus = mptable_count_cpus();

	if (cpus >= 0)
		guest_log("cpus %d", cpus);
}

static void mode_initrd(const struct bootinfo *bi)
{
	if (!bi->has_initrd) {
		guest_log("initrd none");
		return;
	}
	uint32_t h = fnv1a32(phys_to_virt(bi->initrd_addr), bi->initrd_size);
	guest_log("initrd 0x%llx 0x%llx fnv1a 0x%08x", (unsigned long long)bi->initrd_addr,
		  (unsigned long long)bi->initrd_size, h);
}

static void __attribute__((noreturn)) mode_idle(const struct bootinfo *bi)
{
	(void)bi;
	guest_log("idle");
	halt_forever();
}

static void __attribute__((noreturn)) mode_ticker(const struct bootinfo *bi)
{
	(void)bi;
	for (uint64_t n = 0;; n++) {
		guest_log("tick %llu", (unsigned long long)n);
		busy_delay(TICK_DELAY);
	}
}

/* Firecracker's boot timer (ember-vmm --boot-timer): a byte 123 written at
 * the first page of the MMIO gap says "booted". */
#define BOOT_TIMER_ADDR 0xd0000000UL
#define BOOT_TIMER_MAGIC 123

static void mode_boot_timer(const struct bootinfo *bi)
{
	(void)bi;
	uint8_t v = BOOT_TIMER_MAGIC;

	__asm__ volatile("movb %0, (%1)" : : "q"(v), "r"((uintptr_t)BOOT_TIMER_ADDR) : "memory");
	guest_log("boot-timer signalled");
}

static void mode_wait_ctrlaltdel(const struct bootinfo *bi)
{
	static const uint8_t seq[] = { 0x14, 0x11, 0xe0, 0x71 };
	size_t matched = 0;

	(void)bi;
	guest_log("waiting for ctrl-alt-del");
	while (matched < sizeof(seq)) {
		if (!(inb(I8042_STATUS) & I8042_STR_OBF)) {
			busy_delay(POLL_DELAY);
			continue;
		}
		uint8_t b = inb(I8042_DATA);
		if (b == seq[matched])
			matched++;
		else
			matched = b == seq[0] ? 1 : 0;
	}
	guest_log("ctrl-alt-del");
}

static void __attribute__((noreturn)) mode_triple_fault(const struct bootinfo *bi)
{
	(void)bi;
	guest_log("triple-faulting");
	triple_fault();
}

struct test_mode {
	const char *name;
	void (*run)(const struct bootinfo *bi);
};

static const struct test_mode modes[] = {
	{ "hello", mode_hello },
	{ "cmdline", mode_cmdline },
	{ "memmap", mode_memmap },
	{ "cpus", mode_cpus },
	{ "initrd", mode_initrd },
	{ "idle", mode_idle },
	{ "ticker", mode_ticker },
	{ "mempattern", mode_mempattern },
	{ "mempattern-rng", mode_mempattern_rng },
	{ "wait-ctrlaltdel", mode_wait_ctrlaltdel },
	{ "boot-timer", mode_boot_timer },
	{ "triple-fault", mode_triple_fault },
	{ "virtio-probe", mode_virtio_probe },
	{ "blk", mode_blk },
	{ "net", mode_net },
	{ "vsock", mode_vsock },
	{ "rng", mode_rng },
	{ "balloon", mode_balloon },
	{ "mmds", mode_mmds },
	{ "pod-agent", mode_pod_agent },
	{ "evil-desc-oob", mode_evil_desc_oob },
	{ "evil-desc-loop", mode_evil_desc_loop },
	{ "evil-len", mode_evil_len },
	{ "evil-queue-size", mode_evil_queue_size },
	{ "evil-avail-idx", mode_evil_avail_idx },
	{ "evil-vsock-flood", mode_evil_vsock_flood },
	{ "evil-net-flood", mode_evil_net_flood },
	{ "evil-blk-flood", mode_evil_blk_flood },
	{ "bench-blk", mode_bench_blk },
	{ "bench-net", mode_bench_net },
	{ "snap-io", mode_snap_io },
};

void run_test(const struct bootinfo *bi)
{
	char mode[MODE_MAX];

	if (!cmdline_param(bi->cmdline, "ember.test", mode, sizeof(mode)))
		memcpy(mode, DEFAULT_MODE, sizeof(DEFAULT_MODE));

	const struct test_mode *t = NULL;
	for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
		if (strcmp(modes[i].name, mode) == 0) {
			t = &modes[i];
			break;
		}
	}

	if (t)
		t->run(bi);
	else
		guest_log("unknown mode %s", mode);

	guest_log("done");
	system_reset();
}
