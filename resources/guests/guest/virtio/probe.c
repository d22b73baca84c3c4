/* The `virtio-probe` mode: every virtio_mmio.device= on the cmdline. */
#include "bootinfo.h"
#include "virtio.h"

void mode_virtio_probe(const struct bootinfo *bi)
{
	struct virtio_mmio_info info[VIRTIO_MAX_DEVICES];
	struct virtio_dev d;
	int n = virtio_parse_cmdline(bi->cmdline, info, VIRTIO_MAX_DEVICES);

	if (n == 0) {
		guest_log("virtio none");
		return;
	}
	for (int i = 0; i < n; i++) {
		unsigned long long base = (unsigned long long)info[i].base;
		if (!virtio_probe(&d, &info[i]))
			guest_log("virtio 0x%llx bad-magic 0x%x", base,
				  mmio_read32(d.base + VIRTIO_MMIO_MAGIC_VALUE));
		else if (d.device_id == 0)
			guest_log("virtio 0x%llx absent", base);
		else
			guest_log("virtio 0x%llx irq %u id %u version %u", base, d.irq,
				  d.device_id, d.version);
	}
}
