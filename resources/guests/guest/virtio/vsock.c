/*
 * The `vsock` test mode: one guest-initiated connection to the host (echo
 * checked) and one host-initiated connection whose bytes are echoed back.
 * The driver is in vsockdev.c.
 */
#include "bootinfo.h"
#include "vsock.h"

#define GUEST_LOCAL_PORT 49152

#define CONNECT_TIMEOUT_MS 5000
#define DATA_TIMEOUT_MS 10000
#define CLOSE_TIMEOUT_MS 2000
#define LISTEN_TIMEOUT_MS 60000

static void guest_connect(struct vsock_state *s, uint32_t port)
{
	static const char msg[] = "hello from guest\n";
	const uint32_t mlen = sizeof(msg) - 1;
	uint8_t echo[sizeof(msg)];
	uint32_t got = 0;
	int op;

	vsock_open(s, VSOCK_HOST_CID, port, GUEST_LOCAL_PORT, 0, 0);
	if (!vsock_send(s, VSOCK_OP_REQUEST, 0, NULL, 0))
		goto out;
	for (;;) {
		op = vsock_next(s, CONNECT_TIMEOUT_MS);
		if (op == VSOCK_OP_REQUEST) {
			vsock_rst_reply(s); /* not listening yet */
			continue;
		}
		break;
	}
	if (op < 0) {
		guest_log("vsock timeout waiting for guest-connect response");
		goto out;
	}
	if (op != VSOCK_OP_RESPONSE) {
		guest_log("vsock guest-connect refused op %d", op);
		goto out;
	}
	guest_log("vsock guest-connect connected");
	if (!vsock_write(s, (const uint8_t *)msg, mlen))
		goto close;
	while (got < mlen) {
		op = vsock_next(s, DATA_TIMEOUT_MS);
		if (op == VSOCK_OP_REQUEST) {
			vsock_rst_reply(s);
			continue;
		}
		if (op != VSOCK_OP_RW)
			break;
		uint32_t n = s->len < mlen - got ? s->len : mlen - got;
		memcpy(echo + got, s->data, n);
		got += n;
	}
	if (got == mlen && memcmp(echo, msg, mlen) == 0)
		guest_log("vsock guest-connect echo ok");
	else if (op < 0)
		guest_log("vsock timeout waiting for guest-connect echo");
	else
		guest_log("vsock guest-connect echo mismatch got %u bytes", got);
close:
	vsock_send(s, VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_BOTH, NULL, 0);
	/* The peer answers a full shutdown with RST. */
	do {
		op = vsock_next(s, CLOSE_TIMEOUT_MS);
		if (op == VSOCK_OP_REQUEST)
			vsock_rst_reply(s);
	} while (op >= 0 && op != VSOCK_OP_RST);
	if (op != VSOCK_OP_RST)
		vsock_send(s, VSOCK_OP_RST, 0, NULL, 0);
	guest_log("vsock guest-connect closed");
out:
	s->c.active = false;
}

static void host_connect(struct vsock_state *s, uint32_t port)
{
	uint64_t echoed = 0;
	int op;

	guest_log("vsock listening on port %u", port);
	int r = vsock_accept(s, port, LISTEN_TIMEOUT_MS);
	if (r == 0)
		guest_log("vsock timeout waiting for host-connect");
	if (r <= 0)
		return;
	guest_log("vsock host-connect accepted");
	for (;;) {
		op = vsock_next(s, DATA_TIMEOUT_MS);
		if (op == VSOCK_OP_REQUEST) {
			vsock_rst_reply(s);
			continue;
		}
		if (op == VSOCK_OP_RW) {
			/* s->data is overwritten by whatever vsock_write receives */
			static uint8_t copy[VSOCK_BUF];
			uint32_t n = s->len;
			memcpy(copy, s->data, n);
			if (!vsock_write(s, copy, n))
				continue;
			echoed += n;
			continue;
		}
		if (op == VSOCK_OP_SHUTDOWN) {
			vsock_send(s, VSOCK_OP_RST, 0, NULL, 0);
			break;
		}
		if (op == VSOCK_OP_RST)
			break;
		if (op < 0) {
			guest_log("vsock timeout waiting for host-connect data");
			vsock_send(s, VSOCK_OP_RST, 0, NULL, 0);
			break;
		}
	}
	s->c.active = false;
	guest_log("vsock host-connect echoed %llu", (unsigned long long)echoed);
}

void mode_vsock(const struct bootinfo *bi)
{
	static struct vsock_state s;
	char mode[8] = "both";

	cmdline_param(bi->cmdline, "ember.vsock_mode", mode, sizeof(mode));
	bool guest = strcmp(mode, "both") == 0 || strcmp(mode, "guest") == 0;
	bool host = strcmp(mode, "both") == 0 || strcmp(mode, "host") == 0;
	if (!vsock_start(bi, &s))
		return;
	if (!guest && !host) {
		guest_log("vsock bad ember.vsock_mode %s", mode);
		vsock_stop(&s);
		return;
	}
	guest_log("vsock cid %llu", (unsigned long long)s.cid);

	if (guest)
		guest_connect(&s, vsock_cmdline_port(bi, "ember.vsock_port", 52));
	if (host)
		host_connect(&s, vsock_cmdline_port(bi, "ember.vsock_listen", 1234));
	vsock_stop(&s);
}
