/*
 * The `pod-agent` test mode: plays ember-agent's wire protocol
 * (agent/src/protocol.rs) over virtio-vsock so that the host side (emberd,
 * ember-vmm's hybrid vsock, the agent client) can be tested on machines
 * where Linux cannot boot. Frames are `cmd: u32 BE | length: u32 BE |
 * length bytes of JSON`. Containers are only records (id, running or
 * exited, code); starting one checks that its rootfs block device holds
 * an ext4 superblock. The real agent (agent/) is tested on the host.
 *
 * Stdio stand-ins, for processes started with "stdio": true (containers
 * and EXECCMD), chosen by cmd[0]:
 * - "stub-echo" [code]: says "stub-echo <id> ready\n" on stdout and
 *   "stub-echo <id> stderr\n" on stderr, echoes every STDIN chunk back on
 *   stdout, and exits with code (default 0) at stdin's end;
 * - "stub-exit" [code] (EXECCMD): says "stub-exit <id>\n" on stdout and
 *   "bye\n" on stderr, then exits with code.
 * Other commands run until killed (containers) or are refused (EXECCMD).
 * RESIZE is logged as "pod-agent resize <id> <rows>x<cols>".
 */
#include "bootinfo.h"
#include "podjson.h"
#include "vsock.h"

/* Bytes of the initrd whose FNV-1a the mode prints. */
#define POD_INITRD_HEAD 4096u

#define PA_DEFAULT_PORT 2718
#define PA_VERSION "pod-agent-guest"
#define PA_HDR 8
#define PA_MAX_PAYLOAD 8192
/* A partial frame (< PA_HDR + PA_MAX_PAYLOAD) plus one packet always fits. */
#define PA_IN_CAP (PA_HDR + PA_MAX_PAYLOAD + VSOCK_BUF)
#define PA_OUT_CAP (PA_MAX_PAYLOAD + 256)
#define PA_LOG_BYTES 400
#define PA_MAX_CONTAINERS 8
#define PA_ID_MAX 64
#define PA_PATH_MAX 128
#define PA_PID_BASE 100
#define PA_STOP_SIGNAL 15
#define PA_POLL_MS 1000
#define PA_CLOSE_MS 2000

#define CMD_DESTROYPOD 4
#define CMD_READY 8
#define CMD_ACK 9
#define CMD_ERROR 10
#define CMD_PING 12
#define CMD_NEWCONTAINER 17
#define CMD_KILLCONTAINER 18
#define CMD_REMOVECONTAINER 22
#define CMD_EVENT 23
#define CMD_SIGNALPROCESS 24
#define CMD_WAITPROCESS 64
#define CMD_EXECCMD 6
#define CMD_STDIN 66
#define CMD_RESIZE 67
#define CMD_LOGS 68
/* Output records kept per process for LOGS, and their largest base64. */
#define PA_LOG_RECS 8
#define PA_LOG_B64 768

#define EXT4_SB_OFFSET 1024
#define EXT4_SB_LEN 1024
#define EXT4_MAGIC_OFF 56
#define EXT4_MAGIC 0xef53

/* An ERROR payload around a message format. */
#define ERR(msg) "{\"message\":\"" msg "\"}"

/* What the connection does after a batch of frames. */
enum verdict { KEEP, CLOSE, DESTROY };

enum stub { STUB_NONE, STUB_ECHO };

/* One kept piece of output (base64, as sent). */
struct logrec {
	uint32_t seq;
	int stream;
	char b64[PA_LOG_B64 + 1];
};

/* A container's main process or an exec'd one. */
struct container {
	bool used;
	bool running;
	bool exec;
	int code;
	enum stub stub;
	int eof_code;
	char id[PA_ID_MAX + 1];
	/* For an exec: its container. */
	char parent[PA_ID_MAX + 1];
	/* Output events sent; the last PA_LOG_RECS small ones are kept. */
	uint32_t seq;
	struct logrec log[PA_LOG_RECS];
};

struct pod {
	struct vsock_state vs;
	const struct bootinfo *bi;
	struct container ct[PA_MAX_CONTAINERS];
	uint8_t in[PA_IN_CAP];
	uint32_t in_len;
};

static uint8_t out_frame[PA_HDR + PA_OUT_CAP];
/* STDIN data (base64, echoed as is). */
static char stdin_b64[PA_MAX_PAYLOAD + 1];
static uint8_t sb_buf[EXT4_SB_LEN] __attribute__((aligned(4096)));
/* The rootfs device is probed while the vsock device keeps its queues. */
static uint8_t blk_qmem[VIRTIO_MAX_QUEUES * VIRTQ_PAGE] __attribute__((aligned(VIRTQ_PAGE)));
static struct virtio_dev blk_dev;

static uint32_t get_be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

struct sink {
	uint8_t *p;
	uint32_t len, cap;
};

static void sink_put(char c, void *ctx)
{
	struct sink *k = ctx;

	if (k->len < k->cap)
		k->p[k->len] = (uint8_t)c;
	k->len++;
}

static void __attribute__((format(printf, 2, 3))) sink_printf(struct sink *k, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fmt_vprintf(sink_put, k, fmt, ap);
	va_end(ap);
}

/* Formats a JSON payload and sends it as one frame. */
static bool __attribute__((format(printf, 3, 4)))
send_frame(struct pod *pd, uint32_t cmd, const char *fmt, ...)
{
	struct sink k = { out_frame + PA_HDR, 0, PA_OUT_CAP };
	va_list ap;

	va_start(ap, fmt);
	fmt_vprintf(sink_put, &k, fmt, ap);
	va_end(ap);
	if (k.len > PA_OUT_CAP) {
		/* cannot happen with the bounded ids and paths; keep the stream sane */
		static const char msg[] = ERR("reply too long");
		cmd = CMD_ERROR;
		k.len = sizeof(msg) - 1;
		memcpy(k.p, msg, k.len);
	}
	put_be32(out_frame, cmd);
	put_be32(out_frame + 4, k.len);
	return vsock_write(&pd->vs, out_frame, PA_HDR + k.len);
}

static bool valid_id(const char *id)
{
	if (!*id)
		return false;
	for (; *id; id++) {
		char c = *id;
		bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			  (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
		if (!ok)
			return false;
	}
	return true;
}

static bool printable(const char *s)
{
	for (; *s; s++) {
		if (*s < 0x20 || *s >= 0x7f)
			return false;
	}
	return true;
}

/* The request's "id" (a valid container id) into id; ERROR if absent. */
static bool req_id(struct pod *pd, const char *p, size_t n, const char *what, char *id)
{
	struct json_span v;

	if (json_get(p, n, "id", &v) && json_string(v, id, PA_ID_MAX + 1) && valid_id(id))
		return true;
	send_frame(pd, CMD_ERROR, ERR("bad %s payload: no valid id"), what);
	return false;
}

static struct container *find(struct pod *pd, const char *id)
{
	for (int i = 0; i < PA_MAX_CONTAINERS; i++) {
		if (pd->ct[i].used && strcmp(pd->ct[i].id, id) == 0)
			return &pd->ct[i];
	}
	return NULL;
}

static struct container *free_slot(struct pod *pd)
{
	for (int i = 0; i < PA_MAX_CONTAINERS; i++) {
		if (!pd->ct[i].used)
			return &pd->ct[i];
	}
	return NULL;
}

static const char b64_chars[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Base64 of s (short texts only) into out. */
static void b64_encode(const char *s, char *out, size_t cap)
{
	size_t n = strlen(s), o = 0;

	for (size_t i = 0; i < n && o + 5 < cap; i += 3) {
		uint32_t v = (uint32_t)(uint8_t)s[i] << 16;
		if (i + 1 < n)
			v |= (uint32_t)(uint8_t)s[i + 1] << 8;
		if (i + 2 < n)
			v |= (uint8_t)s[i + 2];
		out[o++] = b64_chars[(v >> 18) & 63];
		out[o++] = b64_chars[(v >> 12) & 63];
		out[o++] = i + 1 < n ? b64_chars[(v >> 6) & 63] : '=';
		out[o++] = i + 2 < n ? b64_chars[v & 63] : '=';
	}
	out[o] = '\0';
}

/* An output event whose data is already base64; kept for LOGS if small. */
static void send_output_b64(struct pod *pd, struct container *c, int stream, const char *b64)
{
	size_t n = strlen(b64);

	c->seq++;
	if (n <= PA_LOG_B64) {
		struct logrec *r = &c->log[(c->seq - 1) % PA_LOG_RECS];
		r->seq = c->seq;
		r->stream = stream;
		memcpy(r->b64, b64, n + 1);
	}
	send_frame(pd, CMD_EVENT,
		   "{\"event\":\"output\",\"id\":\"%s\",\"stream\":%d,\"data\":\"%s\",\"seq\":%u}",
		   c->id, stream, b64, c->seq);
}

static void send_output(struct pod *pd, struct container *c, int stream, const char *text)
{
	char b64[256];

	b64_encode(text, b64, sizeof(b64));
	send_output_b64(pd, c, stream, b64);
}

static void send_exited(struct pod *pd, struct container *c, int code)
{
	c->running = false;
	c->code = code;
	send_frame(pd, CMD_EVENT, "{\"event\":\"exited\",\"id\":\"%s\",\"code\":%d}", c->id,
		   code);
}

/* Whether the request asks for streamed stdio. */
static bool wants_stdio(const char *p, size_t n)
{
	struct json_span v;

	return json_get(p, n, "stdio", &v) && v.len == 4 && memcmp(v.p, "true", 4) == 0;
}

/* cmd[idx] into out; false if absent or not a plain string. */
static bool cmd_arg(const char *p, size_t n, size_t idx, char *out, size_t size)
{
	struct json_span cmd, v;

	return json_get(p, n, "cmd", &cmd) && json_index(cmd.p, cmd.len, idx, &v) &&
	       json_string(v, out, size);
}

/* cmd[1] as an exit code 0..255, else 0. */
static int cmd_code(const char *p, size_t n)
{
	char arg[8];
	uint32_t code;

	if (!cmd_arg(p, n, 1, arg, sizeof(arg)))
		return 0;
	struct json_span digits = { arg, strlen(arg) };
	return json_uint(digits, &code) && code <= 255 ? (int)code : 0;
}

/* "stub-echo <id> ready" and the like, built without printf's sink. */
static void say(struct pod *pd, struct container *c, int stream, const char *a, const char *b)
{
	const char *id = c->id;
	char text[PA_ID_MAX + 48];
	size_t o = 0;

	for (const char *parts[] = { a, id, b }, **q = parts; q < parts + 3; q++) {
		for (const char *c = *q; *c && o + 1 < sizeof(text); c++)
			text[o++] = *c;
	}
	text[o] = '\0';
	send_output(pd, c, stream, text);
}

static bool is_blk(struct virtio_dev *d, const struct virtio_mmio_info *info)
{
	return virtio_probe(d, info) && d->version == 2 && d->device_id == VIRTIO_ID_BLOCK;
}

/* How many virtio-blk devices the cmdline announces. */
static int blk_count(const struct bootinfo *bi)
{
	struct virtio_mmio_info info[VIRTIO_MAX_DEVICES];
	int n = virtio_parse_cmdline(bi->cmdline, info, VIRTIO_MAX_DEVICES), k = 0;

	for (int i = 0; i < n; i++)
		k += is_blk(&blk_dev, &info[i]);
	return k;
}

/* How many virtio-net devices the cmdline announces (pod interfaces). */
static int net_count(const struct bootinfo *bi)
{
	struct virtio_mmio_info info[VIRTIO_MAX_DEVICES];
	int n = virtio_parse_cmdline(bi->cmdline, info, VIRTIO_MAX_DEVICES), k = 0;

	for (int i = 0; i < n; i++)
		k += virtio_probe(&blk_dev, &info[i]) && blk_dev.device_id == VIRTIO_ID_NET;
	return k;
}

/* The idx-th virtio-blk device in cmdline order, into blk_dev. */
static bool blk_nth(const struct bootinfo *bi, int idx)
{
	struct virtio_mmio_info info[VIRTIO_MAX_DEVICES];
	int n = virtio_parse_cmdline(bi->cmdline, info, VIRTIO_MAX_DEVICES), k = 0;

	for (int i = 0; i < n; i++) {
		if (is_blk(&blk_dev, &info[i]) && k++ == idx) {
			blk_dev.qmem = blk_qmem; /* after virtio_probe, which clears it */
			return true;
		}
	}
	return false;
}

enum rootfs_check { ROOTFS_EXT4, ROOTFS_NO_DEVICE, ROOTFS_NOT_EXT4, ROOTFS_UNREADABLE };

/* /dev/vd<letter>: reads its superblock and looks for the ext4 magic. */
static enum rootfs_check check_rootfs(const struct bootinfo *bi, const char *path, int *status)
{
	static const char prefix[] = "/dev/vd";
	const size_t plen = sizeof(prefix) - 1;

	if (strlen(path) != plen + 1 || memcmp(path, prefix, plen) != 0 || path[plen] < 'a' ||
	    path[plen] > 'z' || !blk_nth(bi, path[plen] - 'a'))
		return ROOTFS_NO_DEVICE;
	if (!blk_init(&blk_dev)) {
		*status = -1;
		return ROOTFS_UNREADABLE;
	}
	memset(sb_buf, 0, sizeof(sb_buf));
	*status = blk_request(&blk_dev, VIRTIO_BLK_T_IN, EXT4_SB_OFFSET / BLK_SECTOR, sb_buf,
			      EXT4_SB_LEN, true, NULL);
	virtio_reset(&blk_dev);
	if (*status != 0)
		return ROOTFS_UNREADABLE;
	uint16_t magic = (uint16_t)(sb_buf[EXT4_MAGIC_OFF] | sb_buf[EXT4_MAGIC_OFF + 1] << 8);
	return magic == EXT4_MAGIC ? ROOTFS_EXT4 : ROOTFS_NOT_EXT4;
}

/* The code of an env pair ["EMBER_STUB_EXIT","<digits>"] (0..255), or -1. */
static int stub_exit_code(const char *p, size_t n)
{
	struct json_span env, pair, v;
	char name[32], val[4];
	uint32_t code;

	if (!json_get(p, n, "env", &env))
		return -1;
	for (size_t i = 0; json_index(env.p, env.len, i, &pair); i++) {
		if (!json_index(pair.p, pair.len, 0, &v) || !json_string(v, name, sizeof(name)) ||
		    strcmp(name, "EMBER_STUB_EXIT") != 0)
			continue;
		struct json_span digits = { val, 0 };
		if (!json_index(pair.p, pair.len, 1, &v) || !json_string(v, val, sizeof(val)))
			continue;
		digits.len = strlen(val);
		if (json_uint(digits, &code) && code <= 255)
			return (int)code;
	}
	return -1;
}

/* Each of "mounts" ({device, path}) must be an ext4 disk; logs them. */
static bool check_mounts(struct pod *pd, const char *id, const char *p, size_t n)
{
	struct json_span mounts, m, v;
	char dev[PA_PATH_MAX + 1], at[PA_PATH_MAX + 1];
	int status = 0;

	if (!json_get(p, n, "mounts", &mounts))
		return true;
	for (size_t i = 0; json_index(mounts.p, mounts.len, i, &m); i++) {
		if (!json_get(m.p, m.len, "device", &v) || !json_string(v, dev, sizeof(dev)) ||
		    !printable(dev) || !json_get(m.p, m.len, "path", &v) ||
		    !json_string(v, at, sizeof(at)) || !printable(at)) {
			send_frame(pd, CMD_ERROR, ERR("bad NEWCONTAINER payload: mount %u"),
				   (unsigned)i);
			return false;
		}
		if (check_rootfs(pd->bi, dev, &status) != ROOTFS_EXT4) {
			send_frame(pd, CMD_ERROR, ERR("volume %s is no ext4 disk"), dev);
			return false;
		}
		guest_log("pod-agent container %s volume %s at %s ext4 ok", id, dev, at);
	}
	return true;
}

/* Logs each of "files" ({path, mode, data}): path, mode and data length. */
static void log_files(const char *id, const char *p, size_t n)
{
	struct json_span files, f, v;
	char path[PA_PATH_MAX + 1];
	uint32_t mode = 0644;

	if (!json_get(p, n, "files", &files))
		return;
	for (size_t i = 0; json_index(files.p, files.len, i, &f); i++) {
		if (!json_get(f.p, f.len, "path", &v) || !json_string(v, path, sizeof(path)) ||
		    !printable(path))
			continue;
		if (json_get(f.p, f.len, "mode", &v))
			json_uint(v, &mode);
		size_t b64 = json_get(f.p, f.len, "data", &v) ? v.len : 0;
		guest_log("pod-agent container %s file %s mode %u base64 %u", id, path,
			  (unsigned)mode, (unsigned)(b64 >= 2 ? b64 - 2 : 0));
	}
}

static void new_container(struct pod *pd, const char *p, size_t n)
{
	char id[PA_ID_MAX + 1], path[PA_PATH_MAX + 1];
	struct json_span rootfs, v;
	struct container *c = NULL;
	int status = 0;

	if (!req_id(pd, p, n, "NEWCONTAINER", id))
		return;
	if (!json_get(p, n, "rootfs", &rootfs) || !json_get(rootfs.p, rootfs.len, "path", &v) ||
	    !json_string(v, path, sizeof(path)) || !printable(path)) {
		send_frame(pd, CMD_ERROR, ERR("bad NEWCONTAINER payload: no valid rootfs path"));
		return;
	}
	if (find(pd, id)) {
		send_frame(pd, CMD_ERROR, ERR("container %s exists"), id);
		return;
	}
	for (int i = 0; i < PA_MAX_CONTAINERS && !c; i++) {
		if (!pd->ct[i].used)
			c = &pd->ct[i];
	}
	if (!c) {
		send_frame(pd, CMD_ERROR, ERR("too many containers (%d)"), PA_MAX_CONTAINERS);
		return;
	}
	switch (check_rootfs(pd->bi, path, &status)) {
	case ROOTFS_NO_DEVICE:
		send_frame(pd, CMD_ERROR, ERR("no such device %s"), path);
		return;
	case ROOTFS_NOT_EXT4:
		send_frame(pd, CMD_ERROR, ERR("%s is not ext4"), path);
		return;
	case ROOTFS_UNREADABLE:
		send_frame(pd, CMD_ERROR, ERR("cannot read %s: status %d"), path, status);
		return;
	case ROOTFS_EXT4:
		break;
	}
	guest_log("pod-agent container %s rootfs %s ext4 ok", id, path);
	if (!check_mounts(pd, id, p, n))
		return;
	log_files(id, p, n);
	memset(c, 0, sizeof(*c));
	c->used = true;
	c->running = true;
	memcpy(c->id, id, sizeof(id));
	send_frame(pd, CMD_ACK, "{\"pid\":%d}", PA_PID_BASE + (int)(c - pd->ct));
	char cmd0[16];
	if (wants_stdio(p, n) && cmd_arg(p, n, 0, cmd0, sizeof(cmd0)) &&
	    strcmp(cmd0, "stub-echo") == 0) {
		c->stub = STUB_ECHO;
		c->eof_code = cmd_code(p, n);
		say(pd, c, 1, "stub-echo ", " ready\n");
		say(pd, c, 2, "stub-echo ", " stderr\n");
	}
	int code = stub_exit_code(p, n);
	if (code >= 0)
		send_exited(pd, c, code);
}

static void kill_container(struct pod *pd, const char *p, size_t n)
{
	char id[PA_ID_MAX + 1];
	struct json_span v;
	uint32_t sig = PA_STOP_SIGNAL;

	if (!req_id(pd, p, n, "KILLCONTAINER", id))
		return;
	if (json_get(p, n, "signal", &v) && (!json_uint(v, &sig) || sig < 1 || sig > 64)) {
		send_frame(pd, CMD_ERROR, ERR("bad KILLCONTAINER payload: signal"));
		return;
	}
	struct container *c = find(pd, id);
	if (!c) {
		send_frame(pd, CMD_ERROR, ERR("no such container %s"), id);
		return;
	}
	/* Its execs end with it. */
	for (int i = 0; i < PA_MAX_CONTAINERS; i++) {
		struct container *e = &pd->ct[i];
		if (e->used && e->exec && e->running && strcmp(e->parent, id) == 0)
			send_exited(pd, e, 128 + (int)sig);
	}
	if (c->running)
		send_exited(pd, c, 128 + (int)sig);
	send_frame(pd, CMD_ACK, "{\"id\":\"%s\",\"code\":%d}", id, c->code);
}

/* Signals whose default action does not end a process. */
static bool signal_ends_process(uint32_t sig)
{
	switch (sig) {
	case 17: /* SIGCHLD */
	case 18: /* SIGCONT */
	case 19: /* SIGSTOP */
	case 20: /* SIGTSTP */
	case 21: /* SIGTTIN */
	case 22: /* SIGTTOU */
	case 23: /* SIGURG */
	case 28: /* SIGWINCH */
		return false;
	default:
		return true;
	}
}

/* SIGNALPROCESS: a container "process" ends with 128 + signal, as one
 * without handlers would (after the ACK, like a real exit event). */
static void signal_process(struct pod *pd, const char *p, size_t n)
{
	char id[PA_ID_MAX + 1];
	struct json_span v;
	uint32_t sig = 0;

	if (!req_id(pd, p, n, "SIGNALPROCESS", id))
		return;
	if (!json_get(p, n, "signal", &v) || !json_uint(v, &sig) || sig < 1 || sig > 64) {
		send_frame(pd, CMD_ERROR, ERR("bad SIGNALPROCESS payload: signal"));
		return;
	}
	struct container *c = find(pd, id);
	if (!c) {
		send_frame(pd, CMD_ERROR, ERR("no such process %s"), id);
		return;
	}
	guest_log("pod-agent signal %u to %s", sig, id);
	send_frame(pd, CMD_ACK, "{}");
	if (c->running && signal_ends_process(sig)) {
		c->running = false;
		c->code = 128 + (int)sig;
		send_frame(pd, CMD_EVENT, "{\"event\":\"exited\",\"id\":\"%s\",\"code\":%d}", id,
			   c->code);
	}
}

static void wait_process(struct pod *pd, const char *p, size_t n)
{
	char id[PA_ID_MAX + 1];

	if (!req_id(pd, p, n, "WAITPROCESS", id))
		return;
	struct container *c = find(pd, id);
	if (!c)
		send_frame(pd, CMD_ERROR, ERR("no such container %s"), id);
	else if (c->running)
		send_frame(pd, CMD_ERROR, ERR("pod-agent guest cannot wait for a running process"));
	else
		send_frame(pd, CMD_ACK, "{\"id\":\"%s\",\"code\":%d}", id, c->code);
}

static void remove_container(struct pod *pd, const char *p, size_t n)
{
	char id[PA_ID_MAX + 1];

	if (!req_id(pd, p, n, "REMOVECONTAINER", id))
		return;
	struct container *c = find(pd, id);
	if (!c) {
		send_frame(pd, CMD_ERROR, ERR("no such container %s"), id);
		return;
	}
	c->used = false;
	for (int i = 0; i < PA_MAX_CONTAINERS; i++) {
		if (pd->ct[i].used && pd->ct[i].exec && strcmp(pd->ct[i].parent, id) == 0)
			pd->ct[i].used = false;
	}
	send_frame(pd, CMD_ACK, "{}");
}

static void exec_cmd(struct pod *pd, const char *p, size_t n)
{
	char id[PA_ID_MAX + 1], parent[PA_ID_MAX + 1], cmd0[16];
	struct json_span v;

	if (!req_id(pd, p, n, "EXECCMD", id))
		return;
	if (!json_get(p, n, "container", &v) || !json_string(v, parent, sizeof(parent))) {
		send_frame(pd, CMD_ERROR, ERR("bad EXECCMD payload: no container"));
		return;
	}
	struct container *pc = find(pd, parent);
	if (!pc || pc->exec) {
		send_frame(pd, CMD_ERROR, ERR("no such container: %s"), parent);
		return;
	}
	if (find(pd, id)) {
		send_frame(pd, CMD_ERROR, ERR("conflict: id %s is already in use"), id);
		return;
	}
	if (!cmd_arg(p, n, 0, cmd0, sizeof(cmd0)) ||
	    (strcmp(cmd0, "stub-echo") != 0 && strcmp(cmd0, "stub-exit") != 0)) {
		send_frame(pd, CMD_ERROR,
			   ERR("starting %s: execve failed: the pod-agent guest runs only stub-echo and stub-exit"),
			   id);
		return;
	}
	struct container *c = free_slot(pd);
	if (!c) {
		send_frame(pd, CMD_ERROR, ERR("too many containers (%d)"), PA_MAX_CONTAINERS);
		return;
	}
	memset(c, 0, sizeof(*c));
	c->used = true;
	c->running = true;
	c->exec = true;
	memcpy(c->id, id, sizeof(id));
	memcpy(c->parent, parent, sizeof(parent));
	guest_log("pod-agent exec %s in %s: %s", id, parent, cmd0);
	send_frame(pd, CMD_ACK, "{\"id\":\"%s\",\"pid\":%d}", id, PA_PID_BASE + (int)(c - pd->ct));
	if (!wants_stdio(p, n))
		return;
	if (strcmp(cmd0, "stub-echo") == 0) {
		c->stub = STUB_ECHO;
		c->eof_code = cmd_code(p, n);
		say(pd, c, 1, "stub-echo ", " ready\n");
		say(pd, c, 2, "stub-echo ", " stderr\n");
	} else {
		say(pd, c, 1, "stub-exit ", "\n");
		send_output(pd, c, 2, "bye\n");
		send_exited(pd, c, cmd_code(p, n));
	}
}

static void stdin_cmd(struct pod *pd, const char *p, size_t n)
{
	char id[PA_ID_MAX + 1];
	struct json_span v;

	if (!req_id(pd, p, n, "STDIN", id))
		return;
	struct container *c = find(pd, id);
	if (!c) {
		send_frame(pd, CMD_ERROR, ERR("no such process: %s"), id);
		return;
	}
	if (c->stub != STUB_ECHO || !c->running) {
		send_frame(pd, CMD_ERROR, ERR("bad parameter: the stdin of %s is closed"), id);
		return;
	}
	stdin_b64[0] = '\0';
	if (json_get(p, n, "data", &v) && !json_string(v, stdin_b64, sizeof(stdin_b64))) {
		send_frame(pd, CMD_ERROR, ERR("bad STDIN payload: data"));
		return;
	}
	if (stdin_b64[0])
		send_output_b64(pd, c, 1, stdin_b64);
	if (json_get(p, n, "eof", &v) && v.len == 4 && memcmp(v.p, "true", 4) == 0) {
		guest_log("pod-agent stdin of %s closed", id);
		send_exited(pd, c, c->eof_code);
	}
	send_frame(pd, CMD_ACK, "{}");
}

/* The kept records, oldest first (the guest has no clock: time_ns 0). */
static void logs_cmd(struct pod *pd, const char *p, size_t n)
{
	static char body[PA_OUT_CAP];
	char id[PA_ID_MAX + 1];
	size_t o = 0;

	if (!req_id(pd, p, n, "LOGS", id))
		return;
	struct container *c = find(pd, id);
	if (!c) {
		send_frame(pd, CMD_ERROR, ERR("no such process: %s"), id);
		return;
	}
	uint32_t first = c->seq > PA_LOG_RECS ? c->seq - PA_LOG_RECS + 1 : 1;
	for (uint32_t seq = first; seq <= c->seq; seq++) {
		const struct logrec *r = &c->log[(seq - 1) % PA_LOG_RECS];
		if (r->seq != seq)
			continue; /* too big to keep */
		struct sink k = { (uint8_t *)body + o, 0, (uint32_t)(sizeof(body) - o - 1) };
		sink_printf(&k, "%s{\"seq\":%u,\"stream\":%d,\"time_ns\":0,\"data\":\"%s\"}",
			      o ? "," : "", seq, r->stream, r->b64);
		if (k.len > k.cap)
			break;
		o += k.len;
	}
	body[o] = '\0';
	send_frame(pd, CMD_ACK, "{\"id\":\"%s\",\"records\":[%s]}", id, body);
}

static void resize_cmd(struct pod *pd, const char *p, size_t n)
{
	char id[PA_ID_MAX + 1];
	struct json_span v;
	uint32_t rows = 0, cols = 0;

	if (!req_id(pd, p, n, "RESIZE", id))
		return;
	if (!json_get(p, n, "rows", &v) || !json_uint(v, &rows) || !json_get(p, n, "cols", &v) ||
	    !json_uint(v, &cols)) {
		send_frame(pd, CMD_ERROR, ERR("bad RESIZE payload"));
		return;
	}
	if (!find(pd, id)) {
		send_frame(pd, CMD_ERROR, ERR("no such process: %s"), id);
		return;
	}
	guest_log("pod-agent resize %s %ux%u", id, rows, cols);
	send_frame(pd, CMD_ACK, "{}");
}

static enum verdict handle(struct pod *pd, uint32_t cmd, const char *p, size_t n)
{
	switch (cmd) {
	case CMD_PING:
		send_frame(pd, CMD_ACK, "{\"version\":\"" PA_VERSION "\"}");
		break;
	case CMD_NEWCONTAINER:
		new_container(pd, p, n);
		break;
	case CMD_KILLCONTAINER:
		kill_container(pd, p, n);
		break;
	case CMD_WAITPROCESS:
		wait_process(pd, p, n);
		break;
	case CMD_REMOVECONTAINER:
		remove_container(pd, p, n);
		break;
	case CMD_SIGNALPROCESS:
		signal_process(pd, p, n);
		break;
	case CMD_EXECCMD:
		exec_cmd(pd, p, n);
		break;
	case CMD_STDIN:
		stdin_cmd(pd, p, n);
		break;
	case CMD_RESIZE:
		resize_cmd(pd, p, n);
		break;
	case CMD_LOGS:
		logs_cmd(pd, p, n);
		break;
	case CMD_DESTROYPOD:
		send_frame(pd, CMD_ACK, "{}");
		return DESTROY;
	default:
		send_frame(pd, CMD_ERROR, ERR("unsupported command %u"), cmd);
		break;
	}
	return KEEP;
}

static void log_frame(uint32_t cmd, uint32_t len, const uint8_t *p)
{
	char text[PA_LOG_BYTES + 1];
	uint32_t n = len < PA_LOG_BYTES ? len : PA_LOG_BYTES;

	guest_log("pod-agent recv cmd %u len %u", cmd, len);
	for (uint32_t i = 0; i < n; i++)
		text[i] = p[i] >= 0x20 && p[i] < 0x7f ? (char)p[i] : '?';
	text[n] = '\0';
	guest_log("pod-agent payload %s", text);
}

/* Handles every complete frame in pd->in and keeps the partial rest. */
static enum verdict drain_frames(struct pod *pd)
{
	enum verdict v = KEEP;
	uint32_t off = 0;

	while (v == KEEP && pd->in_len - off >= PA_HDR) {
		const uint8_t *h = pd->in + off;
		uint32_t cmd = get_be32(h), len = get_be32(h + 4);
		if (len > PA_MAX_PAYLOAD) {
			/* The stream cannot be resynchronised: answer and close. */
			guest_log("pod-agent recv cmd %u len %u", cmd, len);
			send_frame(pd, CMD_ERROR,
				   ERR("frame payload of %u bytes exceeds the %u-byte limit"), len,
				   PA_MAX_PAYLOAD);
			return CLOSE;
		}
		if (pd->in_len - off < PA_HDR + len)
			break;
		log_frame(cmd, len, h + PA_HDR);
		v = handle(pd, cmd, (const char *)h + PA_HDR, len);
		off += PA_HDR + len;
	}
	pd->in_len -= off;
	memmove(pd->in, pd->in + off, pd->in_len);
	return v;
}

/* Full shutdown, then the host's RST (which it sends once our data is out). */
static void close_gracefully(struct vsock_state *s)
{
	int op;

	vsock_send(s, VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_BOTH, NULL, 0);
	do {
		op = vsock_next(s, PA_CLOSE_MS);
		if (op == VSOCK_OP_REQUEST)
			vsock_rst_reply(s);
	} while (op >= 0 && op != VSOCK_OP_RST);
	if (op != VSOCK_OP_RST)
		vsock_send(s, VSOCK_OP_RST, 0, NULL, 0);
	s->c.active = false;
}

/* One host connection; true when it ended with DESTROYPOD. */
static bool serve(struct pod *pd)
{
	struct vsock_state *s = &pd->vs;

	pd->in_len = 0;
	send_frame(pd, CMD_READY, "{\"version\":\"" PA_VERSION "\",\"pid1\":true}");
	for (;;) {
		int op = vsock_next(s, PA_POLL_MS);
		if (op == VSOCK_OP_REQUEST) {
			vsock_rst_reply(s); /* one connection at a time */
			continue;
		}
		if (op == VSOCK_OP_RST) {
			s->c.active = false;
			return false;
		}
		if (op == VSOCK_OP_SHUTDOWN) {
			vsock_send(s, VSOCK_OP_RST, 0, NULL, 0);
			s->c.active = false;
			return false;
		}
		if (op != VSOCK_OP_RW)
			continue;
		enum verdict v = CLOSE;
		if (pd->in_len + s->len <= PA_IN_CAP) {
			memcpy(pd->in + pd->in_len, s->data, s->len);
			pd->in_len += s->len;
			v = drain_frames(pd);
		}
		if (v == CLOSE) {
			vsock_send(s, VSOCK_OP_RST, 0, NULL, 0);
			s->c.active = false;
			return false;
		}
		if (v == DESTROY) {
			guest_log("pod-agent destroy");
			close_gracefully(s);
			return true;
		}
	}
}

void mode_pod_agent(const struct bootinfo *bi)
{
	static struct pod pd;

	memset(&pd, 0, sizeof(pd));
	pd.bi = bi;
	if (bi->has_initrd)
		/* Only the head: a pod initramfs is megabytes, and ring-0 code
		 * is emulated on the development host (about 270 ns per
		 * instruction), so hashing all of it would take tens of seconds. */
		guest_log("pod-agent initrd size %llu head-fnv1a 0x%08x",
			  (unsigned long long)bi->initrd_size,
			  fnv1a32(phys_to_virt(bi->initrd_addr),
				  bi->initrd_size < POD_INITRD_HEAD ? bi->initrd_size : POD_INITRD_HEAD));
	else
		guest_log("pod-agent initrd none");
	guest_log("pod-agent disks %d", blk_count(bi));
	guest_log("pod-agent nics %d", net_count(bi));
	if (!vsock_start(bi, &pd.vs))
		return;
	uint32_t port = vsock_cmdline_port(bi, "ember.vsock_listen", PA_DEFAULT_PORT);
	for (;;) {
		guest_log("pod-agent listening on port %u", port);
		while (vsock_accept(&pd.vs, port, PA_POLL_MS) <= 0)
			;
		guest_log("pod-agent connection accepted");
		if (serve(&pd))
			break;
		guest_log("pod-agent connection closed");
	}
	vsock_stop(&pd.vs);
}
