/*
 * virtio-net (device id 1): the `net`, `bench-net` and `mmds` test modes,
 * with just enough ARP, IPv4, UDP and (for MMDS) a one-connection TCP
 * client. Queues: 0 = receive, 1 = transmit. Every buffer starts with the
 * 12-byte struct virtio_net_hdr_v1 (zeros on transmit).
 */
#include "bootinfo.h"
#include "virtio.h"

#define VIRTIO_NET_F_MAC (1ull << 5)
#define NET_HDR_LEN 12
#define NET_BUF_SIZE 2048
#define NET_RX_BUFS 8
#define RXQ 0
#define TXQ 1

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define IP_HLEN 20
#define UDP_HLEN 8
#define IPPROTO_UDP 17
#define IPPROTO_TCP 6
#define TCP_HLEN 20
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define HTTP_RESP_MAX 8192

#define ECHO_PORT 7
#define DISCARD_PORT 9
#define LOCAL_PORT 4000
#define PINGS 3
#define TRIES 5
#define WAIT_MS 1000
#define TX_TIMEOUT_MS 2000
#define BENCH_FRAMES 256
#define BENCH_PAYLOAD 1024

struct net_state {
	struct virtio_dev dev;
	uint8_t mac[6];
	uint8_t peer_mac[6];
	bool have_peer_mac;
	uint32_t ip, peer_ip;
	/* what the current wait is looking for */
	const char *want_payload;
	size_t want_len;
	bool got_payload;
	/* the TCP client (mmds mode): one connection at a time */
	uint16_t tcp_lport;
	uint32_t snd_nxt, rcv_nxt;
	bool tcp_open, tcp_fin, tcp_rst;
	uint8_t *resp;
	size_t resp_len;
};

static uint8_t rx_bufs[NET_RX_BUFS][NET_BUF_SIZE] __attribute__((aligned(4096)));
static uint8_t tx_buf[NET_BUF_SIZE] __attribute__((aligned(4096)));
static int8_t rx_buf_of_head[VIRTQ_MAX_SIZE];

static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
	put16(p, (uint16_t)(v >> 16));
	put16(p + 2, (uint16_t)v);
}

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)get16(p) << 16 | get16(p + 2);
}

static void fmt_mac(char *out, const uint8_t *m)
{
	static const char hex[] = "0123456789abcdef";

	for (int i = 0; i < 6; i++) {
		out[3 * i] = hex[m[i] >> 4];
		out[3 * i + 1] = hex[m[i] & 15];
		out[3 * i + 2] = i < 5 ? ':' : '\0';
	}
}

static bool post_rx(struct net_state *s, int i)
{
	struct vbuf b = { rx_bufs[i], NET_BUF_SIZE, true };
	int head = virtq_add(&s->dev.vq[RXQ], &b, 1);

	if (head < 0)
		return false;
	rx_buf_of_head[head] = (int8_t)i;
	return true;
}

/* Sends tx_buf (vnet header + frame of flen bytes) and waits for completion. */
static bool net_send(struct net_state *s, size_t flen)
{
	struct virtq *vq = &s->dev.vq[TXQ];
	struct vbuf b = { tx_buf, (uint32_t)(NET_HDR_LEN + flen), false };
	uint32_t len;

	memset(tx_buf, 0, NET_HDR_LEN);
	if (virtq_add(vq, &b, 1) < 0)
		return false;
	virtq_kick(&s->dev, vq);
	if (virtq_wait(&s->dev, vq, &len, TX_TIMEOUT_MS) < 0) {
		guest_log("net timeout waiting for tx completion");
		return false;
	}
	return true;
}

static uint8_t *eth_start(const struct net_state *s, const uint8_t *dst, uint16_t type)
{
	uint8_t *f = tx_buf + NET_HDR_LEN;

	memcpy(f, dst, 6);
	memcpy(f + 6, s->mac, 6);
	put16(f + 12, type);
	return f + ETH_HLEN;
}

static bool send_arp(struct net_state *s, uint16_t op, const uint8_t *dst_mac,
		     const uint8_t *target_mac, uint32_t target_ip)
{
	uint8_t *a = eth_start(s, dst_mac, ETH_P_ARP);

	put16(a, 1);	    /* htype ethernet */
	put16(a + 2, ETH_P_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, s->mac, 6);
	put32(a + 14, s->ip);
	memcpy(a + 18, target_mac, 6);
	put32(a + 24, target_ip);
	return net_send(s, ETH_HLEN + 28);
}

static bool send_udp(struct net_state *s, uint16_t sport, uint16_t dport, const void *data,
		     size_t len, uint16_t ip_id)
{
	uint8_t *ip = eth_start(s, s->peer_mac, ETH_P_IP);
	uint8_t *udp = ip + IP_HLEN;

	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (uint16_t)(IP_HLEN + UDP_HLEN + len));
	put16(ip + 4, ip_id);
	put16(ip + 6, 0x4000); /* DF */
	ip[8] = 64;
	ip[9] = IPPROTO_UDP;
	put16(ip + 10, 0);
	put32(ip + 12, s->ip);
	put32(ip + 16, s->peer_ip);
	put16(ip + 10, inet_csum(ip, IP_HLEN, 0));
	put16(udp, sport);
	put16(udp + 2, dport);
	put16(udp + 4, (uint16_t)(UDP_HLEN + len));
	put16(udp + 6, 0); /* no checksum */
	memcpy(udp + UDP_HLEN, data, len);
	return net_send(s, ETH_HLEN + IP_HLEN + UDP_HLEN + len);
}

static void handle_arp(struct net_state *s, const uint8_t *a, size_t len)
{
	if (len < 28 || get16(a) != 1 || get16(a + 2) != ETH_P_IP || a[4] != 6 || a[5] != 4)
		return;
	uint16_t op = get16(a + 6);
	uint32_t sender_ip = get32(a + 14), target_ip = get32(a + 24);

	if (sender_ip == s->peer_ip && (op == 2 || target_ip == s->ip)) {
		memcpy(s->peer_mac, a + 8, 6);
		s->have_peer_mac = true;
	}
	if (op == 1 && target_ip == s->ip) {
		uint8_t mac[6];
		memcpy(mac, a + 8, 6);
		send_arp(s, 2, mac, mac, sender_ip);
	}
}

static bool send_tcp(struct net_state *s, uint8_t flags, const void *data, size_t len)
{
	uint8_t *ip = eth_start(s, s->peer_mac, ETH_P_IP);
	uint8_t *t = ip + IP_HLEN;
	uint32_t sum;

	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (uint16_t)(IP_HLEN + TCP_HLEN + len));
	put16(ip + 4, 0);
	put16(ip + 6, 0x4000);
	ip[8] = 64;
	ip[9] = IPPROTO_TCP;
	put16(ip + 10, 0);
	put32(ip + 12, s->ip);
	put32(ip + 16, s->peer_ip);
	put16(ip + 10, inet_csum(ip, IP_HLEN, 0));
	put16(t, s->tcp_lport);
	put16(t + 2, 80);
	put32(t + 4, s->snd_nxt);
	put32(t + 8, (flags & TCP_ACK) ? s->rcv_nxt : 0);
	t[12] = (TCP_HLEN / 4) << 4;
	t[13] = flags;
	put16(t + 14, 65535);
	put16(t + 16, 0);
	put16(t + 18, 0);
	memcpy(t + TCP_HLEN, data, len);
	/* pseudo header: addresses, protocol, TCP length */
	sum = (s->ip >> 16) + (s->ip & 0xffff) + (s->peer_ip >> 16) + (s->peer_ip & 0xffff) +
	      IPPROTO_TCP + (uint32_t)(TCP_HLEN + len);
	put16(t + 16, inet_csum(t, TCP_HLEN + len, sum));
	return net_send(s, ETH_HLEN + IP_HLEN + TCP_HLEN + len);
}

static void handle_tcp(struct net_state *s, const uint8_t *t, size_t len)
{
	if (len < TCP_HLEN || get16(t) != 80 || get16(t + 2) != s->tcp_lport)
		return;
	size_t off = (size_t)(t[12] >> 4) * 4;
	if (off < TCP_HLEN || off > len)
		return;
	uint8_t flags = t[13];
	uint32_t seq = get32(t + 4);
	const uint8_t *data = t + off;
	size_t dlen = len - off;

	if (flags & TCP_RST) {
		s->tcp_rst = true;
		return;
	}
	if (!s->tcp_open) {
		if ((flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK) &&
		    get32(t + 8) == s->snd_nxt + 1) {
			s->rcv_nxt = seq + 1;
			s->tcp_open = true;
		}
		return;
	}
	if (seq != s->rcv_nxt) {
		send_tcp(s, TCP_ACK, 0, 0);
		return;
	}
	if (dlen) {
		size_t room = HTTP_RESP_MAX - s->resp_len;
		memcpy(s->resp + s->resp_len, data, dlen < room ? dlen : room);
		s->resp_len += dlen < room ? dlen : room;
		s->rcv_nxt += (uint32_t)dlen;
	}
	if (flags & TCP_FIN) {
		s->rcv_nxt += 1;
		s->tcp_fin = true;
	}
	if (dlen || (flags & TCP_FIN))
		send_tcp(s, TCP_ACK, 0, 0);
}

static void handle_ip(struct net_state *s, const uint8_t *ip, size_t len)
{
	if (len < IP_HLEN || ip[0] >> 4 != 4)
		return;
	size_t ihl = (size_t)(ip[0] & 15) * 4;
	size_t tot = get16(ip + 2);
	if (ihl >= IP_HLEN && tot <= len && tot > ihl && ip[9] == IPPROTO_TCP &&
	    get32(ip + 16) == s->ip && get32(ip + 12) == s->peer_ip) {
		handle_tcp(s, ip + ihl, tot - ihl);
		return;
	}
	if (ihl < IP_HLEN || tot > len || tot < ihl + UDP_HLEN || ip[9] != IPPROTO_UDP ||
	    get32(ip + 16) != s->ip || (get16(ip + 6) & 0x3fff) != 0)
		return;
	const uint8_t *udp = ip + ihl;
	size_t ulen = get16(udp + 4);
	if (ulen < UDP_HLEN || ulen > tot - ihl || get16(udp + 2) != LOCAL_PORT ||
	    get16(udp) != ECHO_PORT || !s->want_payload)
		return;
	if (ulen - UDP_HLEN == s->want_len &&
	    memcmp(udp + UDP_HLEN, s->want_payload, s->want_len) == 0)
		s->got_payload = true;
}

static void handle_frame(struct net_state *s, const uint8_t *f, size_t len)
{
	if (len < ETH_HLEN)
		return;
	if (memcmp(f, s->mac, 6) != 0 && memcmp(f, bcast, 6) != 0)
		return;
	switch (get16(f + 12)) {
	case ETH_P_ARP:
		handle_arp(s, f + ETH_HLEN, len - ETH_HLEN);
		break;
	case ETH_P_IP:
		handle_ip(s, f + ETH_HLEN, len - ETH_HLEN);
		break;
	default:
		break;
	}
}

/* Handles received frames until *done or timeout_ms pass; returns *done. */
static bool net_poll(struct net_state *s, const bool *done, uint32_t timeout_ms)
{
	uint64_t deadline = timer_ms() + timeout_ms;
	struct virtq *rx = &s->dev.vq[RXQ];

	while (!*done) {
		uint32_t len;
		int head = virtq_get_used(rx, &len);
		if (head < 0) {
			if (timer_ms() >= deadline)
				return false;
			busy_delay(50);
			continue;
		}
		int i = rx_buf_of_head[head];
		if (len > NET_HDR_LEN && len <= NET_BUF_SIZE)
			handle_frame(s, rx_bufs[i] + NET_HDR_LEN, len - NET_HDR_LEN);
		post_rx(s, i);
		virtq_kick(&s->dev, rx);
	}
	return true;
}

static bool cmdline_ip(const struct bootinfo *bi, const char *key, const char *def, uint32_t *ip)
{
	char v[20];

	if (!cmdline_param(bi->cmdline, key, v, sizeof(v)))
		memcpy(v, def, strlen(def) + 1);
	if (!parse_ipv4(v, ip)) {
		guest_log("net bad %s %s", key, v);
		return false;
	}
	return true;
}

/* qmem: the device's own queue memory (2 pages), or NULL for the shared pages. */
static bool net_setup(struct net_state *s, const struct bootinfo *bi, uint8_t *qmem)
{
	char mac[18];

	memset(s, 0, sizeof(*s));
	if (!virtio_find(bi, VIRTIO_ID_NET, &s->dev)) {
		guest_log("net none");
		return false;
	}
	s->dev.qmem = qmem; /* after virtio_probe, which clears it */
	if (!cmdline_ip(bi, "ember.ip", "10.0.0.2", &s->ip) ||
	    !cmdline_ip(bi, "ember.peer", "10.0.0.1", &s->peer_ip))
		return false;
	if (!virtio_init(&s->dev, VIRTIO_NET_F_MAC, "net"))
		return false;
	if (s->dev.nqueues < 2) {
		guest_log("net init failed: %d queues", s->dev.nqueues);
		return false;
	}
	if (s->dev.driver_features & VIRTIO_NET_F_MAC) {
		for (int i = 0; i < 6; i++)
			s->mac[i] = virtio_cfg_read8(&s->dev, (uint32_t)i);
		fmt_mac(mac, s->mac);
		guest_log("net mac %s", mac);
	} else {
		static const uint8_t local[6] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x02 };
		memcpy(s->mac, local, 6);
		guest_log("net mac none");
	}
	for (int i = 0; i < NET_RX_BUFS; i++)
		post_rx(s, i);
	virtq_kick(&s->dev, &s->dev.vq[RXQ]);
	return true;
}

static bool net_resolve_peer(struct net_state *s, bool quiet)
{
	static const uint8_t zero[6];
	char mac[18];

	for (int t = 0; t < TRIES && !s->have_peer_mac; t++) {
		if (!send_arp(s, 1, bcast, zero, s->peer_ip))
			return false;
		net_poll(s, &s->have_peer_mac, WAIT_MS);
	}
	if (!s->have_peer_mac) {
		if (!quiet)
			guest_log("net timeout waiting for arp reply");
		return false;
	}
	fmt_mac(mac, s->peer_mac);
	if (!quiet)
		guest_log("net arp %s", mac);
	return true;
}

void mode_net(const struct bootinfo *bi)
{
	static struct net_state s;
	char payload[24];

	if (!net_setup(&s, bi, NULL))
		goto out;
	if (!net_resolve_peer(&s, false))
		goto out;
	for (int n = 1; n <= PINGS; n++) {
		memcpy(payload, "ember-ping ", 11);
		payload[11] = (char)('0' + n);
		s.want_payload = payload;
		s.want_len = 12;
		s.got_payload = false;
		for (int t = 0; t < TRIES && !s.got_payload; t++) {
			if (!send_udp(&s, LOCAL_PORT, ECHO_PORT, payload, 12, (uint16_t)(n * 16 + t)))
				goto out;
			net_poll(&s, &s.got_payload, WAIT_MS);
		}
		if (!s.got_payload) {
			guest_log("net timeout waiting for udp-echo %d", n);
			goto out;
		}
		guest_log("net udp-echo ok %d", n);
	}
out:
	if (s.dev.base)
		virtio_reset(&s.dev);
}

void mode_bench_net(const struct bootinfo *bi)
{
	static struct net_state s;
	static char payload[BENCH_PAYLOAD];
	uint64_t bytes = 0;

	if (!net_setup(&s, bi, NULL))
		goto out;
	if (!net_resolve_peer(&s, false))
		goto out;
	memset(payload, 'x', sizeof(payload));
	for (int i = 0; i < BENCH_FRAMES; i++) {
		if (!send_udp(&s, LOCAL_PORT, DISCARD_PORT, payload, sizeof(payload), (uint16_t)i))
			break;
		bytes += sizeof(payload);
	}
	guest_log("bench net bytes %llu", (unsigned long long)bytes);
out:
	if (s.dev.base)
		virtio_reset(&s.dev);
}

struct strbuf {
	char *p;
	size_t n, cap;
};

static void strbuf_put(char c, void *ctx)
{
	struct strbuf *b = ctx;

	if (b->n + 1 < b->cap)
		b->p[b->n++] = c;
}

/* snprintf: formats into out (truncated to cap - 1 characters). */
static void format(char *out, size_t cap, const char *fmt, ...)
{
	struct strbuf b = { out, 0, cap };
	va_list ap;

	va_start(ap, fmt);
	fmt_vprintf(strbuf_put, &b, fmt, ap);
	va_end(ap);
	out[b.n] = 0;
}

/*
 * One HTTP exchange over a new TCP connection to the peer's port 80:
 * connect, send `req`, read until the server's FIN, close. Returns the
 * status code (0 on failure) and points *body at the body.
 */
static int http_exchange(struct net_state *s, const char *req, const char **body)
{
	static uint8_t resp[HTTP_RESP_MAX + 1];
	static uint16_t next_port = 40000;

	s->tcp_lport = next_port++;
	s->snd_nxt = 0x1000u * s->tcp_lport;
	s->tcp_open = s->tcp_fin = s->tcp_rst = false;
	s->resp = resp;
	s->resp_len = 0;
	for (int t = 0; t < TRIES && !s->tcp_open; t++) {
		if (!send_tcp(s, TCP_SYN, 0, 0))
			return 0;
		net_poll(s, &s->tcp_open, WAIT_MS);
	}
	if (!s->tcp_open) {
		guest_log("mmds timeout waiting for syn-ack");
		return 0;
	}
	s->snd_nxt += 1;
	size_t n = strlen(req);
	if (!send_tcp(s, TCP_ACK | TCP_PSH, req, n))
		return 0;
	s->snd_nxt += (uint32_t)n;
	bool done = false;
	uint64_t deadline = timer_ms() + 5 * WAIT_MS;
	while (!s->tcp_fin && !s->tcp_rst && timer_ms() < deadline)
		net_poll(s, &done, 50);
	if (!s->tcp_fin) {
		guest_log("mmds timeout waiting for the answer (%u bytes)", (unsigned)s->resp_len);
		return 0;
	}
	send_tcp(s, TCP_FIN | TCP_ACK, 0, 0);
	s->snd_nxt += 1;
	resp[s->resp_len] = 0;
	/* "HTTP/1.1 200 OK\r\n...\r\n\r\nbody" */
	if (s->resp_len < 12 || memcmp(resp, "HTTP/1.1 ", 9) != 0)
		return 0;
	int status = (resp[9] - '0') * 100 + (resp[10] - '0') * 10 + (resp[11] - '0');
	*body = "";
	for (size_t i = 0; i + 3 < s->resp_len; i++) {
		if (memcmp(resp + i, "\r\n\r\n", 4) == 0) {
			*body = (const char *)resp + i + 4;
			break;
		}
	}
	return status;
}

static void log_body(const char *body)
{
	char line[128];
	size_t n = 0;

	for (const char *p = body;; p++) {
		if (*p == '\n' || *p == 0) {
			line[n] = 0;
			guest_log("mmds body %s", line);
			n = 0;
			if (*p == 0)
				break;
		} else if (n + 1 < sizeof(line)) {
			line[n++] = *p;
		}
	}
}

/*
 * The `mmds` mode: reaches the metadata service over virtio-net as a Linux
 * guest would (ARP for its address, TCP to port 80, HTTP). With
 * ember.mmds-v2=1 it first gets a session token (PUT /latest/api/token) and
 * shows that a GET without it is refused. ember.mmds-path names what to
 * read (default /latest/meta-data/); ember.mmds is the address.
 */
void mode_mmds(const struct bootinfo *bi)
{
	static struct net_state s;
	static char req[512];
	static char token[96];
	char path[128], v2[4];
	const char *body;
	int status;

	if (!net_setup(&s, bi, NULL))
		goto out;
	if (!cmdline_ip(bi, "ember.mmds", "169.254.169.254", &s.peer_ip))
		goto out;
	if (!cmdline_param(bi->cmdline, "ember.mmds-path", path, sizeof(path)))
		memcpy(path, "/latest/meta-data/", sizeof("/latest/meta-data/"));
	if (!net_resolve_peer(&s, false))
		goto out;
	token[0] = 0;
	if (cmdline_param(bi->cmdline, "ember.mmds-v2", v2, sizeof(v2)) && v2[0] == '1') {
		format(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n", path);
		status = http_exchange(&s, req, &body);
		guest_log("mmds without-token status %d", status);
		status = http_exchange(&s,
				       "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
				       "X-metadata-token-ttl-seconds: 60\r\n\r\n",
				       &body);
		guest_log("mmds token status %d len %u", status, (unsigned)strlen(body));
		if (status != 200 || strlen(body) >= sizeof(token))
			goto out;
		memcpy(token, body, strlen(body) + 1);
	}
	format(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: 169.254.169.254\r\n%s%s%s\r\n", path,
	       token[0] ? "X-metadata-token: " : "", token, token[0] ? "\r\n" : "");
	status = http_exchange(&s, req, &body);
	guest_log("mmds status %d", status);
	if (status)
		log_body(body);
out:
	if (s.dev.base)
		virtio_reset(&s.dev);
}

/*
 * The snap-io mode's interface (snapio.c): set up once with its own queue
 * memory; each round rereads the MAC (a snapshot load may have changed it:
 * the config generation moves), resolves the peer again (the TAP may be a
 * new one with another MAC) and exchanges one UDP echo.
 */
static struct net_state io_net;
static uint8_t io_net_qmem[2 * VIRTQ_PAGE] __attribute__((aligned(VIRTQ_PAGE)));

bool net_io_start(const struct bootinfo *bi)
{
	if (!net_setup(&io_net, bi, io_net_qmem))
		return false;
	/* the peer is resolved each round */
	return true;
}

bool net_io_round(uint64_t n, char *mac_out)
{
	static char payload[32];
	struct net_state *s = &io_net;
	uint32_t gen;

	if (s->dev.driver_features & VIRTIO_NET_F_MAC) {
		do {
			gen = vreg_read(&s->dev, VIRTIO_MMIO_CONFIG_GENERATION);
			for (int i = 0; i < 6; i++)
				s->mac[i] = virtio_cfg_read8(&s->dev, (uint32_t)i);
		} while (gen != vreg_read(&s->dev, VIRTIO_MMIO_CONFIG_GENERATION));
	}
	fmt_mac(mac_out, s->mac);
	s->have_peer_mac = false;
	if (!net_resolve_peer(s, true))
		return false;
	format(payload, sizeof(payload), "snap-io %llu", (unsigned long long)n);
	s->want_payload = payload;
	s->want_len = strlen(payload);
	s->got_payload = false;
	for (int t = 0; t < TRIES && !s->got_payload; t++) {
		if (!send_udp(s, LOCAL_PORT, ECHO_PORT, payload, s->want_len,
			      (uint16_t)(n * 8 + (uint64_t)t)))
			return false;
		net_poll(s, &s->got_payload, WAIT_MS);
	}
	s->want_payload = NULL;
	return s->got_payload;
}
