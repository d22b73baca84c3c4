/*
 * Program start and end: boot information, the command line (argv, the
 * environment, mounts), the heap, exit.
 *
 * arch/entry64.S (PVH via arch/pvh.S) calls ember_main(proto, info_paddr)
 * on the runtime's own page tables and stack with .bss cleared.
 *
 * With `ember.warm=1` on the command line, ember_main hands over to
 * rt_warm_start (warm.c) before main: the per-instance argv, environment
 * and mounts then come from the host after a snapshot restore, and are
 * added through the same rt_add_arg / rt_add_env / rt_add_mount_word as
 * the command line's words.
 */
#include "rt.h"

#define MAX_WORDS 256
#define MAX_ARGS 128
#define MAX_ENV 128
#define CMDLINE_MAX 4096
#define HEAP_ALIGN 16

int main(int argc, char **argv);
void ember_main(uint32_t proto, uint64_t info_paddr) __attribute__((noreturn));

struct bootinfo rt_bootinfo;
char **environ;

static char cmd_copy[CMDLINE_MAX + 1];
static char *words[MAX_WORDS];
static char *argv_tab[MAX_ARGS + 2];
static char *env_tab[MAX_ENV + 1];
static int argc_n, envc_n;
static bool warm_boot;

static uintptr_t heap_next, heap_end, heap_last;

extern char _end[]; /* end of the program image (linker script) */

static bool is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/*
 * Splits the command line into words in place: whitespace separates words,
 * double quotes group (and are removed), like the kernel's own parsing.
 */
static int split_words(char *s, char **out, int max)
{
	int n = 0;

	while (*s) {
		while (is_space(*s))
			s++;
		if (!*s)
			break;
		char *w = s, *d = s;
		bool quoted = false;
		while (*s && (quoted || !is_space(*s))) {
			if (*s == '"')
				quoted = !quoted;
			else
				*d++ = *s;
			s++;
		}
		bool more = *s != '\0';
		if (more)
			s++;
		*d = '\0';
		if (n < max)
			out[n++] = w;
	}
	return n;
}

static bool starts_with(const char *s, const char *prefix)
{
	return strncmp(s, prefix, strlen(prefix)) == 0;
}

/*
 * `<mount point>:<n>` (the value of an `ember.mount=` word): split at the
 * last ':'. False (and a log line) when malformed.
 */
bool rt_add_mount_word(char *val)
{
	char *colon = strrchr(val, ':');
	char *end;

	if (!colon || colon == val || colon[1] == '\0') {
		kprintf("ember: ignoring bad ember.mount=%s\n", val);
		return false;
	}
	*colon = '\0';
	long n = strtol(colon + 1, &end, 10);
	if (*end || n < 0 || n >= VIRTIO_MAX_DEVICES) {
		kprintf("ember: ignoring bad ember.mount=%s:%s\n", val, colon + 1);
		return false;
	}
	return rt_add_mount(val, (int)n);
}

/* An environment word: KEY=VALUE with a non-empty KEY without dots. */
static bool is_env_word(const char *w)
{
	const char *eq = strchr(w, '=');

	if (!eq || eq == w)
		return false;
	for (const char *p = w; p < eq; p++)
		if (*p == '.')
			return false;
	return true;
}

bool rt_add_arg(const char *w)
{
	if (argc_n >= MAX_ARGS)
		return false;
	argv_tab[argc_n++] = (char *)w;
	argv_tab[argc_n] = NULL;
	return true;
}

bool rt_add_env(char *w)
{
	if (!is_env_word(w) || envc_n >= MAX_ENV)
		return false;
	env_tab[envc_n++] = w;
	env_tab[envc_n] = NULL;
	return true;
}

static void parse_cmdline(const char *cmdline)
{
	bool after_dashes = false;

	strncpy(cmd_copy, cmdline, CMDLINE_MAX);
	cmd_copy[CMDLINE_MAX] = '\0';
	int n = split_words(cmd_copy, words, MAX_WORDS);

	argc_n = envc_n = 0;
	argv_tab[0] = NULL;
	env_tab[0] = NULL;
	environ = env_tab;
	rt_add_arg("ember");
	for (int i = 0; i < n; i++) {
		char *w = words[i];
		/* The VMM appends its device words after the user's command line. */
		if (starts_with(w, "virtio_mmio.device="))
			continue;
		if (after_dashes) {
			rt_add_arg(w);
		} else if (strcmp(w, "--") == 0) {
			after_dashes = true;
		} else if (starts_with(w, "ember.mount=")) {
			rt_add_mount_word(w + strlen("ember.mount="));
		} else if (strcmp(w, "ember.warm=1") == 0) {
			warm_boot = true;
		} else if (is_env_word(w)) {
			rt_add_env(w);
		}
	}
}

/* The heap: the RAM region holding the end of the image, up to its end. */
static void heap_init(const struct bootinfo *bi)
{
	uintptr_t start = ((uintptr_t)_end + 4095) & ~(uintptr_t)4095;

	for (uint32_t i = 0; i < bi->nr_mem; i++) {
		const struct mem_entry *m = &bi->mem[i];
		if (m->type != MEM_TYPE_RAM || start < m->addr || start >= m->addr + m->size)
			continue;
		uint64_t end = m->addr + m->size;
		if (bi->has_initrd && bi->initrd_addr > start && bi->initrd_addr < end)
			end = bi->initrd_addr;
		/* Stay inside the 4 GiB identity map. */
		if (end > 0x100000000ull)
			end = 0x100000000ull;
		heap_next = start;
		heap_end = (uintptr_t)end;
		return;
	}
}

void *rt_alloc_aligned(size_t size, size_t align)
{
	uintptr_t p = (heap_next + align - 1) & ~(uintptr_t)(align - 1);

	if (p < heap_next || size > heap_end - p || p > heap_end)
		return NULL;
	heap_last = p;
	heap_next = p + size;
	return (void *)p;
}

/* Each block is preceded by 16 bytes holding its size (for realloc). */
void *malloc(size_t size)
{
	if (size > heap_end - heap_next)
		return NULL;
	size = (size + HEAP_ALIGN - 1) & ~(size_t)(HEAP_ALIGN - 1);
	uint8_t *p = rt_alloc_aligned(size + HEAP_ALIGN, HEAP_ALIGN);
	if (!p)
		return NULL;
	memcpy(p, &size, sizeof(size));
	heap_last = (uintptr_t)(p + HEAP_ALIGN);
	return p + HEAP_ALIGN;
}

void *calloc(size_t n, size_t size)
{
	if (size && n > (size_t)-1 / size)
		return NULL;
	void *p = malloc(n * size);
	if (p)
		memset(p, 0, n * size);
	return p;
}

static size_t block_size(const void *p)
{
	size_t size;

	memcpy(&size, (const uint8_t *)p - HEAP_ALIGN, sizeof(size));
	return size;
}

void *realloc(void *p, size_t size)
{
	if (!p)
		return malloc(size);
	size_t old = block_size(p);
	if (size <= old)
		return p;
	/* The most recent block grows in place. */
	size_t want = (size + HEAP_ALIGN - 1) & ~(size_t)(HEAP_ALIGN - 1);
	if ((uintptr_t)p == heap_last && want - old <= heap_end - heap_next) {
		heap_next += want - old;
		memcpy((uint8_t *)p - HEAP_ALIGN, &want, sizeof(want));
		return p;
	}
	void *q = malloc(size);
	if (q)
		memcpy(q, p, old);
	return q;
}

void free(void *p)
{
	if (p && (uintptr_t)p == heap_last) {
		heap_next = (uintptr_t)p - HEAP_ALIGN;
		heap_last = 0;
	}
}

char *getenv(const char *name)
{
	size_t n = strlen(name);

	for (char **e = environ; e && *e; e++)
		if (strncmp(*e, name, n) == 0 && (*e)[n] == '=')
			return *e + n + 1;
	return NULL;
}

void exit(int status)
{
	rt_volumes_flush();
	kprintf("ember: exit %d\n", status);
	system_reset();
}

void abort(void)
{
	serial_puts("ember: abort\n");
	exit(134);
}

void __ember_assert_fail(const char *expr, const char *file, int line)
	__attribute__((noreturn));
void __ember_assert_fail(const char *expr, const char *file, int line)
{
	kprintf("ember: assertion failed: %s (%s:%d)\n", expr, file, line);
	abort();
}

/* ---- CPU exceptions: report and end the program (status 139) ---- */

#define FAULT_STATUS 139
#define NR_TRAPS 32

struct trap_frame {
	uint64_t vector;
	uint64_t error;
	uint64_t rip;
	uint64_t cs;
	uint64_t rflags;
	uint64_t rsp;
	uint64_t ss;
};

extern const uint64_t rt_trap_stubs[NR_TRAPS];
void rt_trap(const struct trap_frame *f) __attribute__((noreturn));

static struct {
	uint16_t off_lo, sel;
	uint8_t ist, type;
	uint16_t off_mid;
	uint32_t off_hi, zero;
} __attribute__((packed)) idt[NR_TRAPS] __attribute__((aligned(16)));

static const char *const trap_names[NR_TRAPS] = {
	[0] = "divide error",	     [1] = "debug",		  [2] = "NMI",
	[3] = "breakpoint",	     [4] = "overflow",		  [5] = "bound range",
	[6] = "invalid opcode",	     [7] = "device not available", [8] = "double fault",
	[10] = "invalid TSS",	     [11] = "segment not present", [12] = "stack fault",
	[13] = "general protection", [14] = "page fault",	  [16] = "x87 error",
	[17] = "alignment check",    [18] = "machine check",	  [19] = "SIMD error",
};

static void traps_init(void)
{
	for (int i = 0; i < NR_TRAPS; i++) {
		uint64_t a = rt_trap_stubs[i];
		idt[i].off_lo = (uint16_t)a;
		idt[i].sel = SEL_CODE64;
		idt[i].ist = 0;
		idt[i].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
		idt[i].off_mid = (uint16_t)(a >> 16);
		idt[i].off_hi = (uint32_t)(a >> 32);
		idt[i].zero = 0;
	}
	struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) desc = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
	__asm__ volatile("lidt %0" : : "m"(desc));
}

void rt_trap(const struct trap_frame *f)
{
	static int nested;
	const char *name = f->vector < NR_TRAPS && trap_names[f->vector] ? trap_names[f->vector]
									 : "exception";

	if (nested++) /* a fault while reporting one */
		system_reset();
	kprintf("ember: fault vector %u (%s) error 0x%lx rip 0x%lx rsp 0x%lx\n",
		(unsigned)f->vector, name, f->error, f->rip, f->rsp);
	if (f->vector == 14) {
		uint64_t cr2;
		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		kprintf("ember: fault address 0x%lx\n", cr2);
	}
	exit(FAULT_STATUS);
}

void ember_main(uint32_t proto, uint64_t info_paddr)
{
	traps_init();
	serial_init();
	bootinfo_parse(&rt_bootinfo, (int)proto, info_paddr);
	if (!rt_bootinfo.info_valid)
		serial_puts("ember: warning: no valid boot information\n");
	heap_init(&rt_bootinfo);
	parse_cmdline(rt_bootinfo.cmdline);
	if (warm_boot)
		rt_warm_start(); /* returns with the host's argv, env and mounts added */
	exit(main(argc_n, argv_tab));
}
