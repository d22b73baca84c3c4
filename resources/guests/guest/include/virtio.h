/*
 * virtio 1.2 over virtio-mmio version 2: registers, split virtqueues and the
 * small polled driver core shared by the blk, net, vsock and evil modes.
 *
 * The guest is identity-mapped, so guest-physical = virtual for every
 * buffer handed to a device. All register accesses are 32-bit (movl).
 */
#ifndef EMBER_VIRTIO_H
#define EMBER_VIRTIO_H

#include "ember.h"

/* virtio-mmio v2 register offsets (virtio 1.2, 4.2.2). */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976 /* "virt" */

/* Device status bits (2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

#define VIRTIO_F_VERSION_1 (1ull << 32)

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_VSOCK 19

/* Split virtqueue layout (2.7). */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[];
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[];
};

/* Each queue lives in one 4 KiB page: desc at 0, avail at 16*size, used at 2048. */
#define VIRTQ_PAGE 4096
#define VIRTQ_USED_OFF 2048
#define VIRTQ_MAX_SIZE 64
#define VIRTQ_DEFAULT_SIZE 16
#define VIRTIO_MAX_QUEUES 3
#define VIRTIO_MAX_DEVICES 32

/* One `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` from the cmdline. */
struct virtio_mmio_info {
	uint64_t base;
	uint64_t size;
	uint32_t irq;
};

struct virtq {
	uint16_t index; /* queue number, what QueueNotify gets */
	uint16_t size;	/* 0: not set up */
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	uint16_t free_head;
	uint16_t num_free;
	uint16_t last_used; /* next used idx we have not consumed */
	uint16_t chain_len[VIRTQ_MAX_SIZE];
};

struct virtio_dev {
	uintptr_t base;
	uint32_t irq;
	uint32_t device_id;
	uint32_t version;
	uint64_t device_features;
	uint64_t driver_features;
	int nqueues;
	struct virtq vq[VIRTIO_MAX_QUEUES];
	/*
	 * Queue memory (VIRTQ_PAGE per queue, page aligned) when the caller
	 * drives several devices at once; NULL: the shared static pages of
	 * virtq_page(). Set after virtio_probe (which clears the struct).
	 */
	uint8_t *qmem;
};

/* One element of a descriptor chain to add. */
struct vbuf {
	const void *addr;
	uint32_t len;
	bool write; /* device-writable */
};

static inline uint32_t mmio_read32(uintptr_t addr)
{
	uint32_t v;
	__asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(addr) : "memory");
	return v;
}

static inline void mmio_write32(uintptr_t addr, uint32_t v)
{
	__asm__ volatile("movl %0, (%1)" : : "r"(v), "r"(addr) : "memory");
}

/* Full barrier without SSE (mfence is not available to us). */
static inline void virtio_mb(void)
{
	__asm__ volatile("lock; addl $0, (%%rsp)" ::: "memory", "cc");
}

static inline uint32_t vreg_read(const struct virtio_dev *d, uint32_t off)
{
	return mmio_read32(d->base + off);
}

static inline void vreg_write(const struct virtio_dev *d, uint32_t off, uint32_t v)
{
	mmio_write32(d->base + off, v);
}

static inline uint64_t virt_to_phys(const volatile void *p)
{
	return (uint64_t)(uintptr_t)p;
}

/* virtio/parse.c (also built for the host tests) */
bool memparse(const char *s, size_t len, uint64_t *out);
bool virtio_parse_device_arg(const char *s, size_t len, struct virtio_mmio_info *out);
int virtio_parse_cmdline(const char *cmdline, struct virtio_mmio_info *out, int max);
bool parse_u32(const char *s, uint32_t *out);
bool parse_ipv4(const char *s, uint32_t *out);
uint16_t inet_csum(const void *data, size_t len, uint32_t sum);
uint32_t fnv1a32(const uint8_t *p, uint64_t len);

#ifndef HOST_TEST
struct bootinfo;

/* virtio/mmio.c */
/* Reads MagicValue/Version/DeviceID; false if MagicValue is wrong. */
bool virtio_probe(struct virtio_dev *d, const struct virtio_mmio_info *info);
/* First announced device with this DeviceID (magic and version 2 checked). */
bool virtio_find(const struct bootinfo *bi, uint32_t device_id, struct virtio_dev *d);
/* Status=0, then waits for the read-back to be 0. */
void virtio_reset(struct virtio_dev *d);
/*
 * 3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, features (wanted & offered,
 * plus VERSION_1), FEATURES_OK and its read-back. Returns false (and sets
 * FAILED) when the device refuses.
 */
bool virtio_begin(struct virtio_dev *d, uint64_t wanted);
/* Sets up queue q with min(size, QueueNumMax) entries in page `page`. */
bool virtq_setup(struct virtio_dev *d, uint16_t q, uint16_t size);
/* Sets up every queue the device has (QueueNumMax != 0), up to nmax. */
bool virtio_setup_queues(struct virtio_dev *d, int nmax);
/* DRIVER_OK; false if the device then reports NEEDS_RESET or FAILED. */
bool virtio_driver_ok(struct virtio_dev *d);
/* begin + all queues + DRIVER_OK, logging "<what> init failed ..." on error. */
bool virtio_init(struct virtio_dev *d, uint64_t wanted, const char *what);
/* Page-aligned memory of queue q of the (single) active device. */
uint8_t *virtq_page(uint16_t q);

uint32_t virtio_cfg_read32(const struct virtio_dev *d, uint32_t off);
uint8_t virtio_cfg_read8(const struct virtio_dev *d, uint32_t off);
uint64_t virtio_cfg_read64(const struct virtio_dev *d, uint32_t off);

/* Adds a chain (out buffers first); returns the head or -1 if full. */
int virtq_add(struct virtq *vq, const struct vbuf *bufs, int n);
void virtq_kick(const struct virtio_dev *d, const struct virtq *vq);
/* Takes one used element: returns its id (head) and *len, or -1 if none. */
int virtq_get_used(struct virtq *vq, uint32_t *len);
/* Polls until a used element arrives or timeout_ms pass: id or -1. */
int virtq_wait(const struct virtio_dev *d, struct virtq *vq, uint32_t *len, uint32_t timeout_ms);

/* timer.c: PIT channel 2 as a free-running clock for poll timeouts. */
void timer_init(void);
uint64_t timer_ms(void);

/* Device test modes. */
void mode_virtio_probe(const struct bootinfo *bi);
void mode_blk(const struct bootinfo *bi);
void mode_bench_blk(const struct bootinfo *bi);
void mode_net(const struct bootinfo *bi);
void mode_bench_net(const struct bootinfo *bi);
void mode_snap_io(const struct bootinfo *bi);
/* net.c, for snap-io: the first interface with its own queue memory; one
 * round (MAC reread into mac_out "xx:xx:xx:xx:xx:xx", ARP, UDP echo). */
bool net_io_start(const struct bootinfo *bi);
bool net_io_round(uint64_t n, char *mac_out);
void mode_vsock(const struct bootinfo *bi);
void mode_rng(const struct bootinfo *bi);
void mode_balloon(const struct bootinfo *bi);
void mode_mmds(const struct bootinfo *bi);
void mode_pod_agent(const struct bootinfo *bi);
void mode_evil_desc_oob(const struct bootinfo *bi);
void mode_evil_desc_loop(const struct bootinfo *bi);
void mode_evil_len(const struct bootinfo *bi);
void mode_evil_queue_size(const struct bootinfo *bi);
void mode_evil_avail_idx(const struct bootinfo *bi);
void mode_evil_vsock_flood(const struct bootinfo *bi);
void mode_evil_net_flood(const struct bootinfo *bi);
void mode_evil_blk_flood(const struct bootinfo *bi);

/* blkdev.c: the virtio-blk request path, used by the blk and evil modes and
 * by the unikernel runtime. */
#define BLK_SECTOR 512
#define VIRTIO_BLK_F_RO (1ull << 5)
#define VIRTIO_BLK_F_FLUSH (1ull << 9)
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define BLK_STATUS_NONE -1    /* used element came back without a status */
#define BLK_STATUS_TIMEOUT -2 /* no used element */

struct virtio_blk_req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

bool blk_init(struct virtio_dev *d);
/* One request; returns the status byte, BLK_STATUS_NONE or BLK_STATUS_TIMEOUT. */
int blk_request(struct virtio_dev *d, uint32_t type, uint64_t sector, void *buf, uint32_t len,
		bool write_buf, uint32_t *used_len);
#endif

#endif
