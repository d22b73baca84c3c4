/*
 * modload: /init of a linux-* image whose kernel needs modules for ember's
 * devices. Loads every module /etc/ember-modules lists (one path per line,
 * in load order; blank lines and # comments skipped) with finit_module(2),
 * an already loaded module (EEXIST) being fine, then execs the user's
 * program /ember/init with the same argv and environment, so the program
 * still runs as PID 1 with argv[0] "/init". Failures are reported on the
 * console and do not stop the rest. Modules get no parameters; a modular
 * virtio_mmio finds ember's devices through ACPI (DSDT LNRO0005).
 *
 * Built statically by api_server/build.rs and embedded into emberd.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LIST "/etc/ember-modules"
#define PROGRAM "/ember/init"

static char buf[64 * 1024];

static void load(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		dprintf(2, "ember modload: %s: %s\n", path, strerror(errno));
		return;
	}
	if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
		dprintf(2, "ember modload: loading %s: %s\n", path, strerror(errno));
	close(fd);
}

int main(int argc, char **argv, char **envp)
{
	(void)argc;
	int fd = open(LIST, O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		size_t len = 0;
		ssize_t n;
		while (len < sizeof buf - 1 &&
		       (n = read(fd, buf + len, sizeof buf - 1 - len)) > 0)
			len += (size_t)n;
		close(fd);
		buf[len] = 0;
		char *line = buf;
		while (*line) {
			char *nl = strchr(line, '\n');
			if (nl)
				*nl = 0;
			while (*line == ' ' || *line == '\t')
				line++;
			if (*line && *line != '#')
				load(line);
			if (!nl)
				break;
			line = nl + 1;
		}
	}
	execve(PROGRAM, argv, envp);
	dprintf(2, "ember modload: exec %s: %s\n", PROGRAM, strerror(errno));
	return 127;
}
