//! End-to-end tests of the ember unikernel runtime: C sources compiled by
//! the `ember-c-ember` compiler, booted with the real ember-vmm (PVH), with
//! argv/env from `render_cmdline`, ext4 volumes made by mkfs.ext4 and a raw
//! volume attached as virtio-blk drives.

use api_server::build::ember::EmberC;
use api_server::build::{render_cmdline, CompileError, CompileInput, Compiler};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{workspace_bin, TempDir};

/// Generous bound for one guest run; hitting it fails the test instead of hanging.
const PATIENCE: Duration = Duration::from_secs(60);

/// The test program: argv[1] picks what it does.
const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <assert.h>
#include "fnv.h"

static void show(const char *name, int is_dir, void *ctx)
{
	(void)ctx;
	printf("entry %s %s\n", name, is_dir ? "dir" : "file");
}

static char buf[65536];

static int cmd_hello(int argc, char **argv)
{
	printf("argc %d\n", argc);
	for (int i = 0; i < argc; i++)
		printf("argv[%d]=<%s>\n", i, argv[i]);
	printf("GREETING=<%s> N=<%s> MISSING=<%s>\n", getenv("GREETING"), getenv("N"),
	       getenv("MISSING") ? getenv("MISSING") : "(none)");
	char *p = malloc(100), *q = malloc(100);
	printf("malloc %s\n", p && q && q >= p + 100 ? "ok" : "bad");
	printf("fmt %05d|%-3s|%3s|%x|%lu|%ld|%c|%%\n", 42, "a", "b", 0xbeef, 18446744073709551615ul,
	       -5l, 'z');
	exit(atoi(getenv("N")));
}

static int cmd_read(char *path)
{
	char *at = strchr(path, '@');
	if (at) {
		*at = '\0';
		unsigned long off = strtoul(at + 1, NULL, 10);
		long n = ember_pread_file(path, off, buf, 4096);
		if (n < 0)
			printf("pread %s error %s\n", path, ember_strerror(n));
		else
			printf("pread %s at %lu bytes %ld fnv 0x%08x\n", path, off, n, fnv1a(buf, n));
		return n < 0;
	}
	long size = ember_file_size(path);
	long n = ember_read_file(path, buf, sizeof(buf));
	if (n < 0) {
		printf("read %s error %s\n", path, ember_strerror(n));
		return 1;
	}
	printf("read %s size %ld bytes %ld fnv 0x%08x\n", path, size, n, fnv1a(buf, n));
	return 0;
}

static int cmd_list(const char *path)
{
	int n = ember_list_dir(path, show, NULL);
	if (n < 0)
		printf("list %s error %s\n", path, ember_strerror(n));
	else
		printf("list %s count %d\n", path, n);
	return 0;
}

static int cmd_raw(const char *mount)
{
	static const char msg[] = "written by the unikernel";
	char back[sizeof(msg)];
	long size = ember_volume_size(mount);
	long w = ember_volume_write(mount, 1000, msg, sizeof(msg));
	memset(back, 0, sizeof(back));
	long r = ember_volume_read(mount, 1000, back, sizeof(back));
	printf("raw size %ld write %ld read %ld match %d\n", size, w, r,
	       memcmp(back, msg, sizeof(msg)) == 0);
	long end = ember_volume_write(mount, (unsigned long)size - 4, msg, 8);
	printf("raw past-end %s\n", ember_strerror(end));
	memset(buf, 0, 2048);
	r = ember_volume_read(mount, 0, buf, 2048);
	printf("raw head %ld fnv 0x%08x\n", r, fnv1a(buf, 2048));
	return 0;
}

int main(int argc, char **argv)
{
	int status = 0;
	if (argc < 2)
		return 99;
	if (strcmp(argv[1], "hello") == 0)
		return cmd_hello(argc, argv);
	/* fs <paths to read> -- <dirs to list> ; raw <mount> */
	if (strcmp(argv[1], "raw") == 0)
		return cmd_raw(argv[2]);
	if (strcmp(argv[1], "fault") == 0) {
		volatile int zero = 0, n = 1000;
		printf("dividing\n");
		return n / zero;
	}
	if (strcmp(argv[1], "assert") == 0) {
		assert(argc == 99);
		return 0;
	}
	int i = 2;
	for (; i < argc && strcmp(argv[i], "+") != 0; i++)
		status |= cmd_read(argv[i]);
	for (i++; i < argc; i++)
		cmd_list(argv[i]);
	return status;
}
"#;

const FNV_H: &str = r#"
#include <stdint.h>
static inline uint32_t fnv1a(const void *p, long n)
{
	const uint8_t *b = p;
	uint32_t h = 0x811c9dc5u;
	for (long i = 0; i < n; i++)
		h = (h ^ b[i]) * 0x01000193u;
	return h;
}
"#;

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Compiles PROGRAM into `dir/out/kernel.elf`.
fn build_program(dir: &TempDir) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("include")).unwrap();
    std::fs::write(src.join("main.c"), PROGRAM).unwrap();
    std::fs::write(src.join("include/fnv.h"), FNV_H).unwrap();
    let out = dir.join("out");
    let r = EmberC::new()
        .compile(&CompileInput {
            src_dir: &src,
            out_dir: &out,
        })
        .unwrap_or_else(|e| panic!("compile failed: {e}"));
    out.join(r.kernel)
}

/// Boots `kernel` with `cmdline` and the given drives; returns the console output.
fn boot(dir: &TempDir, kernel: &Path, cmdline: &str, drives: &[&Path]) -> String {
    let drives: Vec<_> = drives
        .iter()
        .enumerate()
        .map(|(i, p)| {
            serde_json::json!({
                "drive_id": format!("v{i}"),
                "path_on_host": p,
                "is_root_device": false,
                "is_read_only": false,
            })
        })
        .collect();
    let cfg = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": cmdline},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": drives,
    });
    let cfg_path = dir.join("vm.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let stdout = dir.join("vmm.stdout");
    let stderr = dir.join("vmm.stderr");
    let mut child = Command::new(workspace_bin("vmm", "ember-vmm"))
        .arg("--no-api")
        .arg("--config-file")
        .arg(&cfg_path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn ember-vmm");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > PATIENCE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = std::fs::read_to_string(&stdout).unwrap_or_default();
    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
    match status {
        Some(st) if st.success() => out,
        other => panic!("ember-vmm ended with {other:?}\nstdout:\n{out}\nstderr:\n{err}"),
    }
}

fn assert_lines(out: &str, want: &[&str]) {
    for w in want {
        assert!(
            out.lines().any(|l| l == *w),
            "console lacks line {w:?}:\n{out}"
        );
    }
}

/// An ext4 image of `root`'s contents (no journal, as emberd makes them).
fn mkfs(root: &Path, img: &Path, block_size: u32) {
    std::fs::File::create(img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-b",
            &block_size.to_string(),
            "-d",
        ])
        .arg(root)
        .arg(img)
        .output()
        .expect("mkfs.ext4 (e2fsprogs) is needed");
    assert!(
        out.status.success(),
        "mkfs.ext4 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn args_env_and_exit_status() {
    let t = TempDir::new("rt-hello");
    let kernel = build_program(&t);
    let mut env = BTreeMap::new();
    env.insert("GREETING".to_string(), "hello world".to_string());
    env.insert("N".to_string(), "3".to_string());
    let cmdline = render_cmdline("console=ttyS0", &[], &env, "hello one  two").unwrap();
    let out = boot(&t, &kernel, &cmdline, &[]);
    assert_lines(
        &out,
        &[
            "argc 4",
            "argv[0]=<ember>",
            "argv[1]=<hello>",
            "argv[2]=<one>",
            "argv[3]=<two>",
            "GREETING=<hello world> N=<3> MISSING=<(none)>",
            "malloc ok",
            "fmt 00042|a  |  b|beef|18446744073709551615|-5|z|%",
            "ember: exit 3",
        ],
    );
    // Quoted words with spaces after `--` stay one argument.
    let out = boot(
        &t,
        &kernel,
        "console=ttyS0 N=0 GREETING=x -- hello \"two words\" last",
        &[],
    );
    assert_lines(
        &out,
        &[
            "argc 4",
            "argv[2]=<two words>",
            "argv[3]=<last>",
            "ember: exit 0",
        ],
    );
}

#[test]
fn faults_and_failed_assertions_end_the_program() {
    let t = TempDir::new("rt-fault");
    let kernel = build_program(&t);
    let out = boot(&t, &kernel, "console=ttyS0 -- fault", &[]);
    assert_lines(&out, &["dividing", "ember: exit 139"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("ember: fault vector 0 (divide error) error 0x0 rip 0x")),
        "{out}"
    );
    let out = boot(&t, &kernel, "console=ttyS0 -- assert", &[]);
    assert_lines(&out, &["ember: abort", "ember: exit 134"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("ember: assertion failed: argc == 99 (main.c:")),
        "{out}"
    );
}

fn fs_tree(t: &TempDir) -> (PathBuf, Vec<u8>, Vec<u8>, Vec<u8>) {
    let root = t.join("tree");
    std::fs::create_dir_all(root.join("docs/deep")).unwrap();
    std::fs::write(root.join("hello.txt"), "hello from ext4\n").unwrap();
    // 5000 bytes: several blocks with a partial last one.
    let big: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(root.join("docs/big.bin"), &big).unwrap();
    std::fs::write(root.join("docs/deep/x"), "x").unwrap();
    // A sparse file with 6 data runs: more extents than fit in the inode, so
    // mkfs makes a depth-1 extent tree (holes read back as zeros).
    let mut sparse = vec![0u8; 6 * 8192 + 1024];
    let f = std::fs::File::create(root.join("docs/sparse.bin")).unwrap();
    for k in 0..6usize {
        let chunk: Vec<u8> = (0..1024).map(|i| (k * 31 + i) as u8 | 1).collect();
        std::os::unix::fs::FileExt::write_at(&f, &chunk, (k * 8192) as u64).unwrap();
        sparse[k * 8192..k * 8192 + 1024].copy_from_slice(&chunk);
    }
    f.set_len(sparse.len() as u64).unwrap();
    // A directory spanning several blocks.
    std::fs::create_dir_all(root.join("many")).unwrap();
    for i in 0..100 {
        std::fs::write(
            root.join(format!("many/file-with-a-longish-name-{i:03}")),
            "",
        )
        .unwrap();
    }
    // 400 runs of 1 KiB every 2 KiB: with 1 KiB blocks a depth-2 tree.
    let f = std::fs::File::create(root.join("docs/many.bin")).unwrap();
    let mut many = vec![0u8; 399 * 2048 + 1024];
    for k in 0..400usize {
        let chunk: Vec<u8> = (0..1024).map(|i| (k * 7 + i) as u8 | 1).collect();
        std::os::unix::fs::FileExt::write_at(&f, &chunk, (k * 2048) as u64).unwrap();
        many[k * 2048..k * 2048 + 1024].copy_from_slice(&chunk);
    }
    (root, big, sparse, many)
}

#[test]
fn reads_files_and_lists_dirs_on_ext4_volumes() {
    let t = TempDir::new("rt-ext4");
    let kernel = build_program(&t);
    let (root, big, sparse, many) = fs_tree(&t);
    let img1k = t.join("vol1k.img");
    let img4k = t.join("vol4k.img");
    mkfs(&root, &img1k, 1024);
    mkfs(&root, &img4k, 4096);

    let mounts = vec![("/data".to_string(), 0usize), ("/data/four".to_string(), 1)];
    let args = "fs /data/hello.txt /data/docs/big.bin /data/four/docs/sparse.bin \
                /data/docs/sparse.bin /data/docs/many.bin /data/docs/many.bin@815000 \
                /data/four/docs/many.bin@409700 /data/docs/big.bin@4000 /data/nope /data/docs/big.bin/x /data/docs \
                + /data /data/many /data/four/docs /data/docs/deep /data/hello.txt";
    let cmdline = render_cmdline("console=ttyS0", &mounts, &BTreeMap::new(), args).unwrap();
    let out = boot(&t, &kernel, &cmdline, &[&img1k, &img4k]);
    let read = |path: &str, data: &[u8]| {
        format!(
            "read {path} size {} bytes {} fnv 0x{:08x}",
            data.len(),
            data.len(),
            fnv1a(data)
        )
    };
    let pread = |path: &str, data: &[u8], off: usize| {
        let end = data.len().min(off + 4096);
        format!(
            "pread {path} at {off} bytes {} fnv 0x{:08x}",
            end - off,
            fnv1a(&data[off..end])
        )
    };
    assert_lines(
        &out,
        &[
            &read("/data/hello.txt", b"hello from ext4\n"),
            &read("/data/docs/big.bin", &big),
            &read("/data/four/docs/sparse.bin", &sparse),
            &read("/data/docs/sparse.bin", &sparse),
            &format!(
                "read /data/docs/many.bin size {} bytes 65536 fnv 0x{:08x}",
                many.len(),
                fnv1a(&many[..65536])
            ),
            &pread("/data/docs/many.bin", &many, 815000),
            &pread("/data/four/docs/many.bin", &many, 409700),
            &pread("/data/docs/big.bin", &big, 4000),
            "read /data/nope error no such file or directory",
            "read /data/docs/big.bin/x error not a directory",
            "read /data/docs error is a directory",
            "entry hello.txt file",
            "entry docs dir",
            "entry lost+found dir",
            "entry many dir",
            "list /data count 4",
            "entry file-with-a-longish-name-000 file",
            "entry file-with-a-longish-name-099 file",
            "list /data/many count 100",
            "entry big.bin file",
            "entry deep dir",
            "entry sparse.bin file",
            "entry many.bin file",
            "list /data/four/docs count 4",
            "entry x file",
            "list /data/docs/deep count 1",
            "list /data/hello.txt error not a directory",
            // A read failed, so main returned 1.
            "ember: exit 1",
        ],
    );
}

#[test]
fn raw_volume_write_and_read_back() {
    let t = TempDir::new("rt-raw");
    let kernel = build_program(&t);
    let img = t.join("raw.img");
    let mut head = vec![0u8; 1 << 20];
    for (i, b) in head.iter_mut().enumerate().take(4096) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&img, &head).unwrap();
    let mounts = vec![("/scratch".to_string(), 0usize)];
    let cmdline =
        render_cmdline("console=ttyS0", &mounts, &BTreeMap::new(), "raw /scratch").unwrap();
    let out = boot(&t, &kernel, &cmdline, &[&img]);

    let msg = b"written by the unikernel\0";
    head[1000..1000 + msg.len()].copy_from_slice(msg);
    assert_lines(
        &out,
        &[
            &format!("raw size {} write 25 read 25 match 1", 1 << 20),
            "raw past-end beyond the end of the volume",
            &format!("raw head 2048 fnv 0x{:08x}", fnv1a(&head[..2048])),
            "ember: exit 0",
        ],
    );
    // The write reached the host file, neighbours untouched.
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after, head);
}

#[test]
fn compile_errors_carry_gcc_messages() {
    let t = TempDir::new("rt-err");
    let src = t.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("main.c"),
        "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", missing_var); return 0; }\n",
    )
    .unwrap();
    let err = EmberC::new()
        .compile(&CompileInput {
            src_dir: &src,
            out_dir: &t.join("out"),
        })
        .unwrap_err();
    match err {
        CompileError::Failed { output } => {
            assert!(output.contains("main.c:2"), "{output}");
            assert!(output.contains("missing_var"), "{output}");
        }
        other => panic!("expected a compile failure, got {other}"),
    }
    assert!(!t.join("out/kernel.elf").exists());
}
