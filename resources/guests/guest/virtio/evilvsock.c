/*
 * The `evil-vsock-flood` mode: a connection flood toward one host port
 * that lies about its credit (buf_alloc 0xffffffff on every packet), then
 * 64 KiB writes on every accepted connection without regard to the host's
 * credit. The VMM must stay responsive and bounded: connections beyond its
 * limit, a full accept queue and a host that never reads all end in RSTs.
 * Answers are counted as they come, never waited for one by one; loops
 * stay small because the guest CPU may be emulated.
 */
#include "bootinfo.h"
#include "vsock.h"

#define TXQ 1
#define FLOOD_MAX 512
#define FLOOD_BASE_PORT 20000
#define FLOOD_CHUNK (64 * 1024)
#define FLOOD_SETTLE_MS 1000
#define FLOOD_TX_TIMEOUT_MS 2000

enum { REQUESTED, CONNECTED, DEAD };

static struct vsock_state s;
static struct vsock_hdr fhdr;
static uint8_t chunk[FLOOD_CHUNK] __attribute__((aligned(4096)));
static uint8_t state_of[FLOOD_MAX];
static uint32_t nconns, responses, refused, resets;

/* One packet from guest port FLOOD_BASE_PORT + i; payload from `chunk`. */
static bool flood_send(uint32_t i, uint32_t port, uint16_t op, uint32_t len)
{
	struct virtq *vq = &s.dev.vq[TXQ];
	struct vbuf b[2];
	uint32_t ul;

	fhdr.src_cid = s.cid;
	fhdr.dst_cid = VSOCK_HOST_CID;
	fhdr.src_port = FLOOD_BASE_PORT + i;
	fhdr.dst_port = port;
	fhdr.len = len;
	fhdr.type = 1;
	fhdr.op = op;
	fhdr.flags = 0;
	fhdr.buf_alloc = 0xffffffffu; /* the lie */
	fhdr.fwd_cnt = 0;
	b[0] = (struct vbuf){ &fhdr, sizeof(fhdr), false };
	b[1] = (struct vbuf){ chunk, len, false };
	if (virtq_add(vq, b, len ? 2 : 1) < 0)
		return false;
	virtq_kick(&s.dev, vq);
	return virtq_wait(&s.dev, vq, &ul, FLOOD_TX_TIMEOUT_MS) >= 0;
}

/* Counts whatever the host sent so far. */
static void flood_drain(void)
{
	while (vsock_recv_raw(&s)) {
		uint32_t i = s.hdr.dst_port - FLOOD_BASE_PORT;
		if (s.hdr.src_cid != VSOCK_HOST_CID || i >= nconns)
			continue;
		if (s.hdr.op == VSOCK_OP_RESPONSE && state_of[i] == REQUESTED) {
			state_of[i] = CONNECTED;
			responses++;
		} else if (s.hdr.op == VSOCK_OP_RST && state_of[i] != DEAD) {
			if (state_of[i] == REQUESTED)
				refused++;
			else
				resets++;
			state_of[i] = DEAD;
		}
	}
}

static void flood_settle(void)
{
	uint64_t end = timer_ms() + FLOOD_SETTLE_MS;

	while (timer_ms() < end) {
		flood_drain();
		busy_delay(50);
	}
}

void mode_evil_vsock_flood(const struct bootinfo *bi)
{
	uint32_t port = vsock_cmdline_port(bi, "ember.vsock_port", 52);
	uint32_t chunks = vsock_cmdline_port(bi, "ember.flood_chunks", 0);
	uint32_t hold = vsock_cmdline_port(bi, "ember.flood_hold", 1);

	nconns = vsock_cmdline_port(bi, "ember.flood_conns", 300);
	if (nconns > FLOOD_MAX)
		nconns = FLOOD_MAX;
	if (!vsock_start(bi, &s))
		return;
	guest_log("evil vsock-flood start conns %u chunks %u port %u", nconns, chunks, port);
	for (uint32_t i = 0; i < nconns; i++) {
		state_of[i] = REQUESTED;
		if (!flood_send(i, port, VSOCK_OP_REQUEST, 0))
			guest_log("evil vsock-flood tx timeout at request %u", i);
		flood_drain();
	}
	flood_settle();
	for (uint32_t c = 0; c < chunks; c++) {
		for (uint32_t i = 0; i < nconns; i++) {
			if (state_of[i] != CONNECTED)
				continue;
			if (!flood_send(i, port, VSOCK_OP_RW, FLOOD_CHUNK))
				guest_log("evil vsock-flood tx timeout at write %u", i);
			flood_drain();
		}
	}
	flood_settle();
	guest_log("evil vsock-flood requests %u responses %u refused %u resets %u", nconns,
		  responses, refused, resets);
	if (hold) {
		guest_log("evil vsock-flood holding");
		halt_forever();
	}
	vsock_stop(&s);
}
