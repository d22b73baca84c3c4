/*
 * The `snap-io` test mode: block, net and vsock side by side, forever, in
 * numbered rounds, so a snapshot can be taken at any point and the restored
 * guest shows that every device still works. Each round:
 *
 * - blk: writes "ember-snap-io round <n>" (zero-padded sector) at sector
 *   SNAP_SECTOR, flushes, reads it back and compares;
 * - net: rereads the MAC, ARPs for the peer, one UDP echo (net.c);
 * - vsock: connects to host CID 2 port ember.vsock_port (default 52),
 *   sends "snap-io <n>\n", reads the echo, shuts down.
 *
 * and prints `round <n> blk ok|fail net ok|fail vsock ok|fail mac <mac>
 * cid <cid> resets <r>`, then waits SNAP_ROUND_MS. A device that is absent
 * prints "none". A transport reset (after a restore) shows in `resets` and
 * the CID is reread.
 */
#include "bootinfo.h"
#include "vsock.h"

#define SNAP_SECTOR 1
#define SNAP_ROUND_MS 100
#define SNAP_LOCAL_PORT_BASE 50000
#define CONNECT_TIMEOUT_MS 3000
#define DATA_TIMEOUT_MS 3000
#define CLOSE_TIMEOUT_MS 1000

static uint8_t blk_qmem[VIRTQ_PAGE] __attribute__((aligned(VIRTQ_PAGE)));
static uint8_t wbuf[BLK_SECTOR] __attribute__((aligned(512)));
static uint8_t rbuf[BLK_SECTOR] __attribute__((aligned(512)));

/* Appends the decimal form of v at p; returns the end. */
static char *put_u64(char *p, uint64_t v)
{
	char tmp[20];
	int n = 0;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		*p++ = tmp[--n];
	return p;
}

static char *put_str(char *p, const char *s)
{
	size_t n = strlen(s);

	memcpy(p, s, n);
	return p + n;
}

static bool blk_round(struct virtio_dev *d, uint64_t n)
{
	memset(wbuf, 0, sizeof(wbuf));
	char *e = put_str((char *)wbuf, "ember-snap-io round ");
	e = put_u64(e, n);
	*e = '\n';
	if (blk_request(d, VIRTIO_BLK_T_OUT, SNAP_SECTOR, wbuf, BLK_SECTOR, false, NULL) != 0)
		return false;
	if ((d->driver_features & VIRTIO_BLK_F_FLUSH) &&
	    blk_request(d, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, false, NULL) != 0)
		return false;
	memset(rbuf, 0, sizeof(rbuf));
	if (blk_request(d, VIRTIO_BLK_T_IN, SNAP_SECTOR, rbuf, BLK_SECTOR, true, NULL) != 0)
		return false;
	return memcmp(rbuf, wbuf, BLK_SECTOR) == 0;
}

/* Next packet that is not a stray REQUEST (those get an RST). */
static int next_op(struct vsock_state *s, uint32_t timeout_ms)
{
	for (;;) {
		int op = vsock_next(s, timeout_ms);
		if (op != VSOCK_OP_REQUEST)
			return op;
		vsock_rst_reply(s);
	}
}

static bool vsock_round(struct vsock_state *s, uint32_t port, uint64_t n)
{
	static char msg[40];
	static uint8_t echo[40];
	uint32_t got = 0;
	bool ok = false;
	int op;

	char *e = put_str(msg, "snap-io ");
	e = put_u64(e, n);
	*e++ = '\n';
	uint32_t mlen = (uint32_t)(e - msg);

	vsock_open(s, VSOCK_HOST_CID, port, SNAP_LOCAL_PORT_BASE + (uint32_t)(n % 10000), 0, 0);
	if (!vsock_send(s, VSOCK_OP_REQUEST, 0, NULL, 0))
		goto out;
	op = next_op(s, CONNECT_TIMEOUT_MS);
	if (op != VSOCK_OP_RESPONSE)
		goto out;
	if (!vsock_write(s, (const uint8_t *)msg, mlen))
		goto close;
	while (got < mlen) {
		op = next_op(s, DATA_TIMEOUT_MS);
		if (op != VSOCK_OP_RW)
			break;
		uint32_t k = s->len < mlen - got ? s->len : mlen - got;
		memcpy(echo + got, s->data, k);
		got += k;
	}
	ok = got == mlen && memcmp(echo, msg, mlen) == 0;
close:
	if (!s->c.active)
		goto out;
	vsock_send(s, VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_BOTH, NULL, 0);
	do {
		op = next_op(s, CLOSE_TIMEOUT_MS);
	} while (op >= 0 && op != VSOCK_OP_RST);
	if (op != VSOCK_OP_RST)
		vsock_send(s, VSOCK_OP_RST, 0, NULL, 0);
out:
	s->c.active = false;
	return ok;
}

static const char *verdict(bool have, bool ok)
{
	return !have ? "none" : ok ? "ok" : "fail";
}

void mode_snap_io(const struct bootinfo *bi)
{
	static struct virtio_dev blk;
	static struct vsock_state vs;
	char mac[18] = "none";

	bool have_blk = virtio_find(bi, VIRTIO_ID_BLOCK, &blk);
	if (have_blk) {
		blk.qmem = blk_qmem; /* after virtio_probe, which clears it */
		have_blk = blk_init(&blk);
	}
	bool have_net = net_io_start(bi);
	bool have_vs = vsock_start(bi, &vs);
	uint32_t port = vsock_cmdline_port(bi, "ember.vsock_port", 52);
	guest_log("snap-io ready");

	for (uint64_t n = 1;; n++) {
		bool b = have_blk && blk_round(&blk, n);
		bool t = have_net && net_io_round(n, mac);
		bool v = false;
		if (have_vs) {
			vsock_check_events(&vs);
			v = vsock_round(&vs, port, n);
		}
		guest_log("round %llu blk %s net %s vsock %s mac %s cid %llu resets %u",
			  (unsigned long long)n, verdict(have_blk, b), verdict(have_net, t),
			  verdict(have_vs, v), mac, (unsigned long long)vs.cid, vs.resets);
		uint64_t until = timer_ms() + SNAP_ROUND_MS;
		while (timer_ms() < until) {
			if (have_vs)
				vsock_check_events(&vs);
			busy_delay(50);
		}
	}
}
