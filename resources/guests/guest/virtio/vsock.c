/*
 * virtio-vsock (device id 19): the `vsock` test mode. Queues: 0 = rx,
 * 1 = tx, 2 = event. One stream connection at a time, with credit-based
 * flow control (5.10.6.3): we advertise VSOCK_BUF_ALLOC and count consumed
 * bytes in fwd_cnt; we never send more than the peer's free credit.
 */
#include "bootinfo.h"
#include "virtio.h"

#define RXQ 0
#define TXQ 1
#define EVQ 2
#define VSOCK_RX_BUFS 4
#define VSOCK_BUF 4096
#define VSOCK_BUF_ALLOC (64 * 1024)
#define HOST_CID 2
#define GUEST_LOCAL_PORT 49152
#define VSOCK_F_STREAM (1ull << 0)

#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUTDOWN_BOTH 3

#define CONNECT_TIMEOUT_MS 5000
#define DATA_TIMEOUT_MS 10000
#define CLOSE_TIMEOUT_MS 2000
#define LISTEN_TIMEOUT_MS 60000
#define TX_TIMEOUT_MS 2000

struct vsock_hdr {
	uint64_t src_cid;
	uint64_t dst_cid;
	uint32_t src_port;
	uint32_t dst_port;
	uint32_t len;
	uint16_t type;
	uint16_t op;
	uint32_t flags;
	uint32_t buf_alloc;
	uint32_t fwd_cnt;
} __attribute__((packed));

_Static_assert(sizeof(struct vsock_hdr) == 44, "virtio_vsock_hdr is 44 bytes");

struct vconn {
	bool active;
	uint64_t peer_cid;
	uint32_t peer_port, local_port;
	uint32_t peer_buf_alloc, peer_fwd_cnt;
	uint32_t tx_cnt;       /* payload bytes we sent */
	uint32_t fwd_cnt;      /* payload bytes we consumed */
	uint32_t fwd_reported; /* fwd_cnt in our last packet */
};

struct vsock_state {
	struct virtio_dev dev;
	uint64_t cid;
	struct vconn c;
	/* the packet vsock_next returned */
	struct vsock_hdr hdr;
	uint32_t len;
	bool pending; /* hdr/data hold a packet not yet returned */
};

static uint8_t rx_bufs[VSOCK_RX_BUFS][VSOCK_BUF] __attribute__((aligned(4096)));
static uint8_t pkt_data[VSOCK_BUF];
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

static bool conn_send(struct vsock_state *s, uint16_t op, uint32_t flags, const void *data,
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

/* An RST answering the packet in s->hdr. */
static void send_rst_reply(struct vsock_state *s)
{
	send_pkt(s, s->hdr.src_cid, s->hdr.dst_port, s->hdr.src_port, OP_RST, 0, NULL, 0, 0);
}

static bool for_conn(const struct vsock_state *s)
{
	const struct vconn *c = &s->c;

	return c->active && s->hdr.src_cid == c->peer_cid && s->hdr.src_port == c->peer_port &&
	       s->hdr.dst_port == c->local_port;
}

/* Takes one packet off the rx queue into s->hdr / pkt_data; false if none. */
static bool recv_raw(struct vsock_state *s)
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
		memcpy(pkt_data, rx_bufs[i] + sizeof(s->hdr), s->len);
	}
	post_rx(s, i);
	virtq_kick(&s->dev, rx);
	return ok;
}

/*
 * Next packet the caller must look at: one for the connection, or a
 * REQUEST (dst_port tells which port). Credit packets are handled here,
 * strays get an RST. Returns the op or -1 on timeout.
 */
static int vsock_next(struct vsock_state *s, uint32_t timeout_ms)
{
	uint64_t deadline = timer_ms() + timeout_ms;
	struct vconn *c = &s->c;

	for (;;) {
		if (s->pending) {
			s->pending = false;
		} else if (!recv_raw(s)) {
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
			if (s->hdr.op == OP_CREDIT_UPDATE)
				continue;
			if (s->hdr.op == OP_CREDIT_REQUEST) {
				conn_send(s, OP_CREDIT_UPDATE, 0, NULL, 0);
				continue;
			}
			if (s->hdr.op == OP_RW) {
				/* consumed as soon as the caller sees it */
				c->fwd_cnt += s->len;
				if (c->fwd_cnt - c->fwd_reported >= VSOCK_BUF_ALLOC / 2)
					conn_send(s, OP_CREDIT_UPDATE, 0, NULL, 0);
			}
			return s->hdr.op;
		}
		if (s->hdr.op == OP_REQUEST)
			return OP_REQUEST;
		if (s->hdr.op != OP_RST)
			send_rst_reply(s);
	}
}

/* Sends payload as OP_RW packets within the peer's credit. */
static bool conn_write(struct vsock_state *s, const uint8_t *data, uint32_t len)
{
	struct vconn *c = &s->c;

	while (len) {
		uint32_t used = c->tx_cnt - c->peer_fwd_cnt;
		uint32_t credit = c->peer_buf_alloc > used ? c->peer_buf_alloc - used : 0;
		if (!credit) {
			/* Ask, then wait for the answer (other packets wait in s). */
			if (!conn_send(s, OP_CREDIT_REQUEST, 0, NULL, 0))
				return false;
			uint64_t deadline = timer_ms() + DATA_TIMEOUT_MS;
			while (c->peer_buf_alloc <= c->tx_cnt - c->peer_fwd_cnt) {
				if (timer_ms() >= deadline) {
					guest_log("vsock timeout waiting for credit");
					return false;
				}
				if (!recv_raw(s)) {
					busy_delay(50);
					continue;
				}
				if (!for_conn(s) || s->hdr.dst_cid != s->cid)
					continue;
				c->peer_buf_alloc = s->hdr.buf_alloc;
				c->peer_fwd_cnt = s->hdr.fwd_cnt;
				if (s->hdr.op != OP_CREDIT_UPDATE && s->hdr.op != OP_RW) {
					s->pending = true; /* RST/SHUTDOWN: let the caller see it */
					return false;
				}
				if (s->hdr.op == OP_RW) {
					guest_log("vsock dropped %u bytes while out of credit", s->len);
					c->fwd_cnt += s->len;
				}
			}
			continue;
		}
		uint32_t n = len < credit ? len : credit;
		if (n > VSOCK_BUF)
			n = VSOCK_BUF;
		if (!conn_send(s, OP_RW, 0, data, n))
			return false;
		data += n;
		len -= n;
	}
	return true;
}

static void conn_open(struct vsock_state *s, uint64_t peer_cid, uint32_t peer_port,
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

static void guest_connect(struct vsock_state *s, uint32_t port)
{
	static const char msg[] = "hello from guest\n";
	const uint32_t mlen = sizeof(msg) - 1;
	uint8_t echo[sizeof(msg)];
	uint32_t got = 0;
	int op;

	conn_open(s, HOST_CID, port, GUEST_LOCAL_PORT, 0, 0);
	if (!conn_send(s, OP_REQUEST, 0, NULL, 0))
		goto out;
	for (;;) {
		op = vsock_next(s, CONNECT_TIMEOUT_MS);
		if (op == OP_REQUEST) {
			send_rst_reply(s); /* not listening yet */
			continue;
		}
		break;
	}
	if (op < 0) {
		guest_log("vsock timeout waiting for guest-connect response");
		goto out;
	}
	if (op != OP_RESPONSE) {
		guest_log("vsock guest-connect refused op %d", op);
		goto out;
	}
	guest_log("vsock guest-connect connected");
	if (!conn_write(s, (const uint8_t *)msg, mlen))
		goto close;
	while (got < mlen) {
		op = vsock_next(s, DATA_TIMEOUT_MS);
		if (op == OP_REQUEST) {
			send_rst_reply(s);
			continue;
		}
		if (op != OP_RW)
			break;
		uint32_t n = s->len < mlen - got ? s->len : mlen - got;
		memcpy(echo + got, pkt_data, n);
		got += n;
	}
	if (got == mlen && memcmp(echo, msg, mlen) == 0)
		guest_log("vsock guest-connect echo ok");
	else if (op < 0)
		guest_log("vsock timeout waiting for guest-connect echo");
	else
		guest_log("vsock guest-connect echo mismatch got %u bytes", got);
close:
	conn_send(s, OP_SHUTDOWN, SHUTDOWN_BOTH, NULL, 0);
	/* The peer answers a full shutdown with RST. */
	do {
		op = vsock_next(s, CLOSE_TIMEOUT_MS);
		if (op == OP_REQUEST)
			send_rst_reply(s);
	} while (op >= 0 && op != OP_RST);
	if (op != OP_RST)
		conn_send(s, OP_RST, 0, NULL, 0);
	guest_log("vsock guest-connect closed");
out:
	s->c.active = false;
}

static void host_connect(struct vsock_state *s, uint32_t port)
{
	uint64_t echoed = 0;
	int op;

	s->c.active = false;
	guest_log("vsock listening on port %u", port);
	for (;;) {
		op = vsock_next(s, LISTEN_TIMEOUT_MS);
		if (op < 0) {
			guest_log("vsock timeout waiting for host-connect");
			return;
		}
		if (op == OP_REQUEST && s->hdr.dst_port == port)
			break;
		send_rst_reply(s);
	}
	conn_open(s, s->hdr.src_cid, s->hdr.src_port, port, s->hdr.buf_alloc, s->hdr.fwd_cnt);
	if (!conn_send(s, OP_RESPONSE, 0, NULL, 0))
		return;
	guest_log("vsock host-connect accepted");
	for (;;) {
		op = vsock_next(s, DATA_TIMEOUT_MS);
		if (op == OP_REQUEST) {
			send_rst_reply(s);
			continue;
		}
		if (op == OP_RW) {
			/* pkt_data is overwritten by whatever conn_write receives */
			static uint8_t copy[VSOCK_BUF];
			uint32_t n = s->len;
			memcpy(copy, pkt_data, n);
			if (!conn_write(s, copy, n))
				continue;
			echoed += n;
			continue;
		}
		if (op == OP_SHUTDOWN) {
			conn_send(s, OP_RST, 0, NULL, 0);
			break;
		}
		if (op == OP_RST)
			break;
		if (op < 0) {
			guest_log("vsock timeout waiting for host-connect data");
			conn_send(s, OP_RST, 0, NULL, 0);
			break;
		}
	}
	s->c.active = false;
	guest_log("vsock host-connect echoed %llu", (unsigned long long)echoed);
}

static uint32_t cmdline_u32(const struct bootinfo *bi, const char *key, uint32_t def)
{
	char v[16];
	uint32_t x;

	if (cmdline_param(bi->cmdline, key, v, sizeof(v)) && parse_u32(v, &x))
		return x;
	return def;
}

void mode_vsock(const struct bootinfo *bi)
{
	static struct vsock_state s;
	char mode[8] = "both";

	memset(&s, 0, sizeof(s));
	if (!virtio_find(bi, VIRTIO_ID_VSOCK, &s.dev)) {
		guest_log("vsock none");
		return;
	}
	cmdline_param(bi->cmdline, "ember.vsock_mode", mode, sizeof(mode));
	bool guest = strcmp(mode, "both") == 0 || strcmp(mode, "guest") == 0;
	bool host = strcmp(mode, "both") == 0 || strcmp(mode, "host") == 0;
	if (!guest && !host) {
		guest_log("vsock bad ember.vsock_mode %s", mode);
		return;
	}
	if (!virtio_init(&s.dev, VSOCK_F_STREAM, "vsock"))
		return;
	if (s.dev.nqueues < 3) {
		guest_log("vsock init failed: %d queues", s.dev.nqueues);
		virtio_reset(&s.dev);
		return;
	}
	s.cid = virtio_cfg_read64(&s.dev, 0);
	guest_log("vsock cid %llu", (unsigned long long)s.cid);

	for (int i = 0; i < VSOCK_RX_BUFS; i++)
		post_rx(&s, i);
	virtq_kick(&s.dev, &s.dev.vq[RXQ]);
	struct vbuf ev = { ev_buf, sizeof(ev_buf), true };
	virtq_add(&s.dev.vq[EVQ], &ev, 1);
	virtq_kick(&s.dev, &s.dev.vq[EVQ]);

	if (guest)
		guest_connect(&s, cmdline_u32(bi, "ember.vsock_port", 52));
	if (host)
		host_connect(&s, cmdline_u32(bi, "ember.vsock_listen", 1234));
	virtio_reset(&s.dev);
}
