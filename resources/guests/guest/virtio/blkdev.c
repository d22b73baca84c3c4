/*
 * virtio-blk (device id 2) request path, polled: one request at a time.
 * Requests are header (device-readable) + data + status byte (writable).
 * Shared by the test modes and the unikernel runtime.
 */
#include "virtio.h"

#define BLK_TIMEOUT_MS 5000

static struct virtio_blk_req_hdr req_hdr;
static volatile uint8_t req_status;

bool blk_init(struct virtio_dev *d)
{
	return virtio_init(d, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, "blk");
}

int blk_request(struct virtio_dev *d, uint32_t type, uint64_t sector, void *buf, uint32_t len,
		bool write_buf, uint32_t *used_len)
{
	struct vbuf b[3];
	int n = 0;
	struct virtq *vq = &d->vq[0];

	req_hdr.type = type;
	req_hdr.reserved = 0;
	req_hdr.sector = sector;
	req_status = 0xff;
	b[n++] = (struct vbuf){ &req_hdr, sizeof(req_hdr), false };
	if (len)
		b[n++] = (struct vbuf){ buf, len, write_buf };
	b[n++] = (struct vbuf){ (const void *)&req_status, 1, true };
	if (virtq_add(vq, b, n) < 0)
		return BLK_STATUS_TIMEOUT;
	virtq_kick(d, vq);
	uint32_t ul = 0;
	if (virtq_wait(d, vq, &ul, BLK_TIMEOUT_MS) < 0)
		return BLK_STATUS_TIMEOUT;
	if (used_len)
		*used_len = ul;
	if (ul == 0)
		return BLK_STATUS_NONE;
	return req_status;
}
