/*
 * Hostile-guest modes against the first virtio-blk device: malformed
 * descriptor chains and queue setups. Each attack is followed by a short
 * look at the used ring, then the device is reset, re-initialised and one
 * normal read shows it still works. The VMM must survive all of it.
 */
#include "bootinfo.h"
#include "virtio.h"

#define EVIL_POLL_MS 1000
#define OOB_ADDR 0xfff00000ull
#define WRAP_ADDR 0xfffffffffffff000ull
#define STATUS_UNSET 0xff

static struct virtio_dev dev;
static struct virtio_blk_req_hdr ehdr;
static volatile uint8_t estatus;
static uint8_t ebuf[4096] __attribute__((aligned(4096)));

static bool evil_start(const struct bootinfo *bi)
{
	if (!virtio_find(bi, VIRTIO_ID_BLOCK, &dev)) {
		guest_log("evil no block device");
		return false;
	}
	return blk_init(&dev);
}

static void set_desc(struct virtq *vq, uint16_t i, uint64_t addr, uint32_t len, uint16_t flags,
		     uint16_t next)
{
	vq->desc[i].addr = addr;
	vq->desc[i].len = len;
	vq->desc[i].flags = flags;
	vq->desc[i].next = next;
}

/* Header (IN, sector 0) at desc i; status byte reset. */
static void set_hdr(struct virtq *vq, uint16_t i, uint16_t next)
{
	ehdr.type = VIRTIO_BLK_T_IN;
	ehdr.reserved = 0;
	ehdr.sector = 0;
	estatus = STATUS_UNSET;
	set_desc(vq, i, virt_to_phys(&ehdr), sizeof(ehdr), VIRTQ_DESC_F_NEXT, next);
}

static void set_status_desc(struct virtq *vq, uint16_t i)
{
	set_desc(vq, i, virt_to_phys(&estatus), 1, VIRTQ_DESC_F_WRITE, 0);
}

/* Publishes head (bypassing the allocator) with avail idx += 1 + extra. */
static void raw_publish(struct virtq *vq, uint16_t head, uint16_t extra)
{
	uint16_t idx = vq->avail->idx;

	vq->avail->ring[idx & (vq->size - 1)] = head;
	virtio_mb();
	vq->avail->idx = (uint16_t)(idx + 1 + extra);
	virtq_kick(&dev, vq);
}

/* Prints "evil <name> sent" and what the device put in the used ring. */
static void evil_report(const char *name)
{
	struct virtq *vq = &dev.vq[0];
	uint64_t deadline;

	guest_log("evil %s sent", name);
	deadline = timer_ms() + EVIL_POLL_MS;
	while (vq->size && vq->used->idx == vq->last_used && timer_ms() < deadline)
		busy_delay(50);
	if (!vq->size || vq->used->idx == vq->last_used) {
		guest_log("evil %s used-len none status none", name);
		return;
	}
	virtio_mb();
	uint32_t len = vq->used->ring[vq->last_used & (vq->size - 1)].len;
	vq->last_used = vq->used->idx;
	uint8_t st = estatus;
	if (st == STATUS_UNSET)
		guest_log("evil %s used-len %u status none", name, len);
	else
		guest_log("evil %s used-len %u status %u", name, len, st);
}

static void evil_recover(void)
{
	guest_log("evil device status 0x%x", vreg_read(&dev, VIRTIO_MMIO_STATUS));
	if (!blk_init(&dev)) {
		guest_log("evil recover failed");
		return;
	}
	int st = blk_request(&dev, VIRTIO_BLK_T_IN, 0, ebuf, sizeof(ebuf), true, NULL);
	if (st == 0)
		guest_log("evil recovered fnv1a 0x%08x", fnv1a32(ebuf, sizeof(ebuf)));
	else
		guest_log("evil recover read status %d", st);
	virtio_reset(&dev);
}

void mode_evil_desc_oob(const struct bootinfo *bi)
{
	if (!evil_start(bi))
		return;
	struct virtq *vq = &dev.vq[0];

	/* Data buffer entirely outside guest RAM. */
	set_hdr(vq, 0, 1);
	set_desc(vq, 1, OOB_ADDR, 4096, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
	set_status_desc(vq, 2);
	raw_publish(vq, 0, 0);
	evil_report("desc-oob");

	/* Address + length wraps around the 64-bit address space. */
	set_hdr(vq, 3, 4);
	set_desc(vq, 4, WRAP_ADDR, 0x2000, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 5);
	set_status_desc(vq, 5);
	raw_publish(vq, 3, 0);
	evil_report("desc-wrap");
	evil_recover();
}

void mode_evil_desc_loop(const struct bootinfo *bi)
{
	if (!evil_start(bi))
		return;
	struct virtq *vq = &dev.vq[0];

	/* 0 -> 1 -> 2 -> 0 -> ... */
	set_hdr(vq, 0, 1);
	set_desc(vq, 1, virt_to_phys(ebuf), 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
	set_desc(vq, 2, virt_to_phys(&estatus), 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0);
	raw_publish(vq, 0, 0);
	evil_report("desc-loop");
	evil_recover();
}

void mode_evil_len(const struct bootinfo *bi)
{
	if (!evil_start(bi))
		return;
	struct virtq *vq = &dev.vq[0];

	set_hdr(vq, 0, 1);
	set_desc(vq, 1, virt_to_phys(ebuf), 0xffffffffu, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
	set_status_desc(vq, 2);
	raw_publish(vq, 0, 0);
	evil_report("len");
	evil_recover();
}

/* Queue 0 set up with QueueNum = num (then QueueReady=1 and DRIVER_OK). */
static void bad_queue_num(uint32_t num)
{
	if (!virtio_begin(&dev, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH)) {
		guest_log("evil queue-size init failed status 0x%x",
			  vreg_read(&dev, VIRTIO_MMIO_STATUS));
		return;
	}
	virtq_setup(&dev, 0, VIRTQ_DEFAULT_SIZE);
	vreg_write(&dev, VIRTIO_MMIO_QUEUE_SEL, 0);
	vreg_write(&dev, VIRTIO_MMIO_QUEUE_READY, 0);
	vreg_write(&dev, VIRTIO_MMIO_QUEUE_NUM, num);
	vreg_write(&dev, VIRTIO_MMIO_QUEUE_READY, 1);
	uint32_t ready = vreg_read(&dev, VIRTIO_MMIO_QUEUE_READY);
	vreg_write(&dev, VIRTIO_MMIO_STATUS, vreg_read(&dev, VIRTIO_MMIO_STATUS) |
						     VIRTIO_STATUS_DRIVER_OK);
	guest_log("evil queue-num %u", num);
	guest_log("evil status 0x%x ready %u", vreg_read(&dev, VIRTIO_MMIO_STATUS), ready);
}

void mode_evil_queue_size(const struct bootinfo *bi)
{
	if (!virtio_find(bi, VIRTIO_ID_BLOCK, &dev)) {
		guest_log("evil no block device");
		return;
	}
	virtio_reset(&dev);
	vreg_write(&dev, VIRTIO_MMIO_QUEUE_SEL, 0);
	uint32_t max = vreg_read(&dev, VIRTIO_MMIO_QUEUE_NUM_MAX);

	/* Not a power of two. */
	bad_queue_num(3);
	/* Larger than QueueNumMax (max * 2, or more than 16 bits). */
	bad_queue_num(max ? max * 2 : 0x10000);

	/* Use the queue anyway, as if it had 16 entries. */
	struct virtq *vq = &dev.vq[0];
	if (vq->size) {
		set_hdr(vq, 0, 1);
		set_desc(vq, 1, virt_to_phys(ebuf), 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
		set_status_desc(vq, 2);
		raw_publish(vq, 0, 0);
	}
	evil_report("queue-size");
	evil_recover();
}

void mode_evil_avail_idx(const struct bootinfo *bi)
{
	if (!evil_start(bi))
		return;
	struct virtq *vq = &dev.vq[0];

	/* One well-formed request, but avail idx claims ~1000 new entries. */
	set_hdr(vq, 0, 1);
	set_desc(vq, 1, virt_to_phys(ebuf), 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
	set_status_desc(vq, 2);
	raw_publish(vq, 0, 999);
	evil_report("avail-idx");
	evil_recover();
}
