/*
 * ember unikernel runtime: the whole public API.
 *
 * A program is a freestanding C program with `int main(int argc, char **argv)`
 * linked against crt0.o + libember.a. It runs alone in ring 0 on one vCPU of
 * an ember microVM: no processes, no threads, no floating point (the code is
 * built with -mgeneral-regs-only), no interrupts.
 *
 * Kernel command line: `<boot args> ember.mount=<mount point>:<n>...
 * KEY=VALUE... -- <args>`. Words after `--` are argv[1..] (argv[0] is
 * "ember"); `KEY=VALUE` words before `--` (KEY without a dot) are the
 * environment; `ember.mount=/data:0` backs mount point /data with the first
 * announced virtio block device, `:1` the second, and so on. Double quotes
 * group words with spaces ("a b" or KEY="a b"); the quotes are removed.
 *
 * Warm starts: with `ember.warm=1` on the command line the runtime stops
 * before main at a snapshot point (it prints `ember: snapshot point`); a
 * guest restored from that snapshot fetches its own argv, environment,
 * mounts and random seed from the host over vsock (port 1024), adds them
 * after the command line's as if they had been written there, and runs
 * main. It prints `ember: no restore config` or `ember: bad restore config`
 * and exits with status 1 when that fails. A program cannot tell a warm
 * start from a cold one, except that block devices and the clock were
 * first touched after the restore.
 *
 * Returning from main or calling exit(n) prints `ember: exit <n>` on the
 * console and resets the machine (the VMM then exits 0). A CPU exception
 * prints `ember: fault vector <v> (<name>) error .. rip .. rsp ..` and
 * exits with status 139.
 *
 * The <stdio.h>, <stdlib.h>, <string.h> and <ctype.h> shims include this
 * header, so simple C programs compile unchanged.
 */
#ifndef EMBER_PUBLIC_H
#define EMBER_PUBLIC_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- stdio (everything goes to the serial console, COM1) ---- */
typedef struct ember_file FILE;
extern FILE *stdout;
extern FILE *stderr;
#define EOF (-1)

int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
int fprintf(FILE *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int vfprintf(FILE *f, const char *fmt, va_list ap);
int sprintf(char *buf, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int snprintf(char *buf, size_t size, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int puts(const char *s);
int putchar(int c);
int fputs(const char *s, FILE *f);
int fputc(int c, FILE *f);
int putc(int c, FILE *f);
int fflush(FILE *f);

/* ---- string ---- */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
void *memchr(const void *s, int c, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strcpy(char *dst, const char *src);
char *strncpy(char *dst, const char *src, size_t n);
char *strcat(char *dst, const char *src);
char *strncat(char *dst, const char *src, size_t n);
char *strchr(const char *s, int c);
char *strrchr(const char *s, int c);
char *strstr(const char *haystack, const char *needle);
char *strdup(const char *s);

/* ---- stdlib ---- */
#define EXIT_SUCCESS 0
#define EXIT_FAILURE 1
int atoi(const char *s);
long atol(const char *s);
long strtol(const char *s, char **end, int base);
unsigned long strtoul(const char *s, char **end, int base);
int abs(int v);
long labs(long v);
char *getenv(const char *name);
extern char **environ;
/* Bump allocator over the free RAM after the program; 16-byte aligned. */
void *malloc(size_t size);
void *calloc(size_t n, size_t size);
void *realloc(void *p, size_t size);
/* Only the most recent allocation is really given back. */
void free(void *p);
void exit(int status) __attribute__((noreturn));
/* Prints `ember: abort`, then exits with status 134. */
void abort(void) __attribute__((noreturn));

/* ---- ctype ---- */
int isdigit(int c);
int isxdigit(int c);
int isalpha(int c);
int isalnum(int c);
int isspace(int c);
int isupper(int c);
int islower(int c);
int isprint(int c);
int ispunct(int c);
int toupper(int c);
int tolower(int c);

/* ---- volumes ---- */
/* Errors (all negative) returned by the ember_* functions below. */
#define EMBER_ENOMOUNT (-1)  /* no ember.mount covers the path / mount point */
#define EMBER_EIO (-2)	     /* device missing, failed to initialise, or I/O error */
#define EMBER_ERANGE (-3)    /* beyond the end of the volume */
#define EMBER_ENOENT (-4)    /* no such file or directory */
#define EMBER_ENOTDIR (-5)   /* a path component is not a directory */
#define EMBER_EISDIR (-6)    /* a directory where a file was expected */
#define EMBER_EFS (-7)	     /* not an ext2/3/4 file system, or unsupported feature */
#define EMBER_EROFS (-8)     /* the volume is read-only */
#define EMBER_EINVAL (-9)    /* bad argument */
const char *ember_strerror(long err);

/*
 * Raw access to the volume mounted at `mount` (exactly as in ember.mount=).
 * Any offset/length: unaligned writes read-modify-write their sectors.
 * Reads stop at the end of the volume (0 at or beyond it); writes that do not
 * fit return EMBER_ERANGE. Return: bytes transferred or an error.
 */
long ember_volume_read(const char *mount, unsigned long offset, void *buf, unsigned long len);
long ember_volume_write(const char *mount, unsigned long offset, const void *buf,
			unsigned long len);
/* Size in bytes, or an error. */
long ember_volume_size(const char *mount);
/* Flushes the device's write cache (done for every written volume at exit). */
long ember_volume_flush(const char *mount);

/*
 * Read-only ext2/ext3/ext4 access. `path` is absolute and starts with a mount
 * point (the longest matching one wins; a mount point "/" covers everything),
 * e.g. "/data/dir/hello.txt". Extent-mapped and block-mapped inodes, 1-4 KiB
 * blocks, 64bit, flex_bg, metadata_csum (checksums not verified), no journal
 * replay.
 */
/* Copies up to `max` bytes of the file; returns the bytes copied or an error. */
long ember_read_file(const char *path, void *buf, unsigned long max);
/* Copies up to `len` bytes from `offset` on; 0 at or beyond the end of the file. */
long ember_pread_file(const char *path, unsigned long offset, void *buf, unsigned long len);
/* The file's size in bytes, or an error (EMBER_EISDIR for a directory). */
long ember_file_size(const char *path);
/*
 * Calls cb for each entry of the directory (without "." and ".."), in on-disk
 * order; returns the number of entries or an error.
 */
int ember_list_dir(const char *path, void (*cb)(const char *name, int is_dir, void *ctx),
		   void *ctx);

/* ---- randomness ---- */
/*
 * Fills buf with n random bytes from a ChaCha20 generator (never fails,
 * never blocks). Seeded on first use from RDRAND (when the CPU has it) and
 * the TSC; a guest restored from a snapshot is reseeded with 32 bytes the
 * host drew from its own getrandom, so restored copies of one snapshot
 * never share a stream.
 */
void ember_random(void *buf, size_t n);

#ifdef __cplusplus
}
#endif

#endif
