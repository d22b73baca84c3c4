/*
 * virtio-net (device id 1): the `net` and `bench-net` test modes, with just
 * enough ARP, IPv4 and UDP. Queues: 0 = receive, 1 = transmit. Every buffer
 * starts with the 12-byte struct virtio_net_hdr_v1 (zeros on transmit).
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

static void handle_ip(struct net_state *s, const uint8_t *ip, size_t len)
{
	if (len < IP_HLEN || ip[0] >> 4 != 4)
		return;
	size_t ihl = (size_t)(ip[0] & 15) * 4;
	size_t tot = get16(ip + 2);
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

static bool net_setup(struct net_state *s, const struct bootinfo *bi)
{
	char mac[18];

	memset(s, 0, sizeof(*s));
	if (!virtio_find(bi, VIRTIO_ID_NET, &s->dev)) {
		guest_log("net none");
		return false;
	}
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

static bool net_resolve_peer(struct net_state *s)
{
	static const uint8_t zero[6];
	char mac[18];

	for (int t = 0; t < TRIES && !s->have_peer_mac; t++) {
		if (!send_arp(s, 1, bcast, zero, s->peer_ip))
			return false;
		net_poll(s, &s->have_peer_mac, WAIT_MS);
	}
	if (!s->have_peer_mac) {
		guest_log("net timeout waiting for arp reply");
		return false;
	}
	fmt_mac(mac, s->peer_mac);
	guest_log("net arp %s", mac);
	return true;
}

void mode_net(const struct bootinfo *bi)
{
	static struct net_state s;
	char payload[24];

	if (!net_setup(&s, bi))
		goto out;
	if (!net_resolve_peer(&s))
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

	if (!net_setup(&s, bi))
		goto out;
	if (!net_resolve_peer(&s))
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
