/*
 * The polled virtio-vsock (device id 19) driver in virtio/vsockdev.c, used
 * by the `vsock` mode (virtio/vsock.c) and the `pod-agent` mode
 * (podagent.c). One stream connection at a time, with credit-based flow
 * control (virtio 1.2, 5.10.6.3): we advertise VSOCK_BUF_ALLOC and count
 * consumed bytes in fwd_cnt; we never send more than the peer's credit.
 */
#ifndef EMBER_VSOCK_H
#define EMBER_VSOCK_H

#include "virtio.h"

#define VSOCK_BUF 4096 /* one rx buffer: header + up to 4052 payload bytes */
#define VSOCK_BUF_ALLOC (64 * 1024)
#define VSOCK_HOST_CID 2

#define VSOCK_OP_REQUEST 1
#define VSOCK_OP_RESPONSE 2
#define VSOCK_OP_RST 3
#define VSOCK_OP_SHUTDOWN 4
#define VSOCK_OP_RW 5
#define VSOCK_OP_CREDIT_UPDATE 6
#define VSOCK_OP_CREDIT_REQUEST 7
#define VSOCK_SHUTDOWN_BOTH 3

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
	/* the packet vsock_next returned: header, payload and its length */
	struct vsock_hdr hdr;
	uint8_t data[VSOCK_BUF];
	uint32_t len;
	bool pending; /* hdr/data hold a packet not yet returned */
	uint32_t resets; /* VIRTIO_VSOCK_EVENT_TRANSPORT_RESET events seen */
};

/*
 * Finds the first vsock device, initialises it, reads the guest CID and
 * posts the rx and event buffers. Logs `vsock none` / `vsock init failed
 * ...` and returns false when that fails.
 */
bool vsock_start(const struct bootinfo *bi, struct vsock_state *s);
/* Resets the device. */
void vsock_stop(struct vsock_state *s);
/*
 * Looks at the event queue. A transport reset (sent by a VMM restored from
 * a snapshot, virtio 1.2 5.10.6.6) forgets the connection, rereads the
 * guest CID and counts in s->resets; the buffer is posted again. Returns
 * whether a reset was seen. vsock_next calls it while it waits.
 */
bool vsock_check_events(struct vsock_state *s);
/* A port number from the cmdline word `key=<p>`, or def. */
uint32_t vsock_cmdline_port(const struct bootinfo *bi, const char *key, uint32_t def);

/*
 * Next packet the caller must look at: one for the connection, or a
 * REQUEST (hdr.dst_port tells which port). Credit packets are handled
 * here, strays get an RST. Returns the op or -1 on timeout. An OP_RW
 * payload (s->data, s->len) counts as consumed at once. A transport reset
 * while a connection is open ends it: VSOCK_OP_RST is returned.
 */
int vsock_next(struct vsock_state *s, uint32_t timeout_ms);

/* Makes s->c the connection to peer_cid:peer_port from local_port. */
void vsock_open(struct vsock_state *s, uint64_t peer_cid, uint32_t peer_port,
		uint32_t local_port, uint32_t peer_buf_alloc, uint32_t peer_fwd_cnt);
/*
 * Waits up to timeout_ms for a REQUEST to `port` (other requests get an
 * RST), opens the connection and answers RESPONSE. Returns 1 when
 * connected, 0 on timeout, -1 when the RESPONSE could not be sent.
 */
int vsock_accept(struct vsock_state *s, uint32_t port, uint32_t timeout_ms);
/* One packet on the connection (op, flags, payload). */
bool vsock_send(struct vsock_state *s, uint16_t op, uint32_t flags, const void *data,
		uint32_t len);
/*
 * Sends data as OP_RW packets within the peer's credit. While waiting for
 * credit, OP_RW packets from the peer are dropped (logged); an RST or
 * SHUTDOWN ends the write (false) and is returned by the next vsock_next.
 */
bool vsock_write(struct vsock_state *s, const uint8_t *data, uint32_t len);
/* An RST answering the packet in s->hdr. */
void vsock_rst_reply(struct vsock_state *s);
/*
 * Takes one packet off the rx queue into s->hdr / s->data (reposting the
 * buffer) without looking at it; false if none is there.
 */
bool vsock_recv_raw(struct vsock_state *s);

#endif
