//! The `ember-c-ember` compiler: a tar.gz of C sources compiled with the
//! host's gcc against ember's own unikernel runtime (`resources/unikernel/`,
//! built by `build.rs` and embedded here) into a PVH-bootable `kernel.elf`.
//!
//! gcc runs as a [`crate::sandbox`] job: the sources are bound read-only at
//! `/src` (the working directory), the runtime at `/rt`, the kernel is
//! written to `/out` and moved out with `O_NOFOLLOW`. Every user file name
//! reaches gcc as `./<path>` (never `@file`, never `-option`), include
//! directories as absolute `/src/...` paths after `-I`.

use super::{sandbox_error, CompileError, CompileInput, CompileOutput, Compiler};
use crate::sandbox::{self, Job, PrivateDir, Status};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

include!(concat!(env!("OUT_DIR"), "/runtime_files.rs"));
// FREESTANDING_CFLAGS and FREESTANDING_LDFLAGS, the flags the runtime is
// built with too (build.rs, resources/cbuild).
include!(concat!(env!("OUT_DIR"), "/cflags.rs"));

/// The kernel file name in `out_dir`.
pub const KERNEL: &str = "kernel.elf";
/// Kernel command line every instance gets.
pub const BOOT_ARGS: &str = "console=ttyS0";
/// Default guest memory.
pub const DEFAULT_MEMORY_MB: u32 = 64;
/// gcc is killed after this long, unless emberd's `--job-timeout-secs`
/// (the sandbox's default timeout) or [`EmberC::with_timeout`] says
/// otherwise.
pub const GCC_TIMEOUT: Duration = Duration::from_secs(120);
/// At most this much of gcc's messages is kept.
pub const MAX_OUTPUT: usize = 64 * 1024;
/// gcc may not write files larger than this (RLIMIT_FSIZE).
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// At most this many `.c` files.
pub const MAX_SOURCES: usize = 4096;
/// Directory depth scanned for sources.
const MAX_DEPTH: usize = 32;

/// Flags for user code (freestanding, no SSE: the guest CPU is emulated):
/// the runtime's code generation flags, fewer warnings than ember's own C,
/// none of the host's headers.
fn user_cflags() -> impl Iterator<Item = &'static str> {
    ["-std=gnu11", "-O2", "-Wall", "-ffreestanding"]
        .into_iter()
        .chain(FREESTANDING_CFLAGS.iter().copied())
        .chain(["-fdiagnostics-color=never", "-nostdinc"])
}

/// `ember-c-ember`.
#[derive(Clone, Debug)]
pub struct EmberC {
    gcc: String,
    /// None: the sandbox's configured job timeout.
    timeout: Option<Duration>,
}

impl Default for EmberC {
    fn default() -> Self {
        Self::new()
    }
}

impl EmberC {
    /// Uses `gcc` from PATH (or `EMBER_GCC` when set).
    pub fn new() -> Self {
        Self {
            gcc: std::env::var("EMBER_GCC").unwrap_or_else(|_| "gcc".into()),
            timeout: None,
        }
    }

    /// Uses the given gcc.
    pub fn with_gcc(gcc: impl Into<String>) -> Self {
        Self {
            gcc: gcc.into(),
            timeout: None,
        }
    }

    /// Changes how long gcc may run (default: the sandbox's job timeout,
    /// [`GCC_TIMEOUT`] unless emberd was told otherwise).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

impl Compiler for EmberC {
    fn base(&self) -> &str {
        "ember"
    }

    fn lang(&self) -> &str {
        "c"
    }

    fn description(&self) -> String {
        DESCRIPTION.to_string()
    }

    fn compile(&self, input: &CompileInput) -> Result<CompileOutput, CompileError> {
        let (sources, include_dirs) = scan_sources(input.src_dir)?;
        if sources.is_empty() {
            return Err(CompileError::NoSources(
                "the ember base needs at least one .c file (with int main(int argc, char **argv))"
                    .into(),
            ));
        }
        std::fs::create_dir_all(input.out_dir)?;
        let gcc = self.gcc_path()?;
        let work = PrivateDir::new("ember-c").map_err(|e| sandbox_error(&self.gcc, e))?;
        let rt = work.path().join("runtime");
        write_runtime(&rt)?;
        let gcc_include = self.gcc_include_dir(&gcc)?;

        let kernel = input.out_dir.join(KERNEL);
        let _ = std::fs::remove_file(&kernel);
        let mut job = self
            .job(&gcc)?
            .ro(input.src_dir, SRC)
            .give(input.src_dir)
            .ro(&rt, RT)
            .cwd(SRC)
            .args(user_cflags())
            .arg("-isystem")
            .arg(&gcc_include)
            .arg("-I")
            .arg(format!("{RT}/include"));
        for d in &include_dirs {
            let rel = d.strip_prefix(input.src_dir).unwrap_or(Path::new(""));
            job = job.arg("-I").arg(Path::new(SRC).join(rel));
        }
        job = job
            .args(FREESTANDING_LDFLAGS)
            .arg("-T")
            .arg(format!("{RT}/ember.lds"))
            .arg(format!("{RT}/crt0.o"))
            // __FILE__ stays "main.c", as before the "./" below.
            .arg("-fmacro-prefix-map=./=")
            // "./" keeps a file named like an option (`-o.c`) or a response
            // file (`@opts.c`) from being read as one.
            .args(sources.iter().map(|s| Path::new(".").join(s)))
            .arg(format!("{RT}/libember.a"))
            .arg("-lgcc")
            .arg("-o")
            .arg(format!("{}/{KERNEL}", sandbox::OUT));
        let run = job.run().map_err(|e| sandbox_error(&self.gcc, e))?;
        let output = clean_paths(&run.log());
        match run.status {
            Status::Exited(0) => {}
            Status::Exited(_) => return Err(CompileError::Failed { output }),
            Status::TimedOut | Status::Signaled(_) => {
                return Err(CompileError::Failed {
                    output: format!("{output}gcc {}", run.describe()),
                })
            }
        }
        run.take_file(KERNEL, &kernel, MAX_FILE_BYTES, 0o644)
            .map_err(|e| sandbox_error(&self.gcc, e))?;
        Ok(CompileOutput {
            kernel: KERNEL.into(),
            initrd: None,
            boot_args: BOOT_ARGS.into(),
            format: "elf-pvh".into(),
            default_memory_mb: DEFAULT_MEMORY_MB,
            log: output,
        })
    }
}

/// Where the sources are inside the job.
const SRC: &str = "/src";
/// Where the runtime is inside the job.
const RT: &str = "/rt";

impl EmberC {
    /// gcc on the host (and, being under the toolchain binds or bound at
    /// its own path, inside the job).
    fn gcc_path(&self) -> Result<PathBuf, CompileError> {
        sandbox::find_program(&self.gcc).ok_or_else(|| CompileError::Tool {
            tool: self.gcc.clone(),
            msg: "not found (install gcc)".into(),
        })
    }

    /// A job running `gcc` with this compiler's limits.
    fn job(&self, gcc: &Path) -> Result<Job, CompileError> {
        let job = Job::new(gcc).map_err(|e| sandbox_error(&self.gcc, e))?;
        let mut l = job.current_limits();
        if let Some(t) = self.timeout {
            l.timeout = t;
        }
        l.max_log_bytes = MAX_OUTPUT;
        let job = job.limits(l).max_file(MAX_FILE_BYTES);
        let in_toolchain = sandbox::config()
            .toolchain
            .iter()
            .any(|t| gcc.starts_with(t));
        Ok(if in_toolchain {
            job
        } else {
            job.ro_exec(gcc, gcc)
        })
    }

    /// gcc's own freestanding headers (stddef.h, stdint.h, stdarg.h, ...).
    fn gcc_include_dir(&self, gcc: &Path) -> Result<PathBuf, CompileError> {
        let tool = |msg: String| CompileError::Tool {
            tool: self.gcc.clone(),
            msg,
        };
        let run = self
            .job(gcc)?
            .arg("-print-file-name=include")
            .run()
            .map_err(|e| tool(e.to_string()))?;
        if !run.success() {
            return Err(tool(format!("{}: {}", run.describe(), run.log())));
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&run.stdout).trim());
        if !dir.join("stddef.h").is_file() {
            return Err(tool(format!(
                "gcc's include directory {} has no stddef.h",
                dir.display()
            )));
        }
        Ok(dir)
    }
}

/// Writes the embedded runtime (crt0.o, libember.a, ember.lds, include/) into `dir`.
/// Directories get mode 0755 and files 0644, so a job's uid can read them.
pub fn write_runtime(dir: &Path) -> std::io::Result<()> {
    for (name, data) in RUNTIME_FILES {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, data)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

/// Every `.c` file under `root` (sorted, relative paths) and the directories
/// holding headers (the root always included). Symlinks are not followed.
fn scan_sources(root: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), CompileError> {
    let mut sources = Vec::new();
    let mut include_dirs = vec![root.to_path_buf()];
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let mut has_header = false;
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let ft = e.file_type()?;
            let path = e.path();
            let ext = path.extension().and_then(|x| x.to_str());
            if ft.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    return Err(CompileError::BadInput(format!(
                        "source tree deeper than {MAX_DEPTH} directories"
                    )));
                }
                stack.push((path, depth + 1));
            } else if ft.is_file() || ft.is_symlink() {
                match ext {
                    Some("c") if ft.is_file() => {
                        if sources.len() == MAX_SOURCES {
                            return Err(CompileError::BadInput(format!(
                                "more than {MAX_SOURCES} .c files"
                            )));
                        }
                        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                        sources.push(rel);
                    }
                    Some("h") => has_header = true,
                    _ => {}
                }
            }
        }
        if has_header && dir != root {
            include_dirs.push(dir);
        }
    }
    sources.sort();
    include_dirs[1..].sort();
    Ok((sources, include_dirs))
}

/// Names the runtime `<ember>/` in gcc's messages and drops the `/src/`
/// and `./` that the job's paths add.
fn clean_paths(output: &str) -> String {
    let mut s = output
        .replace(&format!("{RT}/"), "<ember>/")
        .replace(&format!("{SRC}/"), "")
        .lines()
        .map(|l| l.strip_prefix("./").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    if output.ends_with('\n') {
        s.push('\n');
    }
    s
}

const DESCRIPTION: &str = "\
ember-c-ember: C programs on ember's own unikernel runtime.

The base `ember` is a small unikernel written in this repository: it boots
through PVH on one vCPU, prints to the serial console, passes arguments,
environment and volumes from the kernel command line, drives virtio-blk
volumes and ends with an exit status. Your program is the whole guest: it
runs alone in ring 0, with no processes, threads, interrupts or system calls.

What to upload: a tar.gz of C sources. Every *.c file in the tree (in any
directory) is compiled with gcc and linked into one kernel; exactly one must
define `int main(int argc, char **argv)`. Directories holding *.h files are on
the include path. Compile errors (gcc's messages) are returned with a 400.

Compiler flags: -std=gnu11 -O2 -Wall -ffreestanding -mgeneral-regs-only
-mno-red-zone -fno-pic -fno-stack-protector -nostdinc, linked with
-nostdlib -static -no-pie against the runtime (crt0.o, libember.a, -lgcc).

Headers: <ember.h> declares everything; <stdio.h>, <stdlib.h>, <string.h>,
<ctype.h> and <assert.h> are shims for it, and gcc's freestanding headers
(<stdint.h>, <stddef.h>, <stdarg.h>, <stdbool.h>, <limits.h>) work. Provided:
printf/fprintf/sprintf/snprintf/vsnprintf (%d %i %u %x %X %o %s %c %p %%,
l/ll/z/h modifiers, width, '-' and '0' flags; stdout and stderr both go to
the console), puts, putchar, fputs, fputc; memcpy, memmove, memset, memcmp,
memchr, strlen, strnlen, strcmp, strncmp, strcpy, strncpy, strcat, strncat,
strchr, strrchr, strstr, strdup; atoi, atol, strtol, strtoul, abs, labs;
getenv and environ; malloc, calloc, realloc (a bump allocator over the free
RAM; free only gives back the most recent block); exit, abort, assert;
isdigit and friends, toupper, tolower. Nothing else from libc (no files
through stdio, no time, no sockets).

Arguments and environment: the instance's args become argv[1..] (argv[0] is
\"ember\"; double quotes group words with spaces). Each env entry KEY=VALUE is
visible through getenv(\"KEY\"). The kernel command line is
`console=ttyS0 ember.mount=<mount point>:<n>... KEY=VALUE... -- <args>`.

Volumes: each attached volume has a mount point. Raw access:
ember_volume_read(mount, offset, buf, len), ember_volume_write(...) (any
offset and length; sector read-modify-write is done for you),
ember_volume_size(mount), ember_volume_flush(mount). ext2/3/4 volumes (such
as the ones emberd creates) can be read, read-only, by path:
ember_read_file(\"/data/hello.txt\", buf, max), ember_pread_file(path,
offset, buf, len), ember_file_size(path),
ember_list_dir(\"/data\", callback, ctx). Errors are negative EMBER_E*
values; ember_strerror(err) names them.

Randomness: ember_random(buf, n) fills buf with n bytes of a ChaCha20
stream seeded from RDRAND (when the CPU has it) and the TSC; an instance
restored from a snapshot (warm start) is reseeded by emberd, so no two
instances share a stream.

Exit: returning from main or calling exit(n) flushes written volumes,
prints `ember: exit <n>` on the console and resets the VM, which stops the
instance (the status is in its console log). A CPU fault (division by zero,
invalid opcode, ...) prints `ember: fault vector <v> (<name>) ... rip <addr>`
and exits with 139. abort() and failed assertions
exit with 134.

Limits: no floating point (float/double do not compile: the guest CPU runs
integer code only), no threads, one CPU, a 256 KiB stack, heap = the
instance's memory (default 64 MB) minus the program. The CPU is slow (it may
be emulated): keep work and I/O small. gcc is stopped after 120 s.
";

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let p =
                std::env::temp_dir().join(format!("ember-c-test-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn compile(files: &[(&str, &str)]) -> (Tmp, Result<CompileOutput, CompileError>) {
        let t = Tmp::new("compile");
        let src = t.0.join("src");
        let out = t.0.join("out");
        for (name, text) in files {
            let p = src.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        std::fs::create_dir_all(&src).unwrap();
        let r = EmberC::new().compile(&CompileInput {
            src_dir: &src,
            out_dir: &out,
        });
        (t, r)
    }

    #[test]
    fn runtime_is_embedded() {
        let names: Vec<&str> = RUNTIME_FILES.iter().map(|(n, _)| *n).collect();
        for n in [
            "crt0.o",
            "libember.a",
            "ember.lds",
            "include/ember.h",
            "include/stdio.h",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        let (_, crt0) = RUNTIME_FILES.iter().find(|(n, _)| *n == "crt0.o").unwrap();
        assert_eq!(&crt0[..4], b"\x7fELF");
    }

    #[test]
    fn names_and_description() {
        let c = EmberC::new();
        assert_eq!(c.name(), "ember-c-ember");
        let d = c.description();
        for w in [
            "tar.gz",
            "main",
            "getenv",
            "ember_read_file",
            "floating point",
            "exit",
        ] {
            assert!(d.contains(w), "description lacks {w}");
        }
    }

    #[test]
    fn hello_world_compiles_to_a_pvh_elf() {
        let (t, r) = compile(&[
            (
                "main.c",
                "#include <stdio.h>\n#include \"util/greet.h\"\n\
                 int main(int argc, char **argv) { printf(\"%s %d\\n\", greeting(), argc); return 0; }\n",
            ),
            ("util/greet.h", "const char *greeting(void);\n"),
            ("util/greet.c", "#include <greet.h>\nconst char *greeting(void) { return \"hi\"; }\n"),
        ]);
        let out = r.unwrap();
        assert_eq!(out.kernel, KERNEL);
        assert_eq!(out.format, "elf-pvh");
        assert_eq!(out.boot_args, "console=ttyS0");
        assert_eq!(out.default_memory_mb, 64);
        let elf = std::fs::read(t.0.join("out").join(KERNEL)).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        // The Xen PVH note (name "Xen", type 18) is in the image.
        assert!(elf
            .windows(12)
            .any(|w| w == [4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0]));
        // Nothing left behind but the kernel.
        let left: Vec<_> = std::fs::read_dir(t.0.join("out")).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn compile_error_reports_gcc_messages() {
        let (_t, r) = compile(&[("bad.c", "int main(void) { return undefined_thing; }\n")]);
        match r {
            Err(CompileError::Failed { output }) => {
                assert!(output.contains("undefined_thing"), "{output}");
                assert!(output.contains("bad.c"), "{output}");
                assert!(
                    !output.contains("ember-c-test"),
                    "temp paths leak: {output}"
                );
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn link_errors_and_missing_sources() {
        let (_t, r) = compile(&[("x.c", "int helper(void) { return 1; }\n")]);
        match r {
            Err(CompileError::Failed { output }) => assert!(output.contains("main"), "{output}"),
            other => panic!("expected Failed, got {other:?}"),
        }
        let (_t, r) = compile(&[("README", "no C here")]);
        assert!(matches!(r, Err(CompileError::NoSources(_))), "{r:?}");
    }

    #[test]
    fn floating_point_and_hosted_headers_are_refused() {
        let (_t, r) = compile(&[("f.c", "#include <math.h>\nint main(void) { return 0; }\n")]);
        assert!(
            matches!(&r, Err(CompileError::Failed { output }) if output.contains("math.h")),
            "{r:?}"
        );
        let (_t, r) = compile(&[(
            "f.c",
            "double half(double x) { return x / 2; }\nint main(void) { return (int)half(4); }\n",
        )]);
        assert!(matches!(r, Err(CompileError::Failed { .. })), "{r:?}");
    }

    #[test]
    fn internal_runtime_names_do_not_clash() {
        // serial_putc and blk_request are runtime internals, made local.
        let (_t, r) = compile(&[(
            "m.c",
            "int serial_putc(int c) { return c; }\nint blk_request(void) { return 0; }\n\
             int main(void) { return serial_putc(0) + blk_request(); }\n",
        )]);
        r.unwrap();
    }

    /// A fake gcc: answers -print-file-name=include, then runs `body`.
    fn fake_gcc(t: &Tmp, body: &str) -> String {
        let inc = t.0.join("inc");
        std::fs::create_dir_all(&inc).unwrap();
        std::fs::write(inc.join("stddef.h"), "").unwrap();
        let script = t.0.join("fake-gcc");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nif [ \"$1\" = -print-file-name=include ]; then echo {}; exit 0; fi\n{body}\n",
                inc.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        script.display().to_string()
    }

    fn compile_with(c: &EmberC, t: &Tmp) -> Result<CompileOutput, CompileError> {
        let src = t.0.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("m.c"), "int main(void){return 0;}").unwrap();
        c.compile(&CompileInput {
            src_dir: &src,
            out_dir: &t.0.join("out"),
        })
    }

    /// Processes of job uids whose command line is exactly `argv`.
    fn job_processes(argv: &[&str]) -> Vec<i32> {
        let want: Vec<u8> = argv
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect();
        crate::sandbox::DEFAULT_UIDS
            .flat_map(crate::sandbox::tests_support::processes_of)
            .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok() == Some(want.clone()))
            .collect()
    }

    #[test]
    fn hung_gcc_is_killed_with_its_children() {
        let t = Tmp::new("hang");
        // A child in its own session, and one waited for (like cc1).
        let gcc = fake_gcc(&t, "echo started; setsid sleep 613 & sleep 614; wait");
        let c = EmberC::with_gcc(gcc).with_timeout(Duration::from_millis(500));
        match compile_with(&c, &t) {
            Err(CompileError::Failed { output }) => {
                assert!(output.contains("started"), "{output}");
                assert!(output.contains("did not finish"), "{output}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        // Neither sleep survived the job.
        for secs in ["613", "614"] {
            let left = job_processes(&["sleep", secs]);
            assert!(left.is_empty(), "sleep {secs} survived: {left:?}");
        }
    }

    /// A source named `@opts.c` holding gcc options that would run a shell
    /// if gcc read it as a response file.
    #[test]
    fn response_file_sources_are_plain_sources() {
        let marker = std::env::temp_dir().join(format!("PWNED-{}-ember-c", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let opts = format!("-wrapper /bin/sh,-c,touch {}\n", marker.display());
        let (_t, r) = compile(&[
            ("@opts.c", opts.as_str()),
            ("main.c", "int main(void) { return 0; }\n"),
        ]);
        match r {
            Err(CompileError::Failed { output }) => {
                assert!(output.contains("@opts.c"), "{output}")
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(!marker.exists(), "gcc ran the wrapper");
    }

    #[test]
    fn option_named_sources_are_compiled_as_files() {
        let (t, r) = compile(&[
            ("-o.c", "int helper(void) { return 1; }\n"),
            ("--help.c", "int other(void) { return 2; }\n"),
            (
                "main.c",
                "int helper(void); int other(void);\nint main(void) { return helper() + other(); }\n",
            ),
        ]);
        r.unwrap();
        let left: Vec<_> = std::fs::read_dir(t.0.join("out")).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    /// cc1 reading /dev/zero grows until the job's memory limit stops it.
    #[test]
    fn include_of_dev_zero_fails_cleanly() {
        let started = Instant::now();
        let (_t, r) = compile(&[(
            "main.c",
            "#include \"/dev/zero\"\nint main(void) { return 0; }\n",
        )]);
        match &r {
            Err(CompileError::Failed { output }) => {
                assert!(output.contains("memory"), "{output}")
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(100),
            "{:?}",
            started.elapsed()
        );
    }

    /// Opening a FIFO blocks until a writer comes: the timeout ends it.
    #[test]
    fn include_of_a_fifo_is_stopped_by_the_timeout() {
        let t = Tmp::new("fifo");
        let src = t.0.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(
            src.join("main.c"),
            "#include \"pipe.h\"\nint main(void) { return 0; }\n",
        )
        .unwrap();
        let c = std::ffi::CString::new(src.join("pipe.h").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path alive for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let r = EmberC::new()
            .with_timeout(Duration::from_secs(2))
            .compile(&CompileInput {
                src_dir: &src,
                out_dir: &t.0.join("out"),
            });
        match r {
            Err(CompileError::Failed { output }) => {
                assert!(output.contains("did not finish within 2"), "{output}")
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn gcc_output_is_bounded() {
        let t = Tmp::new("chatty");
        let gcc = fake_gcc(&t, "yes 'error: too much' | head -c 1000000 >&2; exit 1");
        match compile_with(&EmberC::with_gcc(gcc), &t) {
            Err(CompileError::Failed { output }) => {
                assert!(output.len() < MAX_OUTPUT + 100, "{}", output.len());
                assert!(output.ends_with("[output truncated]\n"));
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn missing_gcc_is_a_tool_error() {
        let t = Tmp::new("nogcc");
        std::fs::write(t.0.join("m.c"), "int main(void){return 0;}").unwrap();
        let r = EmberC::with_gcc("/nonexistent/gcc").compile(&CompileInput {
            src_dir: &t.0,
            out_dir: &t.0.join("out"),
        });
        assert!(matches!(r, Err(CompileError::Tool { .. })), "{r:?}");
    }
}
