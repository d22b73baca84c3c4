/*
 * virtio-mmio (version 2) transport and split-virtqueue helpers, polled.
 * Driver initialisation follows virtio 1.2, 3.1.1 and 4.2.3.
 */
#include "bootinfo.h"
#include "virtio.h"

/* Queue memory of the one device in use at a time (a test mode drives one). */
static uint8_t vq_mem[VIRTIO_MAX_QUEUES][VIRTQ_PAGE] __attribute__((aligned(VIRTQ_PAGE)));

uint8_t *virtq_page(uint16_t q)
{
	return vq_mem[q % VIRTIO_MAX_QUEUES];
}

bool virtio_probe(struct virtio_dev *d, const struct virtio_mmio_info *info)
{
	memset(d, 0, sizeof(*d));
	d->base = (uintptr_t)info->base;
	d->irq = info->irq;
	if (mmio_read32(d->base + VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC)
		return false;
	d->version = vreg_read(d, VIRTIO_MMIO_VERSION);
	d->device_id = vreg_read(d, VIRTIO_MMIO_DEVICE_ID);
	return true;
}

bool virtio_find(const struct bootinfo *bi, uint32_t device_id, struct virtio_dev *d)
{
	struct virtio_mmio_info info[VIRTIO_MAX_DEVICES];
	int n = virtio_parse_cmdline(bi->cmdline, info, VIRTIO_MAX_DEVICES);

	for (int i = 0; i < n; i++) {
		if (virtio_probe(d, &info[i]) && d->version == 2 && d->device_id == device_id)
			return true;
	}
	return false;
}

void virtio_reset(struct virtio_dev *d)
{
	vreg_write(d, VIRTIO_MMIO_STATUS, 0);
	/* 4.2.3.1: wait until the reset has completed (reads back 0). */
	for (int i = 0; i < 1000 && vreg_read(d, VIRTIO_MMIO_STATUS) != 0; i++)
		busy_delay(100);
	for (int q = 0; q < VIRTIO_MAX_QUEUES; q++)
		d->vq[q].size = 0;
	d->nqueues = 0;
}

static void add_status(struct virtio_dev *d, uint32_t bits)
{
	uint32_t s = vreg_read(d, VIRTIO_MMIO_STATUS);
	vreg_write(d, VIRTIO_MMIO_STATUS, s | bits);
}

bool virtio_begin(struct virtio_dev *d, uint64_t wanted)
{
	virtio_reset(d);
	add_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	add_status(d, VIRTIO_STATUS_DRIVER);

	vreg_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	uint64_t lo = vreg_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
	vreg_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	uint64_t hi = vreg_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
	d->device_features = lo | hi << 32;
	if (!(d->device_features & VIRTIO_F_VERSION_1)) {
		add_status(d, VIRTIO_STATUS_FAILED);
		return false;
	}
	d->driver_features = (wanted & d->device_features) | VIRTIO_F_VERSION_1;
	vreg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	vreg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)d->driver_features);
	vreg_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	vreg_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(d->driver_features >> 32));

	add_status(d, VIRTIO_STATUS_FEATURES_OK);
	if (!(vreg_read(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
		add_status(d, VIRTIO_STATUS_FAILED);
		return false;
	}
	return true;
}

bool virtq_setup(struct virtio_dev *d, uint16_t q, uint16_t size)
{
	if (q >= VIRTIO_MAX_QUEUES)
		return false;
	vreg_write(d, VIRTIO_MMIO_QUEUE_SEL, q);
	if (vreg_read(d, VIRTIO_MMIO_QUEUE_READY) != 0)
		return false;
	uint32_t max = vreg_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max == 0)
		return false;
	if (size > VIRTQ_MAX_SIZE)
		size = VIRTQ_MAX_SIZE;
	if (size > max)
		size = (uint16_t)max;
	/* Queue sizes are powers of two for split queues: round down. */
	while (size & (size - 1))
		size &= (uint16_t)(size - 1);

	struct virtq *vq = &d->vq[q];
	uint8_t *page = d->qmem ? d->qmem + (size_t)q * VIRTQ_PAGE : virtq_page(q);
	memset(page, 0, VIRTQ_PAGE);
	vq->index = q;
	vq->size = size;
	vq->desc = (volatile struct virtq_desc *)page;
	vq->avail = (volatile struct virtq_avail *)(page + 16u * size);
	vq->used = (volatile struct virtq_used *)(page + VIRTQ_USED_OFF);
	for (uint16_t i = 0; i < size; i++)
		vq->desc[i].next = (uint16_t)(i + 1);
	vq->free_head = 0;
	vq->num_free = size;
	vq->last_used = 0;

	vreg_write(d, VIRTIO_MMIO_QUEUE_NUM, size);
	uint64_t a = virt_to_phys(vq->desc);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)a);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(a >> 32));
	a = virt_to_phys(vq->avail);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)a);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(a >> 32));
	a = virt_to_phys(vq->used);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)a);
	vreg_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(a >> 32));
	vreg_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
	if (q >= d->nqueues)
		d->nqueues = q + 1;
	return true;
}

bool virtio_setup_queues(struct virtio_dev *d, int nmax)
{
	int q;

	for (q = 0; q < nmax && q < VIRTIO_MAX_QUEUES; q++) {
		vreg_write(d, VIRTIO_MMIO_QUEUE_SEL, (uint32_t)q);
		if (vreg_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX) == 0)
			break;
		if (!virtq_setup(d, (uint16_t)q, VIRTQ_DEFAULT_SIZE))
			return false;
	}
	return q > 0;
}

bool virtio_driver_ok(struct virtio_dev *d)
{
	add_status(d, VIRTIO_STATUS_DRIVER_OK);
	uint32_t s = vreg_read(d, VIRTIO_MMIO_STATUS);
	return (s & VIRTIO_STATUS_DRIVER_OK) &&
	       !(s & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED));
}

bool virtio_init(struct virtio_dev *d, uint64_t wanted, const char *what)
{
	const char *step;

	if (!virtio_begin(d, wanted))
		step = "features";
	else if (!virtio_setup_queues(d, VIRTIO_MAX_QUEUES))
		step = "queues";
	else if (!virtio_driver_ok(d))
		step = "driver-ok";
	else
		return true;
	guest_log("%s init failed at %s status 0x%x", what, step,
		  vreg_read(d, VIRTIO_MMIO_STATUS));
	return false;
}

/* Config space: 32-bit aligned loads only, bytes picked out of them. */
uint32_t virtio_cfg_read32(const struct virtio_dev *d, uint32_t off)
{
	return vreg_read(d, VIRTIO_MMIO_CONFIG + off);
}

uint8_t virtio_cfg_read8(const struct virtio_dev *d, uint32_t off)
{
	uint32_t w = virtio_cfg_read32(d, off & ~3u);
	return (uint8_t)(w >> (8 * (off & 3)));
}

uint64_t virtio_cfg_read64(const struct virtio_dev *d, uint32_t off)
{
	uint32_t gen, lo, hi;

	/* 4.2.2.2: retry until ConfigGeneration is stable around the reads. */
	do {
		gen = vreg_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = virtio_cfg_read32(d, off);
		hi = virtio_cfg_read32(d, off + 4);
	} while (gen != vreg_read(d, VIRTIO_MMIO_CONFIG_GENERATION));
	return (uint64_t)hi << 32 | lo;
}

int virtq_add(struct virtq *vq, const struct vbuf *bufs, int n)
{
	if (n <= 0 || n > vq->num_free)
		return -1;
	uint16_t head = vq->free_head;
	uint16_t i = head, last = head;

	for (int k = 0; k < n; k++) {
		volatile struct virtq_desc *ds = &vq->desc[i];
		ds->addr = virt_to_phys(bufs[k].addr);
		ds->len = bufs[k].len;
		ds->flags = (uint16_t)((bufs[k].write ? VIRTQ_DESC_F_WRITE : 0) |
				       (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		last = i;
		i = ds->next;
	}
	vq->free_head = vq->desc[last].next;
	vq->num_free = (uint16_t)(vq->num_free - n);
	vq->chain_len[head] = (uint16_t)n;

	uint16_t idx = vq->avail->idx;
	vq->avail->ring[idx & (vq->size - 1)] = head;
	virtio_mb(); /* descriptors and ring entry before the index */
	vq->avail->idx = (uint16_t)(idx + 1);
	virtio_mb();
	return head;
}

void virtq_kick(const struct virtio_dev *d, const struct virtq *vq)
{
	virtio_mb();
	vreg_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
}

int virtq_get_used(struct virtq *vq, uint32_t *len)
{
	if (vq->used->idx == vq->last_used)
		return -1;
	virtio_mb(); /* the index before the element */
	volatile struct virtq_used_elem *e = &vq->used->ring[vq->last_used & (vq->size - 1)];
	uint32_t id = e->id;
	*len = e->len;
	vq->last_used++;
	if (id >= vq->size || vq->chain_len[id] == 0)
		return -1; /* a device bug: nothing we can free */

	/* Return the chain to the free list (we never move descriptors). */
	uint16_t n = vq->chain_len[id];
	uint16_t last = (uint16_t)id;
	for (uint16_t k = 1; k < n; k++)
		last = vq->desc[last].next;
	vq->desc[last].next = vq->free_head;
	vq->free_head = (uint16_t)id;
	vq->num_free = (uint16_t)(vq->num_free + n);
	vq->chain_len[id] = 0;
	return (int)id;
}

int virtq_wait(const struct virtio_dev *d, struct virtq *vq, uint32_t *len, uint32_t timeout_ms)
{
	uint64_t deadline = timer_ms() + timeout_ms;

	for (;;) {
		int id = virtq_get_used(vq, len);
		if (id >= 0) {
			/* Polled mode: acknowledge whatever the device raised. */
			uint32_t isr = vreg_read(d, VIRTIO_MMIO_INTERRUPT_STATUS);
			if (isr)
				vreg_write(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
			return id;
		}
		if (timer_ms() >= deadline)
			return -1;
		busy_delay(50);
	}
}
