/*
 * Internal declarations of the ember unikernel runtime. The runtime reuses
 * the test guest's boot code, serial, format, string, cpu, timer and virtio
 * files (resources/guests/guest/), whose headers come in through bootinfo.h
 * and virtio.h.
 */
#ifndef EMBER_RT_H
#define EMBER_RT_H

#include <ember.h>

#include "bootinfo.h"
#include "virtio.h"

#define RT_MAX_MOUNTS 8

/* Read-only ext2/3/4 state of one volume, filled on first use. */
struct ext4_fs {
	bool tried;
	int err;	      /* 0 when usable, else an EMBER_E* code */
	uint32_t block_size;  /* 1024..4096 */
	uint64_t blocks;
	uint32_t first_data_block;
	uint32_t inodes_per_group;
	uint32_t inode_size;
	uint32_t desc_size;
	uint32_t groups;
	uint32_t incompat;
};

/* One ember.mount=<mount>:<n>. */
struct rt_volume {
	const char *mount;
	int index; /* n-th announced virtio block device */
	bool opened;
	int err; /* EMBER_E* if opening failed */
	struct virtio_dev dev;
	uint64_t sectors;
	bool ro;
	bool dirty;
	struct ext4_fs fs;
};

/* start.c */
extern struct bootinfo rt_bootinfo;
void *rt_alloc_aligned(size_t size, size_t align);
/*
 * The command line's words and the restore config's entries go through
 * these (the strings must live for the whole run). Each returns false when
 * the entry is refused: over MAX_ARGS / MAX_ENV / RT_MAX_MOUNTS, an
 * environment word that is not KEY=VALUE with a dot-free KEY, or a mount
 * that is not `<mount point>:<n>` with n < VIRTIO_MAX_DEVICES (logged).
 */
bool rt_add_arg(const char *w);
bool rt_add_env(char *w);
bool rt_add_mount_word(char *val);

/* warm.c: the `ember.warm=1` snapshot point and restore protocol. */
void rt_warm_start(void);

/* random.c: reseeds ember_random's generator with 32 bytes (and the TSC). */
void rt_random_seed(const uint8_t seed[32]);

/* volume.c */
/* False (logged) when RT_MAX_MOUNTS mount points are already known. */
bool rt_add_mount(const char *mount, int index);
/* The volume of this exact mount point, opened; NULL and *err if not usable. */
struct rt_volume *rt_volume_get(const char *mount, long *err);
/* The volume whose mount point is the longest prefix of path; *rest = the rest. */
struct rt_volume *rt_volume_for_path(const char *path, const char **rest, long *err);
long rt_volume_read(struct rt_volume *v, uint64_t offset, void *buf, uint64_t len);
void rt_volumes_flush(void);

#endif
