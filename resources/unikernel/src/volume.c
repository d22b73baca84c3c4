/*
 * Volumes: ember.mount=<mount>:<n> names the n-th announced virtio-mmio
 * block device. Devices are opened on first use (polled virtio-blk through
 * the test guest's transport and request path) with their own queue page.
 */
#include "rt.h"

#define SECTOR 512u
#define MAX_REQ (64u * 1024) /* bytes per virtio-blk request */

static struct rt_volume volumes[RT_MAX_MOUNTS];
static int nr_volumes;
static uint8_t bounce[SECTOR] __attribute__((aligned(SECTOR)));

bool rt_add_mount(const char *mount, int index)
{
	for (int i = 0; i < nr_volumes; i++) {
		if (strcmp(volumes[i].mount, mount) == 0) {
			volumes[i].index = index; /* the last word wins */
			return true;
		}
	}
	if (nr_volumes == RT_MAX_MOUNTS) {
		kprintf("ember: too many mounts, ignoring %s\n", mount);
		return false;
	}
	volumes[nr_volumes].mount = mount;
	volumes[nr_volumes].index = index;
	nr_volumes++;
	return true;
}

static bool find_device(int index, struct virtio_dev *d)
{
	struct virtio_mmio_info info[VIRTIO_MAX_DEVICES];
	int n = virtio_parse_cmdline(rt_bootinfo.cmdline, info, VIRTIO_MAX_DEVICES);

	for (int i = 0; i < n; i++) {
		if (virtio_probe(d, &info[i]) && d->version == 2 &&
		    d->device_id == VIRTIO_ID_BLOCK && index-- == 0)
			return true;
	}
	return false;
}

static int volume_open(struct rt_volume *v)
{
	struct virtio_dev *d = &v->dev;

	if (!find_device(v->index, d)) {
		kprintf("ember: mount %s: no virtio block device #%d\n", v->mount, v->index);
		return EMBER_EIO;
	}
	d->qmem = rt_alloc_aligned(VIRTQ_PAGE, VIRTQ_PAGE);
	if (!d->qmem)
		return EMBER_EIO;
	if (!virtio_begin(d, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH) ||
	    !virtq_setup(d, 0, VIRTQ_DEFAULT_SIZE) || !virtio_driver_ok(d)) {
		kprintf("ember: mount %s: virtio-blk init failed, status 0x%x\n", v->mount,
			vreg_read(d, VIRTIO_MMIO_STATUS));
		return EMBER_EIO;
	}
	v->sectors = virtio_cfg_read64(d, 0);
	v->ro = (d->driver_features & VIRTIO_BLK_F_RO) != 0;
	return 0;
}

static struct rt_volume *opened(struct rt_volume *v, long *err)
{
	if (!v->opened) {
		v->opened = true;
		v->err = volume_open(v);
	}
	if (v->err) {
		*err = v->err;
		return NULL;
	}
	return v;
}

struct rt_volume *rt_volume_get(const char *mount, long *err)
{
	if (!mount) {
		*err = EMBER_EINVAL;
		return NULL;
	}
	for (int i = 0; i < nr_volumes; i++)
		if (strcmp(volumes[i].mount, mount) == 0)
			return opened(&volumes[i], err);
	*err = EMBER_ENOMOUNT;
	return NULL;
}

struct rt_volume *rt_volume_for_path(const char *path, const char **rest, long *err)
{
	struct rt_volume *best = NULL;
	size_t best_len = 0;

	if (!path || path[0] != '/') {
		*err = path ? EMBER_ENOENT : EMBER_EINVAL;
		return NULL;
	}
	for (int i = 0; i < nr_volumes; i++) {
		const char *m = volumes[i].mount;
		size_t len = strlen(m);
		while (len > 1 && m[len - 1] == '/')
			len--; /* "/data/" covers "/data/x" too */
		bool match;
		if (len == 1 && m[0] == '/')
			match = true, len = 0;
		else
			match = strncmp(path, m, len) == 0 && (path[len] == '\0' || path[len] == '/');
		if (match && (!best || len > best_len)) {
			best = &volumes[i];
			best_len = len;
		}
	}
	if (!best) {
		*err = EMBER_ENOMOUNT;
		return NULL;
	}
	*rest = path + best_len;
	return opened(best, err);
}

/* Whole sectors; the buffer is handed to the device as is. */
static long xfer(struct rt_volume *v, uint64_t sector, void *buf, uint64_t nsect, bool write)
{
	uint8_t *p = buf;

	while (nsect) {
		uint64_t n = nsect < MAX_REQ / SECTOR ? nsect : MAX_REQ / SECTOR;
		int st = blk_request(&v->dev, write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, sector,
				     p, (uint32_t)(n * SECTOR), !write, NULL);
		if (st != 0)
			return EMBER_EIO;
		sector += n;
		p += n * SECTOR;
		nsect -= n;
	}
	if (write)
		v->dirty = true;
	return 0;
}

long rt_volume_read(struct rt_volume *v, uint64_t off, void *buf, uint64_t len)
{
	uint64_t size = v->sectors * SECTOR;
	uint8_t *p = buf;

	if (off >= size)
		return 0;
	if (len > size - off)
		len = size - off;
	uint64_t done = len;
	uint32_t head = (uint32_t)(off % SECTOR);
	if (head) {
		uint64_t n = SECTOR - head < len ? SECTOR - head : len;
		if (xfer(v, off / SECTOR, bounce, 1, false))
			return EMBER_EIO;
		memcpy(p, bounce + head, n);
		p += n;
		off += n;
		len -= n;
	}
	if (len >= SECTOR) {
		uint64_t whole = len / SECTOR;
		if (xfer(v, off / SECTOR, p, whole, false))
			return EMBER_EIO;
		p += whole * SECTOR;
		off += whole * SECTOR;
		len -= whole * SECTOR;
	}
	if (len) {
		if (xfer(v, off / SECTOR, bounce, 1, false))
			return EMBER_EIO;
		memcpy(p, bounce, len);
	}
	return (long)done;
}

static long volume_write(struct rt_volume *v, uint64_t off, const void *buf, uint64_t len)
{
	uint64_t size = v->sectors * SECTOR;
	const uint8_t *p = buf;

	if (off > size || len > size - off)
		return EMBER_ERANGE;
	if (v->ro)
		return EMBER_EROFS;
	uint64_t done = len;
	uint32_t head = (uint32_t)(off % SECTOR);
	if (head && len) {
		uint64_t n = SECTOR - head < len ? SECTOR - head : len;
		if (xfer(v, off / SECTOR, bounce, 1, false))
			return EMBER_EIO;
		memcpy(bounce + head, p, n);
		if (xfer(v, off / SECTOR, bounce, 1, true))
			return EMBER_EIO;
		p += n;
		off += n;
		len -= n;
	}
	if (len >= SECTOR) {
		uint64_t whole = len / SECTOR;
		if (xfer(v, off / SECTOR, (void *)p, whole, true))
			return EMBER_EIO;
		p += whole * SECTOR;
		off += whole * SECTOR;
		len -= whole * SECTOR;
	}
	if (len) {
		if (xfer(v, off / SECTOR, bounce, 1, false))
			return EMBER_EIO;
		memcpy(bounce, p, len);
		if (xfer(v, off / SECTOR, bounce, 1, true))
			return EMBER_EIO;
	}
	return (long)done;
}

long ember_volume_read(const char *mount, unsigned long offset, void *buf, unsigned long len)
{
	long err;
	struct rt_volume *v = rt_volume_get(mount, &err);

	if (!v)
		return err;
	if (!buf && len)
		return EMBER_EINVAL;
	return rt_volume_read(v, offset, buf, len);
}

long ember_volume_write(const char *mount, unsigned long offset, const void *buf,
			unsigned long len)
{
	long err;
	struct rt_volume *v = rt_volume_get(mount, &err);

	if (!v)
		return err;
	if (!buf && len)
		return EMBER_EINVAL;
	return volume_write(v, offset, buf, len);
}

long ember_volume_size(const char *mount)
{
	long err;
	struct rt_volume *v = rt_volume_get(mount, &err);

	return v ? (long)(v->sectors * SECTOR) : err;
}

static long flush(struct rt_volume *v)
{
	if (!(v->dev.driver_features & VIRTIO_BLK_F_FLUSH)) {
		v->dirty = false;
		return 0;
	}
	int st = blk_request(&v->dev, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, false, NULL);
	v->dirty = false;
	return st == 0 ? 0 : EMBER_EIO;
}

long ember_volume_flush(const char *mount)
{
	long err;
	struct rt_volume *v = rt_volume_get(mount, &err);

	return v ? flush(v) : err;
}

void rt_volumes_flush(void)
{
	for (int i = 0; i < nr_volumes; i++)
		if (volumes[i].opened && !volumes[i].err && volumes[i].dirty &&
		    flush(&volumes[i]) != 0)
			kprintf("ember: mount %s: flush failed\n", volumes[i].mount);
}

const char *ember_strerror(long err)
{
	switch (err) {
	case 0:
		return "success";
	case EMBER_ENOMOUNT:
		return "no such mount";
	case EMBER_EIO:
		return "I/O error";
	case EMBER_ERANGE:
		return "beyond the end of the volume";
	case EMBER_ENOENT:
		return "no such file or directory";
	case EMBER_ENOTDIR:
		return "not a directory";
	case EMBER_EISDIR:
		return "is a directory";
	case EMBER_EFS:
		return "unsupported or corrupt file system";
	case EMBER_EROFS:
		return "read-only volume";
	case EMBER_EINVAL:
		return "invalid argument";
	default:
		return err < 0 ? "unknown error" : "no error";
	}
}
