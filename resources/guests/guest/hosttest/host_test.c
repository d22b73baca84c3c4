/*
 * Host-side unit tests of the guest's pure helpers (virtio/parse.c,
 * cmdline_param and the pod-agent JSON scanner podjson.c), built by
 * build.rs with the host compiler and -DHOST_TEST and run by a Rust
 * #[test]. Prints "ok <n>" and exits 0 when all pass.
 */
#include <stdio.h>
#include <string.h>

#include "podjson.h"
#include "virtio.h"

static int failures, checks;

#define CHECK(cond)                                                                   \
	do {                                                                          \
		checks++;                                                             \
		if (!(cond)) {                                                        \
			failures++;                                                   \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, \
				#cond);                                               \
		}                                                                     \
	} while (0)

static bool dev(const char *s, uint64_t size, uint64_t base, uint32_t irq)
{
	struct virtio_mmio_info i;

	return virtio_parse_device_arg(s, strlen(s), &i) && i.size == size && i.base == base &&
	       i.irq == irq;
}

static bool bad_dev(const char *s)
{
	struct virtio_mmio_info i;

	return !virtio_parse_device_arg(s, strlen(s), &i);
}

static void test_memparse(void)
{
	uint64_t v;

	CHECK(memparse("4K", 2, &v) && v == 4096);
	CHECK(memparse("4k", 2, &v) && v == 4096);
	CHECK(memparse("0x1000", 6, &v) && v == 4096);
	CHECK(memparse("4096", 4, &v) && v == 4096);
	CHECK(memparse("2M", 2, &v) && v == 2u << 20);
	CHECK(memparse("1G", 2, &v) && v == 1u << 30);
	CHECK(memparse("0xd0000000", 10, &v) && v == 0xd0000000u);
	CHECK(!memparse("", 0, &v));
	CHECK(!memparse("0x", 2, &v));
	CHECK(!memparse("4KB", 3, &v));
	CHECK(!memparse("4X", 2, &v));
	CHECK(!memparse("99999999999999999999", 20, &v));
	CHECK(!memparse("0xffffffffffffffffK", 19, &v));
}

static void test_device_arg(void)
{
	CHECK(dev("4K@0xd0000000:5", 4096, 0xd0000000u, 5));
	CHECK(dev("0x1000@0xd0001000:6", 4096, 0xd0001000u, 6));
	CHECK(dev("4096@0xd0002000:7:2", 4096, 0xd0002000u, 7));
	CHECK(dev("4k@0xD000F000:20", 4096, 0xd000f000u, 20));
	CHECK(bad_dev(""));
	CHECK(bad_dev("4K"));
	CHECK(bad_dev("4K@"));
	CHECK(bad_dev("4K@0xd0000000"));
	CHECK(bad_dev("4K@0xd0000000:"));
	CHECK(bad_dev("4K@0xd0000000:x"));
	CHECK(bad_dev("4K@0xd0000000:5:"));
	CHECK(bad_dev("4K@0xd0000000:5x"));
	CHECK(bad_dev("0@0xd0000000:5"));
	CHECK(bad_dev("4K@zz:5"));
	CHECK(bad_dev("4K@0xd0000000:99999999999"));
}

static void test_cmdline(void)
{
	struct virtio_mmio_info i[4];
	const char *cl = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 ember.test=blk "
			 "virtio_mmio.device=bogus virtio_mmio.device=0x1000@0xd0001000:6\n"
			 "xvirtio_mmio.device=4K@0xd0005000:9 virtio_mmio.device=4K@0xd0002000:7";

	CHECK(virtio_parse_cmdline(cl, i, 4) == 3);
	CHECK(i[0].base == 0xd0000000u && i[0].irq == 5 && i[0].size == 4096);
	CHECK(i[1].base == 0xd0001000u && i[1].irq == 6);
	CHECK(i[2].base == 0xd0002000u && i[2].irq == 7);
	CHECK(virtio_parse_cmdline(cl, i, 2) == 2);
	CHECK(virtio_parse_cmdline("", i, 4) == 0);
	CHECK(virtio_parse_cmdline("   ", i, 4) == 0);
	CHECK(virtio_parse_cmdline("virtio_mmio.device=", i, 4) == 0);

	char v[16];
	CHECK(cmdline_param("a=1 ember.vsock_port=52 b", "ember.vsock_port", v, sizeof(v)) &&
	      strcmp(v, "52") == 0);
	CHECK(!cmdline_param("ember.vsock_portx=1", "ember.vsock_port", v, sizeof(v)));
}

static void test_numbers(void)
{
	uint32_t x;

	CHECK(parse_u32("52", &x) && x == 52);
	CHECK(parse_u32("0x10", &x) && x == 16);
	CHECK(parse_u32("4294967295", &x) && x == 0xffffffffu);
	CHECK(!parse_u32("4294967296", &x));
	CHECK(!parse_u32("", &x));
	CHECK(!parse_u32("12a", &x));

	CHECK(parse_ipv4("10.0.0.2", &x) && x == 0x0a000002u);
	CHECK(parse_ipv4("255.255.255.255", &x) && x == 0xffffffffu);
	CHECK(parse_ipv4("192.168.100.1", &x) && x == 0xc0a86401u);
	CHECK(!parse_ipv4("10.0.0", &x));
	CHECK(!parse_ipv4("10.0.0.256", &x));
	CHECK(!parse_ipv4("10.0.0.2.", &x));
	CHECK(!parse_ipv4("10..0.2", &x));
	CHECK(!parse_ipv4("a.b.c.d", &x));
	CHECK(!parse_ipv4("", &x));
}

static void test_checksums(void)
{
	/* The classic example header (checksum field 0): 0xb861. */
	static const uint8_t ip[20] = { 0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11,
					0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7 };
	uint8_t with[20];

	CHECK(inet_csum(ip, sizeof(ip), 0) == 0xb861);
	memcpy(with, ip, sizeof(with));
	with[10] = 0xb8;
	with[11] = 0x61;
	CHECK(inet_csum(with, sizeof(with), 0) == 0); /* verifies */
	static const uint8_t odd[3] = { 0x01, 0x02, 0x03 };
	CHECK(inet_csum(odd, 3, 0) == (uint16_t)~(0x0102 + 0x0300));

	CHECK(fnv1a32((const uint8_t *)"", 0) == 0x811c9dc5u);
	CHECK(fnv1a32((const uint8_t *)"a", 1) == 0xe40c292cu);
	CHECK(fnv1a32((const uint8_t *)"foobar", 6) == 0xbf9cf968u);
	/* the word loop and the byte tail agree */
	static uint8_t buf[4096];
	uint32_t h = 0x811c9dc5u;
	for (size_t i = 0; i < sizeof(buf); i++) {
		buf[i] = (uint8_t)(i * 13 + 7);
		h = (h ^ buf[i]) * 0x01000193u;
	}
	CHECK(fnv1a32(buf, sizeof(buf)) == h);
}

#define JGET(o, k, v) json_get(o, strlen(o), k, v)
#define JIDX(a, i, v) json_index(a, strlen(a), i, v)

/* json_get + json_string on text; "" when absent or not a plain string. */
static const char *jget(const char *obj, const char *key)
{
	static char out[64];
	struct json_span v;

	if (!json_get(obj, strlen(obj), key, &v) || !json_string(v, out, sizeof(out)))
		return "";
	return out;
}

static void test_json(void)
{
	const char *req = " {\"id\":\"c1\",\"rootfs\":{\"type\":\"block_device\","
			  "\"path\":\"/dev/vdb\",\"fstype\":\"ext4\",\"readonly\":false},"
			  "\"cmd\":[\"/bin/sh\"],\"env\":[[\"path\",\"id\"],"
			  "[\"EMBER_STUB_EXIT\",\"3\"]],\"workdir\":\"/\"}\n";
	struct json_span v, rootfs, env, pair;
	uint32_t x;
	char s[16];

	CHECK(strcmp(jget(req, "id"), "c1") == 0);
	CHECK(strcmp(jget(req, "workdir"), "/") == 0);
	/* "path" exists only inside rootfs (and as a string in env) */
	CHECK(!json_get(req, strlen(req), "path", &v));
	CHECK(json_get(req, strlen(req), "rootfs", &rootfs) && rootfs.p[0] == '{' &&
	      rootfs.p[rootfs.len - 1] == '}');
	CHECK(json_get(rootfs.p, rootfs.len, "path", &v) && json_string(v, s, sizeof(s)) &&
	      strcmp(s, "/dev/vdb") == 0);
	CHECK(json_get(rootfs.p, rootfs.len, "readonly", &v) && v.len == 5 &&
	      memcmp(v.p, "false", 5) == 0);
	CHECK(json_get(req, strlen(req), "env", &env));
	CHECK(json_index(env.p, env.len, 1, &pair) && json_index(pair.p, pair.len, 1, &v) &&
	      json_string(v, s, sizeof(s)) && strcmp(s, "3") == 0);
	CHECK(!json_index(env.p, env.len, 2, &pair));
	CHECK(JIDX("[ ]", 0, &v) == false);
	CHECK(JIDX("[1, {\"a\":[2]} ,3]", 2, &v) && v.len == 1 && v.p[0] == '3');

	/* numbers */
	CHECK(JGET("{\"signal\": 15 }", "signal", &v) && json_uint(v, &x) && x == 15);
	CHECK(JGET("{\"n\":-1}", "n", &v) && !json_uint(v, &x));
	CHECK(JGET("{\"n\":4294967296}", "n", &v) && !json_uint(v, &x));
	CHECK(JGET("{\"n\":\"7\"}", "n", &v) && !json_uint(v, &x));

	/* strings: escapes refused, size enforced, keys inside strings ignored */
	CHECK(strcmp(jget("{\"id\":\"a\\\"b\"}", "id"), "") == 0);
	CHECK(strcmp(jget("{\"x\":\"\\\"id\\\":1\",\"id\":\"ok\"}", "id"), "ok") == 0);
	CHECK(JGET("{\"id\":\"abcdefghijklmnop\"}", "id", &v) && !json_string(v, s, 16));
	CHECK(JGET("{\"id\":\"abcdefghijklmno\"}", "id", &v) && json_string(v, s, 16));
	CHECK(JGET("{\"id\":7}", "id", &v) && !json_string(v, s, sizeof(s)));

	/* malformed or not an object */
	CHECK(!JGET("", "id", &v));
	CHECK(!JGET("{}", "id", &v));
	CHECK(!JGET("[\"id\"]", "id", &v));
	CHECK(!JGET("{\"id\":\"c1\"", "id", &v));
	CHECK(!JGET("{\"id\":\"c1\"}}", "id", &v));
	CHECK(!JGET("{\"id\" \"c1\"}", "id", &v));
	CHECK(!JGET("{\"id\":\"c1\",}", "id", &v));
	CHECK(!JGET("{\"id\":}", "id", &v));
	CHECK(!JGET("{id:1}", "id", &v));
	CHECK(JGET("{\"a\":[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]}", "a", &v)); /* depth 16 */
	CHECK(!JGET("{\"a\":[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}", "a", &v));
}

int main(void)
{
	test_memparse();
	test_device_arg();
	test_cmdline();
	test_numbers();
	test_checksums();
	test_json();
	if (failures) {
		fprintf(stderr, "%d of %d checks failed\n", failures, checks);
		return 1;
	}
	printf("ok %d\n", checks);
	return 0;
}
