/*
 * Read-only ext2/ext3/ext4: superblock, group descriptors (32 or 64 bytes,
 * 64bit), inodes, extent trees (any depth) and classic block maps (direct,
 * single, double and triple indirect), inline data for small files, linear
 * directory scans (htree directories are scanned linearly too; their index
 * blocks look like empty entries). Checksums are not verified and the
 * journal is not replayed.
 */
#include "rt.h"

#define EXT4_SB_OFFSET 1024
#define EXT4_MAGIC 0xef53
#define EXT4_ROOT_INO 2
#define EXT4_MAX_BLOCK 4096

#define INCOMPAT_COMPRESSION 0x0001
#define INCOMPAT_FILETYPE 0x0002
#define INCOMPAT_JOURNAL_DEV 0x0008
#define INCOMPAT_META_BG 0x0010
#define INCOMPAT_64BIT 0x0080
#define INCOMPAT_ENCRYPT 0x10000
#define INCOMPAT_UNSUPPORTED \
	(INCOMPAT_COMPRESSION | INCOMPAT_JOURNAL_DEV | INCOMPAT_META_BG | INCOMPAT_ENCRYPT)

#define INODE_FL_EXTENTS 0x80000
#define INODE_FL_INLINE_DATA 0x10000000
#define S_IFMT 0xf000
#define S_IFDIR 0x4000

#define EXTENT_MAGIC 0xf30a
#define EXTENT_MAX_DEPTH 5
#define FT_DIR 2

struct inode {
	uint16_t mode;
	uint64_t size;
	uint32_t flags;
	uint8_t block[60];
};

/* A few cached metadata blocks (group descriptors, inodes, tree nodes, dirs). */
#define CACHE_SLOTS 4
static struct {
	const struct rt_volume *v;
	uint64_t block;
	bool valid;
} cache_tag[CACHE_SLOTS];
static uint8_t cache_data[CACHE_SLOTS][EXT4_MAX_BLOCK] __attribute__((aligned(512)));
static unsigned cache_next;

static uint16_t le16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* A metadata block through the cache; NULL on I/O error or out of range. */
static const uint8_t *get_block(struct rt_volume *v, uint64_t block)
{
	const struct ext4_fs *fs = &v->fs;

	for (unsigned i = 0; i < CACHE_SLOTS; i++)
		if (cache_tag[i].valid && cache_tag[i].v == v && cache_tag[i].block == block)
			return cache_data[i];
	if (block >= fs->blocks)
		return NULL;
	unsigned slot = cache_next++ % CACHE_SLOTS;
	cache_tag[slot].valid = false;
	long n = rt_volume_read(v, block * fs->block_size, cache_data[slot], fs->block_size);
	if (n != (long)fs->block_size)
		return NULL;
	cache_tag[slot].v = v;
	cache_tag[slot].block = block;
	cache_tag[slot].valid = true;
	return cache_data[slot];
}

static int fs_open(struct rt_volume *v)
{
	struct ext4_fs *fs = &v->fs;
	uint8_t sb[1024];

	if (rt_volume_read(v, EXT4_SB_OFFSET, sb, sizeof(sb)) != (long)sizeof(sb))
		return EMBER_EIO;
	if (le16(sb + 0x38) != EXT4_MAGIC)
		return EMBER_EFS;
	uint32_t log = le32(sb + 0x18);
	if (log > 2)
		return EMBER_EFS; /* blocks larger than 4 KiB */
	fs->block_size = 1024u << log;
	fs->incompat = le32(sb + 0x60);
	if (fs->incompat & INCOMPAT_UNSUPPORTED)
		return EMBER_EFS;
	fs->blocks = le32(sb + 0x04);
	if (fs->incompat & INCOMPAT_64BIT)
		fs->blocks |= (uint64_t)le32(sb + 0x150) << 32;
	fs->first_data_block = le32(sb + 0x14);
	uint32_t blocks_per_group = le32(sb + 0x20);
	fs->inodes_per_group = le32(sb + 0x28);
	fs->inode_size = le32(sb + 0x4c) >= 1 ? le16(sb + 0x58) : 128; /* rev 0: 128 */
	fs->desc_size = (fs->incompat & INCOMPAT_64BIT) ? le16(sb + 0xfe) : 32;
	if (fs->desc_size < 32)
		fs->desc_size = 32;
	if (!blocks_per_group || !fs->inodes_per_group || fs->inode_size < 128 ||
	    fs->inode_size > fs->block_size || fs->desc_size > 1024 ||
	    (fs->desc_size & (fs->desc_size - 1)) ||
	    fs->first_data_block >= fs->blocks)
		return EMBER_EFS;
	uint64_t data_blocks = fs->blocks - fs->first_data_block;
	fs->groups = (uint32_t)((data_blocks + blocks_per_group - 1) / blocks_per_group);
	uint64_t volume_blocks = v->sectors * 512 / fs->block_size;
	if (fs->blocks > volume_blocks)
		return EMBER_EFS;
	return 0;
}

static int fs_get(struct rt_volume *v)
{
	if (!v->fs.tried) {
		v->fs.tried = true;
		v->fs.err = fs_open(v);
	}
	return v->fs.err;
}

static int read_inode(struct rt_volume *v, uint32_t ino, struct inode *out)
{
	const struct ext4_fs *fs = &v->fs;

	if (ino == 0)
		return EMBER_EFS;
	uint32_t group = (ino - 1) / fs->inodes_per_group;
	uint32_t index = (ino - 1) % fs->inodes_per_group;
	if (group >= fs->groups)
		return EMBER_EFS;

	uint64_t desc_off = (uint64_t)group * fs->desc_size;
	uint64_t gdt = fs->first_data_block + 1;
	const uint8_t *d = get_block(v, gdt + desc_off / fs->block_size);
	if (!d)
		return EMBER_EIO;
	d += desc_off % fs->block_size;
	uint64_t table = le32(d + 0x08);
	if (fs->desc_size >= 64)
		table |= (uint64_t)le32(d + 0x28) << 32;

	uint64_t off = (uint64_t)index * fs->inode_size;
	const uint8_t *b = get_block(v, table + off / fs->block_size);
	if (!b)
		return EMBER_EIO;
	b += off % fs->block_size;
	out->mode = le16(b + 0x00);
	out->size = le32(b + 0x04) | (uint64_t)le32(b + 0x6c) << 32;
	out->flags = le32(b + 0x20);
	memcpy(out->block, b + 0x28, sizeof(out->block));
	return 0;
}

static bool is_dir(const struct inode *in)
{
	return (in->mode & S_IFMT) == S_IFDIR;
}

/*
 * Extent tree lookup of logical block lb: *phys (0 = hole) and *run, the
 * number of blocks from lb on that stay contiguous (or stay a hole).
 */
static int map_extent(struct rt_volume *v, const struct inode *in, uint32_t lb, uint64_t *phys,
		      uint32_t *run)
{
	const uint8_t *node = in->block;
	size_t node_len = sizeof(in->block);

	for (int level = 0;; level++) {
		if (level > EXTENT_MAX_DEPTH || node_len < 12 || le16(node) != EXTENT_MAGIC)
			return EMBER_EFS;
		uint16_t entries = le16(node + 2);
		uint16_t depth = le16(node + 6);
		if (12 + (size_t)entries * 12 > node_len)
			return EMBER_EFS;
		if (depth == 0) {
			uint32_t next_start = 0xffffffffu;
			for (uint16_t i = 0; i < entries; i++) {
				const uint8_t *e = node + 12 + i * 12;
				uint32_t first = le32(e);
				uint32_t len = le16(e + 4);
				bool uninit = len > 32768;
				if (uninit)
					len -= 32768;
				if (lb >= first && lb - first < len) {
					uint64_t start = le32(e + 8) | (uint64_t)le16(e + 6) << 32;
					*phys = uninit ? 0 : start + (lb - first);
					*run = len - (lb - first);
					return 0;
				}
				if (first > lb && first < next_start)
					next_start = first;
			}
			*phys = 0; /* a hole up to the next extent */
			*run = next_start - lb;
			return 0;
		}
		/* Index node: the last entry starting at or before lb. */
		const uint8_t *pick = NULL;
		for (uint16_t i = 0; i < entries; i++) {
			const uint8_t *e = node + 12 + i * 12;
			if (le32(e) <= lb)
				pick = e;
		}
		if (!pick) {
			*phys = 0;
			*run = 1;
			return 0;
		}
		uint64_t child = le32(pick + 4) | (uint64_t)le16(pick + 8) << 32;
		node = get_block(v, child);
		if (!node)
			return EMBER_EIO;
		node_len = v->fs.block_size;
	}
}

/* Classic (ext2/3) block map: direct, single, double, triple indirect. */
static int map_indirect(struct rt_volume *v, const struct inode *in, uint32_t lb, uint64_t *phys,
			uint32_t *run)
{
	uint32_t per = v->fs.block_size / 4;
	uint32_t idx[4];
	int levels;
	uint64_t lim = lb;

	*run = 1;
	if (lim < 12) {
		*phys = le32(in->block + lim * 4);
		return 0;
	}
	lim -= 12;
	uint32_t slot;
	if (lim < per) {
		levels = 1;
		slot = 12;
		idx[0] = (uint32_t)lim;
	} else if ((lim -= per) < (uint64_t)per * per) {
		levels = 2;
		slot = 13;
		idx[0] = (uint32_t)(lim / per);
		idx[1] = (uint32_t)(lim % per);
	} else {
		lim -= (uint64_t)per * per;
		levels = 3;
		slot = 14;
		idx[0] = (uint32_t)(lim / per / per);
		idx[1] = (uint32_t)(lim / per % per);
		idx[2] = (uint32_t)(lim % per);
		if (idx[0] >= per) {
			*phys = 0;
			return 0;
		}
	}
	uint64_t b = le32(in->block + slot * 4);
	for (int l = 0; l < levels && b; l++) {
		const uint8_t *blk = get_block(v, b);
		if (!blk)
			return EMBER_EIO;
		b = le32(blk + idx[l] * 4);
	}
	*phys = b;
	return 0;
}

static int map_block(struct rt_volume *v, const struct inode *in, uint32_t lb, uint64_t *phys,
		     uint32_t *run)
{
	int err = (in->flags & INODE_FL_EXTENTS) ? map_extent(v, in, lb, phys, run)
						 : map_indirect(v, in, lb, phys, run);
	if (!err && *phys && *phys + *run > v->fs.blocks)
		return EMBER_EFS;
	return err;
}

/* Reads up to len bytes of the inode's data from offset off; returns the count. */
static long read_data(struct rt_volume *v, const struct inode *in, uint64_t off, uint8_t *buf,
		      uint64_t len)
{
	uint32_t bs = v->fs.block_size;

	if (off >= in->size)
		return 0;
	if (len > in->size - off)
		len = in->size - off;
	if (in->flags & INODE_FL_INLINE_DATA) {
		if (in->size > sizeof(in->block))
			return EMBER_EFS; /* the rest lives in an xattr */
		memcpy(buf, in->block + off, len);
		return (long)len;
	}
	uint64_t done = 0;
	while (done < len) {
		uint64_t pos = off + done;
		uint64_t lb = pos / bs;
		uint32_t within = (uint32_t)(pos % bs);
		if (lb > 0xffffffffu)
			return EMBER_EFS;
		uint64_t phys;
		uint32_t run;
		int err = map_block(v, in, (uint32_t)lb, &phys, &run);
		if (err)
			return err;
		if (run == 0)
			run = 1;
		uint64_t want = len - done;
		if (!phys) {
			uint64_t hole = (uint64_t)run * bs - within;
			uint64_t n = hole < want ? hole : want;
			memset(buf + done, 0, n);
			done += n;
		} else if (within == 0 && want >= bs) {
			/* Whole blocks straight into the caller's buffer. */
			uint64_t whole = want / bs;
			uint64_t n = whole < run ? whole : run;
			if (rt_volume_read(v, phys * bs, buf + done, n * bs) != (long)(n * bs))
				return EMBER_EIO;
			done += n * bs;
		} else {
			const uint8_t *b = get_block(v, phys);
			if (!b)
				return EMBER_EIO;
			uint64_t n = bs - within < want ? bs - within : want;
			memcpy(buf + done, b + within, n);
			done += n;
		}
	}
	return (long)done;
}

/* Called per entry; returns true to stop. */
typedef bool (*dirent_fn)(const char *name, uint8_t name_len, uint32_t ino, uint8_t type,
			  void *ctx);

static int scan_dir(struct rt_volume *v, const struct inode *dir, dirent_fn fn, void *ctx)
{
	uint32_t bs = v->fs.block_size;
	uint64_t nblocks = (dir->size + bs - 1) / bs;

	if (dir->flags & INODE_FL_INLINE_DATA)
		return EMBER_EFS;
	for (uint64_t lb = 0; lb < nblocks; lb++) {
		uint64_t phys;
		uint32_t run;
		int err = map_block(v, dir, (uint32_t)lb, &phys, &run);
		if (err)
			return err;
		if (!phys)
			continue;
		const uint8_t *b = get_block(v, phys);
		if (!b)
			return EMBER_EIO;
		for (uint32_t off = 0; off + 8 <= bs;) {
			const uint8_t *e = b + off;
			uint32_t ino = le32(e);
			uint16_t rec_len = le16(e + 4);
			uint8_t name_len = e[6];
			if (rec_len < 8 || (rec_len & 3) || off + rec_len > bs ||
			    (uint32_t)name_len + 8 > rec_len)
				return EMBER_EFS;
			uint8_t type = (v->fs.incompat & INCOMPAT_FILETYPE) ? e[7] : 0;
			/* The get_block cache may be reused by fn; pass a copy of the name. */
			if (ino && name_len) {
				char name[256];
				memcpy(name, e + 8, name_len);
				name[name_len] = '\0';
				if (fn(name, name_len, ino, type, ctx))
					return 0;
				b = get_block(v, phys);
				if (!b)
					return EMBER_EIO;
			}
			off += rec_len;
		}
	}
	return 0;
}

struct lookup {
	const char *name;
	size_t len;
	uint32_t ino;
};

static bool lookup_fn(const char *name, uint8_t name_len, uint32_t ino, uint8_t type, void *ctx)
{
	struct lookup *l = ctx;

	(void)type;
	if (name_len == l->len && memcmp(name, l->name, name_len) == 0) {
		l->ino = ino;
		return true;
	}
	return false;
}

/* Resolves path (relative to the mount root) to an inode. */
static int resolve(struct rt_volume *v, const char *path, struct inode *out)
{
	int err = read_inode(v, EXT4_ROOT_INO, out);

	while (!err) {
		while (*path == '/')
			path++;
		if (!*path)
			return 0;
		const char *end = path;
		while (*end && *end != '/')
			end++;
		size_t len = (size_t)(end - path);
		if (!(len == 1 && path[0] == '.')) {
			if (!is_dir(out))
				return EMBER_ENOTDIR;
			if (len > 255)
				return EMBER_ENOENT;
			struct lookup l = { path, len, 0 };
			err = scan_dir(v, out, lookup_fn, &l);
			if (err)
				return err;
			if (!l.ino)
				return EMBER_ENOENT;
			err = read_inode(v, l.ino, out);
		}
		path = end;
	}
	return err;
}

static int open_path(const char *path, struct rt_volume **vp, struct inode *in)
{
	long err;
	const char *rest;
	struct rt_volume *v = rt_volume_for_path(path, &rest, &err);

	if (!v)
		return (int)err;
	int e = fs_get(v);
	if (e)
		return e;
	*vp = v;
	return resolve(v, rest, in);
}

long ember_read_file(const char *path, void *buf, unsigned long max)
{
	struct rt_volume *v;
	struct inode in;
	int err = open_path(path, &v, &in);

	if (err)
		return err;
	if (is_dir(&in))
		return EMBER_EISDIR;
	if (!buf && max)
		return EMBER_EINVAL;
	return read_data(v, &in, 0, buf, max);
}

long ember_pread_file(const char *path, unsigned long offset, void *buf, unsigned long len)
{
	struct rt_volume *v;
	struct inode in;
	int err = open_path(path, &v, &in);

	if (err)
		return err;
	if (is_dir(&in))
		return EMBER_EISDIR;
	if (!buf && len)
		return EMBER_EINVAL;
	return read_data(v, &in, offset, buf, len);
}

long ember_file_size(const char *path)
{
	struct rt_volume *v;
	struct inode in;
	int err = open_path(path, &v, &in);

	if (err)
		return err;
	if (is_dir(&in))
		return EMBER_EISDIR;
	return (long)in.size;
}

struct lister {
	struct rt_volume *v;
	void (*cb)(const char *name, int is_dir, void *ctx);
	void *ctx;
	int count;
	int err;
};

static bool list_fn(const char *name, uint8_t name_len, uint32_t ino, uint8_t type, void *ctx)
{
	struct lister *l = ctx;

	if ((name_len == 1 && name[0] == '.') || (name_len == 2 && name[0] == '.' && name[1] == '.'))
		return false;
	int dir;
	if (type)
		dir = type == FT_DIR;
	else {
		struct inode in;
		l->err = read_inode(l->v, ino, &in);
		if (l->err)
			return true;
		dir = is_dir(&in);
	}
	l->count++;
	l->cb(name, dir, l->ctx);
	return false;
}

int ember_list_dir(const char *path, void (*cb)(const char *name, int is_dir, void *ctx),
		   void *ctx)
{
	struct rt_volume *v;
	struct inode in;
	int err = open_path(path, &v, &in);

	if (err)
		return err;
	if (!is_dir(&in))
		return EMBER_ENOTDIR;
	if (!cb)
		return EMBER_EINVAL;
	struct lister l = { v, cb, ctx, 0, 0 };
	err = scan_dir(v, &in, list_fn, &l);
	if (err)
		return err;
	return l.err ? l.err : l.count;
}
