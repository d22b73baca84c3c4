/*
 * Warm starts (`ember.warm=1`): the snapshot point and the restore protocol
 * shared with emberd (api_server/src/runtime/restore_config.rs).
 *
 * Template boot: after serial, heap and the command line, only the vsock
 * device is initialised (rx and event buffers posted; block and net devices
 * stay untouched, so a restored guest reads their current capacity and
 * MAC when it first uses them). The runtime prints `ember: snapshot point`
 * and polls the event queue, reading guest memory only (no VM exits).
 *
 * Restore: the VMM puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in the event
 * queue. The runtime drops any stale rx packet, re-reads its CID, connects
 * to host CID 2 port EMBER_CONFIG_PORT (the VMM forwards that to the unix
 * socket `<uds_path>_1024`, where emberd's config server waits) and reads
 * until the host closes, at most CONFIG_MAX bytes:
 *
 *     ember-config 1\n
 *     arg <hex>\n                      any number, in argv order
 *     env <hex of KEY=VALUE>\n         any number
 *     mount <hex of mount point>:<n>\n any number (n: decimal device index)
 *     seed <64 hex digits>\n           exactly one
 *     end\n                            nothing after it
 *
 * Hex is lowercase, two digits per byte; a decoded NUL is refused. Entries
 * are added after the command line's through rt_add_arg, rt_add_env and
 * rt_add_mount_word (start.c), so they obey the cold path's rules and
 * limits; an entry those refuse makes the whole config bad. The seed rekeys
 * ember_random. Then the vsock device is reset and main runs.
 *
 * Failures end the program with status 1: `ember: no restore config` when
 * nothing arrived within CONFIG_TIMEOUT_MS (no listener, no reply, an empty
 * stream), `ember: bad restore config` for anything malformed or too long.
 */
#include "rt.h"
#include "vsock.h"

#define EMBER_CONFIG_PORT 1024
#define CONFIG_MAX (64 * 1024)
#define CONFIG_TIMEOUT_MS 10000
#define RETRY_DELAY_MS 5
#define EVQ 2
#define VIRTIO_VSOCK_EVENT_TRANSPORT_RESET 0
#define SEED_LEN 32

static struct vsock_state vs;
static char cfg[CONFIG_MAX + 1];
static uint32_t cfg_len;

static void __attribute__((noreturn)) fail(const char *line)
{
	serial_puts(line);
	exit(1);
}

static void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

/*
 * Polls the event queue until a TRANSPORT_RESET event arrives; other events
 * are consumed. Nothing is posted again: the device is reset once the
 * config is in. Guest memory only, no register access (no VM exits).
 */
static void wait_transport_reset(void)
{
	struct virtq *evq = &vs.dev.vq[EVQ];

	for (;;) {
		uint32_t len;
		int head = virtq_get_used(evq, &len);
		if (head < 0) {
			cpu_relax();
			continue;
		}
		const volatile uint8_t *buf =
			(const volatile uint8_t *)(uintptr_t)evq->desc[head].addr;
		if (len >= 4 && evq->desc[head].len >= 4 &&
		    ((uint32_t)buf[0] | (uint32_t)buf[1] << 8 | (uint32_t)buf[2] << 16 |
		     (uint32_t)buf[3] << 24) == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
			return;
	}
}

/*
 * Waits, reading guest memory only, until the rx queue holds a packet
 * (true) or the deadline passes (false); the clock (port I/O, so VM exits)
 * is read only every POLL_SPINS rounds.
 */
#define POLL_SPINS 2048
static bool wait_rx(uint64_t deadline)
{
	const struct virtq *rx = &vs.dev.vq[0];

	for (;;) {
		for (int i = 0; i < POLL_SPINS; i++) {
			if (vs.pending || rx->used->idx != rx->last_used)
				return true;
			cpu_relax();
		}
		if (timer_ms() >= deadline)
			return false;
	}
}

/* The next packet for us (vsock_next's op), or -1 once the deadline passed. */
static int next_packet(uint64_t deadline)
{
	for (;;) {
		if (!wait_rx(deadline))
			return -1;
		/* Something is there: vsock_next returns at once, or -1 if it was
		 * only a credit packet (consumed). */
		int op = vsock_next(&vs, 0);
		if (op >= 0)
			return op;
	}
}

static uint32_t remaining(uint64_t deadline)
{
	uint64_t now = timer_ms();

	return now >= deadline ? 0 : (uint32_t)(deadline - now);
}

/* 1: connected; 0: the deadline passed; -1: refused (RST), try again. */
static int connect_host(uint32_t local_port, uint64_t deadline)
{
	vsock_open(&vs, VSOCK_HOST_CID, EMBER_CONFIG_PORT, local_port, 0, 0);
	if (!vsock_send(&vs, VSOCK_OP_REQUEST, 0, NULL, 0))
		return -1;
	for (;;) {
		int op = next_packet(deadline);
		if (op < 0)
			return 0;
		if (op == VSOCK_OP_RESPONSE)
			return 1;
		if (op == VSOCK_OP_REQUEST) { /* nobody may connect to us now */
			vsock_rst_reply(&vs);
			continue;
		}
		vs.c.active = false;
		if (op != VSOCK_OP_RST)
			vsock_send(&vs, VSOCK_OP_RST, 0, NULL, 0);
		return -1;
	}
}

/*
 * Reads the config into cfg until the host closes. Returns false when
 * nothing could be read before the deadline; a config over CONFIG_MAX is
 * bad (fails here).
 */
static bool fetch_config(void)
{
	uint64_t deadline = timer_ms() + CONFIG_TIMEOUT_MS;
	uint32_t attempt = 0;
	int r;

	/* Ports above the well-known range, different per attempt. */
	while ((r = connect_host(49152 + ((attempt++ * 7919u) & 0x3fff), deadline)) < 0) {
		uint64_t until = timer_ms() + RETRY_DELAY_MS;
		while (timer_ms() < until)
			cpu_relax();
		if (!remaining(deadline))
			return false;
	}
	if (r == 0)
		return false;
	for (;;) {
		int op = next_packet(deadline);
		if (op < 0) {
			/* Stalled half way: as good as nothing. */
			vsock_send(&vs, VSOCK_OP_RST, 0, NULL, 0);
			return false;
		}
		if (op == VSOCK_OP_RW) {
			if (vs.len > CONFIG_MAX - cfg_len) {
				vsock_send(&vs, VSOCK_OP_RST, 0, NULL, 0);
				fail("ember: bad restore config\n");
			}
			memcpy(cfg + cfg_len, vs.data, vs.len);
			cfg_len += vs.len;
		} else if (op == VSOCK_OP_SHUTDOWN) {
			vsock_send(&vs, VSOCK_OP_RST, 0, NULL, 0);
			break;
		} else if (op == VSOCK_OP_RST) {
			break;
		} else if (op == VSOCK_OP_REQUEST) {
			vsock_rst_reply(&vs);
		}
	}
	vs.c.active = false;
	cfg[cfg_len] = '\0';
	return cfg_len > 0;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/*
 * Decodes the lowercase hex in [s, end) in place to s (NUL-terminated).
 * False on an odd length, a non-hex digit or a decoded NUL.
 */
static bool unhex(char *s, const char *end, size_t *out_len)
{
	size_t n = (size_t)(end - s);

	if (n % 2)
		return false;
	for (size_t i = 0; i < n / 2; i++) {
		int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
		if (hi < 0 || lo < 0 || (hi | lo) == 0)
			return false;
		s[i] = (char)(hi << 4 | lo);
	}
	s[n / 2] = '\0';
	if (out_len)
		*out_len = n / 2;
	return true;
}

static bool take(char **p, const char *word)
{
	size_t n = strlen(word);

	if (strncmp(*p, word, n) != 0)
		return false;
	*p += n;
	return true;
}

/* Parses cfg (see the file comment) and applies it; false if malformed. */
static bool apply_config(void)
{
	uint8_t seed[SEED_LEN];
	bool have_seed = false;
	char *p = cfg, *end = cfg + cfg_len;

	if (memchr(cfg, '\0', cfg_len))
		return false;
	if (!take(&p, "ember-config 1\n"))
		return false;
	for (;;) {
		char *nl = memchr(p, '\n', (size_t)(end - p));
		if (!nl)
			return false;
		if (take(&p, "end\n")) {
			if (p != end || !have_seed)
				return false;
			break;
		}
		*nl = '\0';
		if (take(&p, "arg ")) {
			if (!unhex(p, nl, NULL) || !rt_add_arg(p))
				return false;
		} else if (take(&p, "env ")) {
			if (!unhex(p, nl, NULL) || !rt_add_env(p))
				return false;
		} else if (take(&p, "mount ")) {
			char *colon = memchr(p, ':', (size_t)(nl - p));
			size_t mlen;
			if (!colon || !unhex(p, colon, &mlen))
				return false;
			const char *digits = colon + 1;
			size_t nd = (size_t)(nl - digits);
			if (nd == 0 || nd > 2)
				return false;
			for (size_t i = 0; i < nd; i++)
				if (digits[i] < '0' || digits[i] > '9')
					return false;
			/* "<mount point>:<n>" in place, as an ember.mount= value. */
			p[mlen] = ':';
			memmove(p + mlen + 1, digits, nd);
			p[mlen + 1 + nd] = '\0';
			if (!rt_add_mount_word(p))
				return false;
		} else if (take(&p, "seed ")) {
			if (have_seed || nl - p != 2 * SEED_LEN)
				return false;
			for (int i = 0; i < SEED_LEN; i++) {
				int hi = hexval(p[2 * i]), lo = hexval(p[2 * i + 1]);
				if (hi < 0 || lo < 0)
					return false;
				seed[i] = (uint8_t)(hi << 4 | lo);
			}
			memset(p, 0, 2 * SEED_LEN);
			have_seed = true;
		} else {
			return false;
		}
		p = nl + 1;
	}
	rt_random_seed(seed);
	memset(seed, 0, sizeof(seed));
	return true;
}

void rt_warm_start(void)
{
	if (!vsock_start(&rt_bootinfo, &vs))
		fail("ember: warm start needs a vsock device\n");
	serial_puts("ember: snapshot point\n");
	wait_transport_reset();

	/* Restored: a new CID, and nothing of the template's device state. */
	vs.cid = virtio_cfg_read64(&vs.dev, 0);
	vs.c.active = false;
	vs.pending = false;
	while (vsock_recv_raw(&vs))
		;
	if (!fetch_config())
		fail("ember: no restore config\n");

	if (!apply_config())
		fail("ember: bad restore config\n");
	vsock_stop(&vs);
}
