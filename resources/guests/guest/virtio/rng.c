/*
 * The `rng` mode: drives virtio-rng (device id 4, Firecracker's entropy
 * device). Two requests of 64 bytes each; logs how many bytes came back,
 * how many were nonzero and whether the two answers differ, then a request
 * with only a device-readable buffer (which must come back empty).
 */
#include "bootinfo.h"
#include "virtio.h"

#define RNG_TIMEOUT_MS 5000
#define RNG_LEN 64

static uint8_t rng_buf[2][RNG_LEN];

static int rng_request(struct virtio_dev *d, void *buf, uint32_t len, bool writable,
		       uint32_t *got)
{
	struct virtq *vq = &d->vq[0];
	struct vbuf b = { buf, len, writable };

	if (virtq_add(vq, &b, 1) < 0)
		return -1;
	virtq_kick(d, vq);
	return virtq_wait(d, vq, got, RNG_TIMEOUT_MS) < 0 ? -1 : 0;
}

void mode_rng(const struct bootinfo *bi)
{
	struct virtio_dev d;

	if (!virtio_find(bi, 4, &d)) {
		guest_log("rng none");
		return;
	}
	if (!virtio_init(&d, 0, "rng"))
		return;
	for (int i = 0; i < 2; i++) {
		uint32_t got = 0;
		memset(rng_buf[i], 0, RNG_LEN);
		if (rng_request(&d, rng_buf[i], RNG_LEN, true, &got) < 0) {
			guest_log("rng timeout");
			return;
		}
		int nonzero = 0;
		for (int j = 0; j < RNG_LEN; j++)
			nonzero += rng_buf[i][j] != 0;
		guest_log("rng got %u nonzero %d", got, nonzero);
	}
	guest_log("rng differ %s", memcmp(rng_buf[0], rng_buf[1], RNG_LEN) ? "yes" : "no");
	uint32_t got = 99;
	if (rng_request(&d, rng_buf[0], RNG_LEN, false, &got) < 0) {
		guest_log("rng timeout");
		return;
	}
	guest_log("rng readonly-got %u", got);
}
