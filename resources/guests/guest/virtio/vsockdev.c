/*
 * virtio-vsock (device id 19) driver, polled; see include/vsock.h. Queues:
 * 0 = rx, 1 = tx, 2 = event. Every send waits until the device has used
 * the tx buffer.
 */
#include "bootinfo.h"
#include "vsock.h"

#define RXQ 0
#define TXQ 1
#define EVQ 2
#define VSOCK_RX_BUFS 4
#define VSOCK_F_STREAM (1ull << 0)
#define VIRTIO_VSOCK_EVENT_TRANSPORT_RESET 0
#define TYPE_STREAM 1

#define DATA_TIMEOUT_MS 10000
#define TX_TIMEOUT_MS 2000

static uint8_t rx_bufs[VSOCK_RX_BUFS][VSOCK_BUF] __attribute__((aligned(4096)));
static struct vsock_hdr tx_hdr;
static uint8_t tx_data[VSOCK_BUF];
static uint8_t ev_buf[16];
static int8_t rx_buf_of_head[VIRTQ_MAX_SIZE];

static bool post_rx(struct vsock_state *s, int i)
{
	struct vbuf b = { rx_bufs[i], VSOCK_BUF, true };
	int head = virtq_add(&s->dev.vq[RXQ], &b, 1);

	if (head < 0)
		return false;
	rx_buf_of_head[head] = (int8_t)i;
	return true;
}

static bool send_pkt(struct vsock_state *s, uint64_t dst_cid, uint32_t src_port, uint32_t dst_port,
		     uint16_t op, uint32_t flags, const void *data, uint32_t len, uint32_t fwd)
{
	struct virtq *vq = &s->dev.vq[TXQ];
	struct vbuf b[2];
	uint32_t ul;

	tx_hdr.src_cid = s->cid;
	tx_hdr.dst_cid = dst_cid;
	tx_hdr.src_port = src_port;
	tx_hdr.dst_port = dst_port;
	tx_hdr.len = len;
	tx_hdr.type = TYPE_STREAM;
	tx_hdr.op = op;
	tx_hdr.flags = flags;
	tx_hdr.buf_alloc = VSOCK_BUF_ALLOC;
	tx_hdr.fwd_cnt = fwd;
	b[0] = (struct vbuf){ &tx_hdr, sizeof(tx_hdr), false };
	if (len) {
		memcpy(tx_data, data, len);
		b[1] = (struct vbuf){ tx_data, len, false };
	}
	if (virtq_add(vq, b, len ? 2 : 1) < 0)
		return false;
	virtq_kick(&s->dev, vq);
	if (virtq_wait(&s->dev, vq, &ul, TX_TIMEOUT_MS) < 0) {
		guest_log("vsock timeout waiting for tx completion");
		return false;
	}
	return true;
}

bool vsock_send(struct vsock_state *s, uint16_t op, uint32_t flags, const void *data,
		uint32_t len)
{
	struct vconn *c = &s->c;

	if (!send_pkt(s, c->peer_cid, c->local_port, c->peer_port, op, flags, data, len,
		      c->fwd_cnt))
		return false;
	c->tx_cnt += len;
	c->fwd_reported = c->fwd_cnt;
	return true;
}

void vsock_rst_reply(struct vsock_state *s)
{
	send_pkt(s, s->hdr.src_cid, s->hdr.dst_port, s->hdr.src_port, VSOCK_OP_RST, 0, NULL, 0, 0);
}

static bool for_conn(const struct vsock_state *s)
{
	const struct vconn *c = &s->c;

	return c->active && s->hdr.src_cid == c->peer_cid && s->hdr.src_port == c->peer_port &&
	       s->hdr.dst_port == c->local_port;
}

/* Takes one packet off the rx queue into s->hdr / s->data; false if none. */
bool vsock_recv_raw(struct vsock_state *s)
{
	struct virtq *rx = &s->dev.vq[RXQ];
	uint32_t len;
	int head = virtq_get_used(rx, &len);

	if (head < 0)
		return false;
	int i = rx_buf_of_head[head];
	bool ok = len >= sizeof(struct vsock_hdr) && len <= VSOCK_BUF;
	if (ok) {
		memcpy(&s->hdr, rx_bufs[i], sizeof(s->hdr));
		s->len = len - (uint32_t)sizeof(s->hdr);
		if (s->hdr.len < s->len)
			s->len = s->hdr.len;
		memcpy(s->data, rx_bufs[i] + sizeof(s->hdr), s->len);
	}
	post_rx(s, i);
	virtq_kick(&s->dev, rx);
	return ok;
}

static void post_event(struct vsock_state *s)
{
	struct vbuf ev = { ev_buf, sizeof(ev_buf), true };

	memset(ev_buf, 0xff, sizeof(ev_buf));
	virtq_add(&s->dev.vq[EVQ], &ev, 1);
	virtq_kick(&s->dev, &s->dev.vq[EVQ]);
}

bool vsock_check_events(struct vsock_state *s)
{
	uint32_t len;
	bool reset = false;

	while (virtq_get_used(&s->dev.vq[EVQ], &len) >= 0) {
		uint32_t id = (uint32_t)ev_buf[0] | (uint32_t)ev_buf[1] << 8 |
			      (uint32_t)ev_buf[2] << 16 | (uint32_t)ev_buf[3] << 24;
		if (len >= 4 && id == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) {
			reset = true;
			s->resets++;
			s->c.active = false;
			s->pending = false;
			s->cid = virtio_cfg_read64(&s->dev, 0);
		}
		post_event(s);
	}
	if (reset) {
		uint32_t isr = vreg_read(&s->dev, VIRTIO_MMIO_INTERRUPT_STATUS);
		if (isr)
			vreg_write(&s->dev, VIRTIO_MMIO_INTERRUPT_ACK, isr);
	}
	return reset;
}

int vsock_next(struct vsock_state *s, uint32_t timeout_ms)
{
	uint64_t deadline = timer_ms() + timeout_ms;
	struct vconn *c = &s->c;

	for (;;) {
		if (s->pending) {
			s->pending = false;
		} else if (!vsock_recv_raw(s)) {
			bool was_active = c->active;
			if (vsock_check_events(s) && was_active)
				return VSOCK_OP_RST;
			if (timer_ms() >= deadline)
				return -1;
			busy_delay(50);
			continue;
		}
		if (s->hdr.dst_cid != s->cid || s->hdr.type != TYPE_STREAM)
			continue;
		if (for_conn(s)) {
			c->peer_buf_alloc = s->hdr.buf_alloc;
			c->peer_fwd_cnt = s->hdr.fwd_cnt;
			if (s->hdr.op == VSOCK_OP_CREDIT_UPDATE)
				continue;
			if (s->hdr.op == VSOCK_OP_CREDIT_REQUEST) {
				vsock_send(s, VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
				continue;
			}
			if (s->hdr.op == VSOCK_OP_RW) {
				/* consumed as soon as the caller sees it */
				c->fwd_cnt += s->len;
				if (c->fwd_cnt - c->fwd_reported >= VSOCK_BUF_ALLOC / 2)
					vsock_send(s, VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
			}
			return s->hdr.op;
		}
		if (s->hdr.op == VSOCK_OP_REQUEST)
			return VSOCK_OP_REQUEST;
		if (s->hdr.op != VSOCK_OP_RST)
			vsock_rst_reply(s);
	}
}

bool vsock_write(struct vsock_state *s, const uint8_t *data, uint32_t len)
{
	struct vconn *c = &s->c;

	while (len) {
		uint32_t used = c->tx_cnt - c->peer_fwd_cnt;
		uint32_t credit = c->peer_buf_alloc > used ? c->peer_buf_alloc - used : 0;
		if (!credit) {
			/* Ask, then wait for the answer (other packets wait in s). */
			if (!vsock_send(s, VSOCK_OP_CREDIT_REQUEST, 0, NULL, 0))
				return false;
			uint64_t deadline = timer_ms() + DATA_TIMEOUT_MS;
			while (c->peer_buf_alloc <= c->tx_cnt - c->peer_fwd_cnt) {
				if (timer_ms() >= deadline) {
					guest_log("vsock timeout waiting for credit");
					return false;
				}
				if (!vsock_recv_raw(s)) {
					busy_delay(50);
					continue;
				}
				if (!for_conn(s) || s->hdr.dst_cid != s->cid)
					continue;
				c->peer_buf_alloc = s->hdr.buf_alloc;
				c->peer_fwd_cnt = s->hdr.fwd_cnt;
				uint16_t op = s->hdr.op;
				if (op != VSOCK_OP_CREDIT_UPDATE && op != VSOCK_OP_RW) {
					/* RST/SHUTDOWN: let the caller see it */
					s->pending = true;
					return false;
				}
				if (op == VSOCK_OP_RW) {
					guest_log("vsock dropped %u bytes while out of credit",
						  s->len);
					c->fwd_cnt += s->len;
				}
			}
			continue;
		}
		uint32_t n = len < credit ? len : credit;
		if (n > VSOCK_BUF)
			n = VSOCK_BUF;
		if (!vsock_send(s, VSOCK_OP_RW, 0, data, n))
			return false;
		data += n;
		len -= n;
	}
	return true;
}

void vsock_open(struct vsock_state *s, uint64_t peer_cid, uint32_t peer_port,
		uint32_t local_port, uint32_t peer_buf_alloc, uint32_t peer_fwd_cnt)
{
	memset(&s->c, 0, sizeof(s->c));
	s->c.active = true;
	s->c.peer_cid = peer_cid;
	s->c.peer_port = peer_port;
	s->c.local_port = local_port;
	s->c.peer_buf_alloc = peer_buf_alloc;
	s->c.peer_fwd_cnt = peer_fwd_cnt;
}

int vsock_accept(struct vsock_state *s, uint32_t port, uint32_t timeout_ms)
{
	s->c.active = false;
	for (;;) {
		int op = vsock_next(s, timeout_ms);
		if (op < 0)
			return 0;
		if (op == VSOCK_OP_REQUEST && s->hdr.dst_port == port)
			break;
		vsock_rst_reply(s);
	}
	vsock_open(s, s->hdr.src_cid, s->hdr.src_port, port, s->hdr.buf_alloc, s->hdr.fwd_cnt);
	if (!vsock_send(s, VSOCK_OP_RESPONSE, 0, NULL, 0)) {
		s->c.active = false;
		return -1;
	}
	return 1;
}

bool vsock_start(const struct bootinfo *bi, struct vsock_state *s)
{
	memset(s, 0, sizeof(*s));
	if (!virtio_find(bi, VIRTIO_ID_VSOCK, &s->dev)) {
		guest_log("vsock none");
		return false;
	}
	if (!virtio_init(&s->dev, VSOCK_F_STREAM, "vsock"))
		return false;
	if (s->dev.nqueues < 3) {
		guest_log("vsock init failed: %d queues", s->dev.nqueues);
		virtio_reset(&s->dev);
		return false;
	}
	s->cid = virtio_cfg_read64(&s->dev, 0);

	for (int i = 0; i < VSOCK_RX_BUFS; i++)
		post_rx(s, i);
	virtq_kick(&s->dev, &s->dev.vq[RXQ]);
	post_event(s);
	return true;
}

void vsock_stop(struct vsock_state *s)
{
	virtio_reset(&s->dev);
}

uint32_t vsock_cmdline_port(const struct bootinfo *bi, const char *key, uint32_t def)
{
	char v[16];
	uint32_t x;

	if (cmdline_param(bi->cmdline, key, v, sizeof(v)) && parse_u32(v, &x))
		return x;
	return def;
}
