/*
 * Flood modes: a guest that keeps a device's whole 256-entry queue busy
 * with the largest work the device accepts, for a bounded number of
 * rounds, then holds (halts with the device still set up) so the host can
 * look at the VMM.
 *
 * - `evil-net-flood`: the tx ring kept full of maximum-size frames (one
 *   descriptor, or header and body split), frames one byte over the limit,
 *   runts and a tx chain whose body is device-writable; the rx queue is set
 *   up and never given a buffer, so whatever the host sends has nowhere to
 *   go.
 * - `evil-blk-flood`: 256 requests at once, each seg_max segments of
 *   size_max bytes (8 MiB with ember's limits) in an indirect table (which
 *   the device was never asked for), alternately reads and writes, all
 *   segments over one 64 KiB buffer; then two requests just over the
 *   limits, which must fail with IOERR.
 *
 * Queues here are 256 entries (the shared driver core stops at 64), laid
 * out in three pages of our own. Loops stay small: the guest CPU may be
 * emulated.
 */
#include "bootinfo.h"
#include "virtio.h"

#define BIG_QUEUE 256
#define BIG_QUEUE_BYTES (3 * VIRTQ_PAGE)
#define VIRTQ_DESC_F_INDIRECT 4
#define FLOOD_WAIT_MS 60000

#define VIRTIO_NET_F_MAC (1ull << 5)
#define NET_HDR_LEN 12
/* ember's limit: vnet header + 64 KiB + Ethernet header */
#define NET_MAX_FRAME (NET_HDR_LEN + 65550)
#define NET_SLOT_DESCS 2
#define NET_SLOTS (BIG_QUEUE / NET_SLOT_DESCS)

#define VIRTIO_BLK_F_SIZE_MAX (1ull << 1)
#define VIRTIO_BLK_F_SEG_MAX (1ull << 2)
#define BLK_BUF (64 * 1024)
#define BLK_SEG_LIMIT (BIG_QUEUE - 2)

static struct virtio_dev fdev;
static uint8_t qmem[2][BIG_QUEUE_BYTES] __attribute__((aligned(4096)));

/* Three pages: descriptors, avail ring, used ring. */
struct big_queue {
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	uint16_t last_used;
};

static struct big_queue bq[2];

static uint32_t cmdline_u32(const struct bootinfo *bi, const char *key, uint32_t def)
{
	char v[16];
	uint32_t x;

	if (cmdline_param(bi->cmdline, key, v, sizeof(v)) && parse_u32(v, &x))
		return x;
	return def;
}

static bool big_queue_setup(uint16_t q)
{
	uint8_t *m = qmem[q];
	struct big_queue *b = &bq[q];
	uint64_t a;

	vreg_write(&fdev, VIRTIO_MMIO_QUEUE_SEL, q);
	if (vreg_read(&fdev, VIRTIO_MMIO_QUEUE_NUM_MAX) < BIG_QUEUE)
		return false;
	memset(m, 0, BIG_QUEUE_BYTES);
	b->desc = (volatile struct virtq_desc *)m;
	b->avail = (volatile struct virtq_avail *)(m + VIRTQ_PAGE);
	b->used = (volatile struct virtq_used *)(m + 2 * VIRTQ_PAGE);
	b->last_used = 0;
	vreg_write(&fdev, VIRTIO_MMIO_QUEUE_NUM, BIG_QUEUE);
	a = virt_to_phys(b->desc);
	vreg_write(&fdev, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)a);
	vreg_write(&fdev, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(a >> 32));
	a = virt_to_phys(b->avail);
	vreg_write(&fdev, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)a);
	vreg_write(&fdev, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(a >> 32));
	a = virt_to_phys(b->used);
	vreg_write(&fdev, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)a);
	vreg_write(&fdev, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(a >> 32));
	vreg_write(&fdev, VIRTIO_MMIO_QUEUE_READY, 1);
	return true;
}

static bool flood_start(const struct bootinfo *bi, uint32_t id, uint64_t features, int nq,
			const char *what)
{
	if (!virtio_find(bi, id, &fdev)) {
		guest_log("%s none", what);
		return false;
	}
	if (!virtio_begin(&fdev, features)) {
		guest_log("%s init failed at features", what);
		return false;
	}
	for (uint16_t q = 0; q < nq; q++) {
		if (!big_queue_setup(q)) {
			guest_log("%s init failed at queues", what);
			return false;
		}
	}
	if (!virtio_driver_ok(&fdev)) {
		guest_log("%s init failed at driver-ok", what);
		return false;
	}
	return true;
}

static void set_desc(volatile struct virtq_desc *d, const volatile void *addr, uint32_t len,
		     uint16_t flags, uint16_t next)
{
	d->addr = virt_to_phys(addr);
	d->len = len;
	d->flags = flags;
	d->next = next;
}

static void publish(struct big_queue *b, uint16_t head)
{
	uint16_t idx = b->avail->idx;

	b->avail->ring[idx & (BIG_QUEUE - 1)] = head;
	virtio_mb();
	b->avail->idx = (uint16_t)(idx + 1);
}

static void kick(uint16_t q)
{
	virtio_mb();
	vreg_write(&fdev, VIRTIO_MMIO_QUEUE_NOTIFY, q);
}

static void ack_interrupts(void)
{
	uint32_t isr = vreg_read(&fdev, VIRTIO_MMIO_INTERRUPT_STATUS);

	if (isr)
		vreg_write(&fdev, VIRTIO_MMIO_INTERRUPT_ACK, isr);
}

/* ---- net ---- */

static uint8_t frame[NET_MAX_FRAME + 1] __attribute__((aligned(4096)));

/* Slot s (descriptors 2s, 2s+1) as a chain of kind s % 4. */
static void net_slot(volatile struct virtq_desc *d, uint16_t s)
{
	uint16_t i = (uint16_t)(s * NET_SLOT_DESCS);

	switch (s % 4) {
	case 0: /* a maximum-size frame in one descriptor */
		set_desc(&d[i], frame, NET_MAX_FRAME, 0, 0);
		break;
	case 1: /* the same, header and body apart */
		set_desc(&d[i], frame, NET_HDR_LEN, VIRTQ_DESC_F_NEXT, (uint16_t)(i + 1));
		set_desc(&d[i + 1], frame + NET_HDR_LEN, NET_MAX_FRAME - NET_HDR_LEN, 0, 0);
		break;
	case 2: /* one byte over the limit */
		set_desc(&d[i], frame, NET_HDR_LEN, VIRTQ_DESC_F_NEXT, (uint16_t)(i + 1));
		set_desc(&d[i + 1], frame + NET_HDR_LEN, NET_MAX_FRAME + 1 - NET_HDR_LEN, 0, 0);
		break;
	default: /* a runt, then a body the device may write to */
		set_desc(&d[i], frame, 4, VIRTQ_DESC_F_NEXT, (uint16_t)(i + 1));
		set_desc(&d[i + 1], frame, NET_MAX_FRAME, VIRTQ_DESC_F_WRITE, 0);
		break;
	}
}

void mode_evil_net_flood(const struct bootinfo *bi)
{
	uint32_t frames = cmdline_u32(bi, "ember.flood_frames", 4096);
	uint32_t sent = 0, done = 0;
	struct big_queue *tx = &bq[1];

	if (!flood_start(bi, VIRTIO_ID_NET, VIRTIO_NET_F_MAC, 2, "net"))
		return;
	/* No rx buffer is ever posted. */
	memset(frame + NET_HDR_LEN, 0xff, 6); /* to everyone; the vnet header stays zero */
	guest_log("evil net-flood start frames %u", frames);
	for (uint16_t s = 0; s < NET_SLOTS; s++)
		net_slot(tx->desc, s);
	for (uint16_t s = 0; s < NET_SLOTS && sent < frames; s++, sent++)
		publish(tx, (uint16_t)(s * NET_SLOT_DESCS));
	kick(1);
	uint64_t deadline = timer_ms() + FLOOD_WAIT_MS;
	while (done < sent) {
		bool any = false;
		while (tx->used->idx != tx->last_used) {
			virtio_mb();
			uint32_t id = tx->used->ring[tx->last_used & (BIG_QUEUE - 1)].id;
			tx->last_used++;
			done++;
			any = true;
			/* the ring stays full: the slot goes straight back */
			if (sent < frames && id < BIG_QUEUE && id % NET_SLOT_DESCS == 0) {
				publish(tx, (uint16_t)id);
				sent++;
			}
		}
		if (any) {
			ack_interrupts();
			kick(1);
			deadline = timer_ms() + FLOOD_WAIT_MS;
		} else if (timer_ms() >= deadline) {
			guest_log("evil net-flood stalled after %u of %u", done, sent);
			break;
		} else {
			busy_delay(50);
		}
	}
	guest_log("evil net-flood frames %u completed %u", sent, done);
	if (cmdline_u32(bi, "ember.flood_hold", 1)) {
		guest_log("evil net-flood holding");
		halt_forever();
	}
	virtio_reset(&fdev);
}

/* ---- blk ---- */

static uint8_t blk_data[BLK_BUF] __attribute__((aligned(4096)));
static struct virtio_blk_req_hdr bhdr[BIG_QUEUE];
static volatile uint8_t bstatus[BIG_QUEUE];
/*
 * One indirect table per request (header, segments, status): 1 MiB, taken
 * from RAM at TABLES_ADDR rather than .bss, which every boot clears.
 */
#define TABLES_ADDR 0x1000000ull
#define TABLES_BYTES ((uint64_t)BIG_QUEUE * (BLK_SEG_LIMIT + 2) * 16)
static struct virtq_desc (*tables)[BLK_SEG_LIMIT + 2];
static struct virtq_desc extra[BLK_SEG_LIMIT + 3] __attribute__((aligned(16)));

static bool ram_covers(const struct bootinfo *bi, uint64_t addr, uint64_t len)
{
	for (uint32_t i = 0; i < bi->nr_mem; i++) {
		const struct mem_entry *e = &bi->mem[i];
		if (e->type == MEM_TYPE_RAM && e->addr <= addr && addr + len <= e->addr + e->size)
			return true;
	}
	return false;
}

/* Table `t` for a request of `segs` segments of `seg_len` over `buf`. */
static uint32_t blk_table(struct virtq_desc *t, struct virtio_blk_req_hdr *h,
			  volatile uint8_t *st, const void *buf, uint32_t segs, uint32_t seg_len,
			  bool read)
{
	uint16_t n = 0;

	set_desc(&t[n], h, sizeof(*h), VIRTQ_DESC_F_NEXT, (uint16_t)(n + 1));
	n++;
	for (uint32_t k = 0; k < segs; k++, n++)
		set_desc(&t[n], buf, seg_len,
			 (uint16_t)(VIRTQ_DESC_F_NEXT | (read ? VIRTQ_DESC_F_WRITE : 0)),
			 (uint16_t)(n + 1));
	set_desc(&t[n], st, 1, VIRTQ_DESC_F_WRITE, 0);
	n++;
	return n * 16u;
}

/* Publishes `count` indirect heads 0..count-1, kicks, waits for them all. */
static uint32_t blk_round(struct big_queue *q, uint32_t count)
{
	uint32_t done = 0;
	uint64_t deadline = timer_ms() + FLOOD_WAIT_MS;

	for (uint16_t i = 0; i < count; i++) {
		bstatus[i] = 0xff;
		publish(q, i);
	}
	kick(0);
	while (done < count && timer_ms() < deadline) {
		if (q->used->idx == q->last_used) {
			busy_delay(50);
			continue;
		}
		virtio_mb();
		q->last_used++;
		done++;
	}
	ack_interrupts();
	return done;
}

void mode_evil_blk_flood(const struct bootinfo *bi)
{
	uint32_t rounds = cmdline_u32(bi, "ember.flood_rounds", 2);
	uint32_t size_max = BLK_BUF, seg_max = 128;
	uint32_t ok = 0, ioerr = 0, other = 0, done = 0;
	struct big_queue *q = &bq[0];

	if (!flood_start(bi, VIRTIO_ID_BLOCK,
			 VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX, 1,
			 "blk"))
		return;
	if (fdev.driver_features & VIRTIO_BLK_F_SIZE_MAX)
		size_max = virtio_cfg_read32(&fdev, 8);
	if (fdev.driver_features & VIRTIO_BLK_F_SEG_MAX)
		seg_max = virtio_cfg_read32(&fdev, 12);
	/* the largest the device takes, within what we can describe */
	if (size_max == 0 || size_max > BLK_BUF)
		size_max = BLK_BUF;
	if (seg_max == 0 || seg_max > BLK_SEG_LIMIT)
		seg_max = BLK_SEG_LIMIT;
	size_max &= ~(uint32_t)(BLK_SECTOR - 1);
	if (!ram_covers(bi, TABLES_ADDR, TABLES_BYTES)) {
		guest_log("evil blk-flood needs RAM at 0x%llx", (unsigned long long)TABLES_ADDR);
		return;
	}
	tables = phys_to_virt(TABLES_ADDR);
	uint64_t capacity = virtio_cfg_read64(&fdev, 0);
	uint64_t req_sectors = (uint64_t)seg_max * size_max / BLK_SECTOR;
	uint64_t span = capacity / req_sectors;
	guest_log("evil blk-flood start rounds %u size_max %u seg_max %u capacity %llu", rounds,
		  size_max, seg_max, (unsigned long long)capacity);

	for (uint16_t i = 0; i < BIG_QUEUE; i++) {
		bool read = (i & 1) == 0;
		bhdr[i].type = read ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT;
		bhdr[i].reserved = 0;
		bhdr[i].sector = span ? (i % span) * req_sectors : 0;
		uint32_t len = blk_table(tables[i], &bhdr[i], &bstatus[i], blk_data, seg_max,
					 size_max, read);
		set_desc(&q->desc[i], tables[i], len, VIRTQ_DESC_F_INDIRECT, 0);
	}
	for (uint32_t r = 0; r < rounds; r++) {
		uint32_t n = blk_round(q, BIG_QUEUE);
		done += n;
		for (uint16_t i = 0; i < BIG_QUEUE; i++) {
			if (bstatus[i] == 0)
				ok++;
			else if (bstatus[i] == 1)
				ioerr++;
			else
				other++;
		}
		if (n < BIG_QUEUE) {
			guest_log("evil blk-flood stalled in round %u after %u", r, n);
			break;
		}
	}
	guest_log("evil blk-flood requests %u completed %u ok %u ioerr %u other %u",
		  rounds * BIG_QUEUE, done, ok, ioerr, other);

	/* Just over the limits: one segment too many, then one sector too much
	 * in a single segment (a write, so a device that took it would only
	 * read our memory). Each must fail with IOERR. */
	int st[2];
	bhdr[0].type = VIRTIO_BLK_T_IN;
	bhdr[0].sector = 0;
	uint32_t len = blk_table(extra, &bhdr[0], &bstatus[0], blk_data, seg_max + 1,
				 BLK_SECTOR, true);
	set_desc(&q->desc[0], extra, len, VIRTQ_DESC_F_INDIRECT, 0);
	st[0] = blk_round(q, 1) ? bstatus[0] : -1;
	bhdr[0].type = VIRTIO_BLK_T_OUT;
	len = blk_table(extra, &bhdr[0], &bstatus[0], (const void *)(uintptr_t)0x100000, 1,
			seg_max * size_max + BLK_SECTOR, false);
	set_desc(&q->desc[0], extra, len, VIRTQ_DESC_F_INDIRECT, 0);
	st[1] = blk_round(q, 1) ? bstatus[0] : -1;
	guest_log("evil blk-flood oversize status %d %d", st[0], st[1]);

	if (cmdline_u32(bi, "ember.flood_hold", 1)) {
		guest_log("evil blk-flood holding");
		halt_forever();
	}
	virtio_reset(&fdev);
}
