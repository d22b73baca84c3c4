/*
 * The `balloon` mode: drives virtio-balloon (device id 5). It reads the
 * target (num_pages), fills that many pages (at most BALLOON_MAX) with a
 * pattern, hands their frame numbers to the device on the inflate queue,
 * writes `actual`, and checks that the pages now read back as zeros (the
 * host gave their memory back). With the stats queue it posts one
 * statistics buffer. Then it polls the config space until the target drops
 * to 0 (a host PATCH /balloon), deflates and writes `actual` = 0.
 */
#include "bootinfo.h"
#include "virtio.h"

#define BALLOON_PAGE 4096
#define BALLOON_MAX 256
#define BALLOON_TIMEOUT_MS 5000
#define BALLOON_WAIT_MS 60000
#define F_STATS_VQ (1ull << 1)
#define F_DEFLATE_ON_OOM (1ull << 2)

static uint8_t pages[BALLOON_MAX][BALLOON_PAGE] __attribute__((aligned(BALLOON_PAGE)));
static uint32_t pfns[BALLOON_MAX];

struct __attribute__((packed)) stat {
	uint16_t tag;
	uint64_t val;
};
static struct stat stats[3];

static int send(struct virtio_dev *d, int q, const void *buf, uint32_t len)
{
	struct virtq *vq = &d->vq[q];
	struct vbuf b = { buf, len, false };
	uint32_t got;

	if (virtq_add(vq, &b, 1) < 0)
		return -1;
	virtq_kick(d, vq);
	return virtq_wait(d, vq, &got, BALLOON_TIMEOUT_MS) < 0 ? -1 : 0;
}

static void set_actual(struct virtio_dev *d, uint32_t n)
{
	vreg_write(d, VIRTIO_MMIO_CONFIG + 4, n);
}

void mode_balloon(const struct bootinfo *bi)
{
	struct virtio_dev d;

	if (!virtio_find(bi, 5, &d)) {
		guest_log("balloon none");
		return;
	}
	if (!virtio_init(&d, F_STATS_VQ | F_DEFLATE_ON_OOM, "balloon"))
		return;
	guest_log("balloon features stats %s deflate-on-oom %s",
		  (d.driver_features & F_STATS_VQ) ? "yes" : "no",
		  (d.driver_features & F_DEFLATE_ON_OOM) ? "yes" : "no");
	uint32_t target = virtio_cfg_read32(&d, 0);
	uint32_t n = target < BALLOON_MAX ? target : BALLOON_MAX;
	guest_log("balloon target %u", target);
	for (uint32_t i = 0; i < n; i++) {
		memset(pages[i], 0x5a, BALLOON_PAGE);
		pfns[i] = (uint32_t)(virt_to_phys(pages[i]) / BALLOON_PAGE);
	}
	if (n && send(&d, 0, pfns, n * 4) < 0) {
		guest_log("balloon inflate timeout");
		return;
	}
	set_actual(&d, n);
	uint32_t zeroed = 0;
	for (uint32_t i = 0; i < n; i++) {
		bool zero = true;
		for (uint32_t j = 0; j < BALLOON_PAGE; j += 512)
			zero = zero && pages[i][j] == 0;
		zeroed += zero;
	}
	guest_log("balloon inflated %u zeroed %u", n, zeroed);

	if (d.driver_features & F_STATS_VQ) {
		stats[0] = (struct stat){ 4, 12345678 };  /* MEMFREE */
		stats[1] = (struct stat){ 5, 134217728 }; /* MEMTOT */
		stats[2] = (struct stat){ 2, 42 };        /* MAJFLT */
		struct vbuf b = { stats, sizeof(stats), false };
		if (virtq_add(&d.vq[2], &b, 1) < 0) {
			guest_log("balloon stats queue full");
			return;
		}
		virtq_kick(&d, &d.vq[2]);
		guest_log("balloon stats posted");
	}

	uint64_t start = timer_ms();
	while (virtio_cfg_read32(&d, 0) != 0) {
		if (timer_ms() - start > BALLOON_WAIT_MS) {
			guest_log("balloon no deflate request");
			return;
		}
		busy_delay(2000);
	}
	if (n && send(&d, 1, pfns, n * 4) < 0) {
		guest_log("balloon deflate timeout");
		return;
	}
	set_actual(&d, 0);
	guest_log("balloon deflated %u", n);
}
