/*
 * virtio-blk (device id 2): the `blk` and `bench-blk` test modes. The
 * request path itself is in blkdev.c.
 */
#include "bootinfo.h"
#include "virtio.h"

#define BLK_READ_SECTORS 8
#define BLK_WRITE_SECTOR 8
#define BLK_WRITE_SECTORS 8
#define BLK_ID_LEN 20
#define BENCH_BLK_BYTES (1024 * 1024)

static uint8_t blk_buf[4096] __attribute__((aligned(4096)));
static uint8_t blk_buf2[4096] __attribute__((aligned(4096)));

static void log_status(const char *what, int st)
{
	if (st == BLK_STATUS_TIMEOUT)
		guest_log("blk %s status timeout", what);
	else if (st == BLK_STATUS_NONE)
		guest_log("blk %s status none", what);
	else
		guest_log("blk %s status %d", what, st);
}

static void blk_print_id(struct virtio_dev *d)
{
	char id[BLK_ID_LEN + 1];

	memset(blk_buf, 0, BLK_ID_LEN);
	int st = blk_request(d, VIRTIO_BLK_T_GET_ID, 0, blk_buf, BLK_ID_LEN, true, NULL);
	if (st != 0) {
		log_status("id", st);
		return;
	}
	size_t n = 0;
	for (; n < BLK_ID_LEN && blk_buf[n]; n++) {
		uint8_t c = blk_buf[n];
		id[n] = (char)(c > ' ' && c < 0x7f ? c : '?');
	}
	id[n] = '\0';
	guest_log("blk id %s", id);
}

static void fill_pattern(uint8_t *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		p[i] = (uint8_t)(i * 13 + 7);
}

static void blk_write_test(struct virtio_dev *d, uint64_t capacity, bool ro)
{
	const uint32_t len = BLK_WRITE_SECTORS * BLK_SECTOR;

	if (!ro && capacity < BLK_WRITE_SECTOR + BLK_WRITE_SECTORS) {
		guest_log("blk write skipped capacity %llu", (unsigned long long)capacity);
		return;
	}
	fill_pattern(blk_buf2, len);
	int st = blk_request(d, VIRTIO_BLK_T_OUT, BLK_WRITE_SECTOR, blk_buf2, len, false, NULL);
	if (ro || st != 0) {
		log_status("write", st);
		return;
	}
	if (d->driver_features & VIRTIO_BLK_F_FLUSH)
		log_status("flush", blk_request(d, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, false, NULL));
	memset(blk_buf, 0, len);
	st = blk_request(d, VIRTIO_BLK_T_IN, BLK_WRITE_SECTOR, blk_buf, len, true, NULL);
	if (st != 0) {
		log_status("write read-back", st);
		return;
	}
	for (uint32_t i = 0; i < len; i++) {
		if (blk_buf[i] != blk_buf2[i]) {
			guest_log("blk write mismatch at %u", i);
			return;
		}
	}
	guest_log("blk write ok");
}

void mode_blk(const struct bootinfo *bi)
{
	struct virtio_dev dev;
	char v[8];

	if (!virtio_find(bi, VIRTIO_ID_BLOCK, &dev)) {
		guest_log("blk none");
		return;
	}
	if (!blk_init(&dev))
		return;
	uint64_t capacity = virtio_cfg_read64(&dev, 0);
	bool ro = (dev.driver_features & VIRTIO_BLK_F_RO) != 0;
	guest_log("blk capacity %llu ro %d", (unsigned long long)capacity, ro ? 1 : 0);
	blk_print_id(&dev);

	uint64_t n = capacity < BLK_READ_SECTORS ? capacity : BLK_READ_SECTORS;
	if (n) {
		int st = blk_request(&dev, VIRTIO_BLK_T_IN, 0, blk_buf, (uint32_t)n * BLK_SECTOR,
				     true, NULL);
		if (st == 0)
			guest_log("blk read fnv1a 0x%08x", fnv1a32(blk_buf, n * BLK_SECTOR));
		else
			log_status("read", st);

		st = blk_request(&dev, VIRTIO_BLK_T_IN, capacity - 1, blk_buf, BLK_SECTOR, true,
				 NULL);
		if (st == 0)
			guest_log("blk last-sector fnv1a 0x%08x", fnv1a32(blk_buf, BLK_SECTOR));
		else
			log_status("last-sector", st);
	}
	log_status("beyond-end",
		   blk_request(&dev, VIRTIO_BLK_T_IN, capacity, blk_buf, BLK_SECTOR, true, NULL));

	if (cmdline_param(bi->cmdline, "ember.blk_write", v, sizeof(v)) && strcmp(v, "1") == 0)
		blk_write_test(&dev, capacity, ro);
	virtio_reset(&dev);
}

void mode_bench_blk(const struct bootinfo *bi)
{
	struct virtio_dev dev;
	uint64_t bytes = 0;

	if (!virtio_find(bi, VIRTIO_ID_BLOCK, &dev)) {
		guest_log("blk none");
		return;
	}
	if (!blk_init(&dev))
		return;
	uint64_t capacity = virtio_cfg_read64(&dev, 0);
	uint64_t chunks = capacity / 8;
	if (!chunks) {
		guest_log("bench blk capacity %llu too small", (unsigned long long)capacity);
		return;
	}
	for (uint64_t i = 0; bytes < BENCH_BLK_BYTES; i++) {
		int st = blk_request(&dev, VIRTIO_BLK_T_IN, (i % chunks) * 8, blk_buf,
				     sizeof(blk_buf), true, NULL);
		if (st != 0) {
			log_status("bench read", st);
			break;
		}
		bytes += sizeof(blk_buf);
	}
	guest_log("bench blk bytes %llu", (unsigned long long)bytes);
	virtio_reset(&dev);
}
