//! Boots the ember test guest under kvm-floor and checks its output for the
//! three boot paths (linux64 ELF, PVH ELF, bzImage). Skipped without /dev/kvm.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_guests::{BZIMAGE, DONE_LINE, LINUX64_ELF, PVH_ELF};

/// Generous: fails a hung guest, not a slow one.
const TIMEOUT: Duration = Duration::from_secs(120);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("skipping: /dev/kvm not available");
    }
    ok
}

fn floor(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvm-floor"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvm-floor");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait kvm-floor") {
            break st;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kvm-floor {args:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code(),
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn expect_done(run: &Run, expected: &[&str]) {
    let mut want: Vec<&str> = expected.to_vec();
    want.push(DONE_LINE);
    assert_eq!(run.lines(), want, "stderr: {}", run.stderr);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
}

/// A temporary file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, data: &[u8]) -> Self {
        let p = std::env::temp_dir().join(format!("ember-bench-{}-{name}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        TempFile(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

const MEMMAP_64M: [&str; 3] = [
    "ember-guest: mem 0x0 0x9fc00 1",
    "ember-guest: mem 0x100000 0x3f00000 1",
    "ember-guest: ram-total 63 MiB",
];

#[test]
fn linux64_hello_is_default_mode() {
    if !kvm_available() {
        return;
    }
    expect_done(
        &floor(&[LINUX64_ELF]),
        &["ember-guest: hello from linux64 boot"],
    );
    expect_done(
        &floor(&[LINUX64_ELF, "ember.test=hello"]),
        &["ember-guest: hello from linux64 boot"],
    );
}

#[test]
fn linux64_cmdline() {
    if !kvm_available() {
        return;
    }
    let cmdline = "console=ttyS0 reboot=k ember.test=cmdline panic=1 x=\"y\"";
    expect_done(
        &floor(&[LINUX64_ELF, cmdline]),
        &[&format!("ember-guest: cmdline: {cmdline}")],
    );
}

#[test]
fn linux64_memmap() {
    if !kvm_available() {
        return;
    }
    expect_done(&floor(&[LINUX64_ELF, "ember.test=memmap"]), &MEMMAP_64M);
    expect_done(
        &floor(&["--mem", "128", LINUX64_ELF, "ember.test=memmap"]),
        &[
            "ember-guest: mem 0x0 0x9fc00 1",
            "ember-guest: mem 0x100000 0x7f00000 1",
            "ember-guest: ram-total 127 MiB",
        ],
    );
}

#[test]
fn linux64_triple_fault_shuts_down() {
    if !kvm_available() {
        return;
    }
    let run = floor(&[LINUX64_ELF, "ember.test=triple-fault"]);
    assert_eq!(run.lines(), ["ember-guest: triple-faulting"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("KVM_EXIT_SHUTDOWN"),
        "stderr: {}",
        run.stderr
    );
}

#[test]
fn linux64_unknown_mode() {
    if !kvm_available() {
        return;
    }
    expect_done(
        &floor(&[LINUX64_ELF, "ember.test=no-such-mode"]),
        &["ember-guest: unknown mode no-such-mode"],
    );
}

#[test]
fn linux64_cpus_from_mptable() {
    if !kvm_available() {
        return;
    }
    expect_done(
        &floor(&["--cpus", "3", LINUX64_ELF, "ember.test=cpus"]),
        &["ember-guest: cpus 3"],
    );
}

#[test]
fn initrd_hash_on_linux64_and_pvh() {
    if !kvm_available() {
        return;
    }
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    let initrd = TempFile::new("initrd", &data);
    // 64 MiB of RAM: page aligned as high as it fits.
    let addr = ((64u64 << 20) - data.len() as u64) & !0xfff;
    let line = format!(
        "ember-guest: initrd {addr:#x} {:#x} fnv1a {:#010x}",
        data.len(),
        fnv1a(&data)
    );
    let args = ["--initrd", initrd.path()];
    expect_done(
        &floor(&[&args[..], &[LINUX64_ELF, "ember.test=initrd"]].concat()),
        &[&line],
    );
    expect_done(
        &floor(&[&args[..], &["--pvh", PVH_ELF, "ember.test=initrd"]].concat()),
        &[&line],
    );
    expect_done(
        &floor(&[LINUX64_ELF, "ember.test=initrd"]),
        &["ember-guest: initrd none"],
    );
}

#[test]
fn pvh_boot() {
    if !kvm_available() {
        return;
    }
    expect_done(
        &floor(&["--pvh", PVH_ELF, "ember.test=hello"]),
        &["ember-guest: hello from pvh boot"],
    );
    expect_done(
        &floor(&["--pvh", PVH_ELF, "ember.test=cmdline a=b"]),
        &["ember-guest: cmdline: ember.test=cmdline a=b"],
    );
    expect_done(
        &floor(&["--pvh", PVH_ELF, "ember.test=memmap"]),
        &MEMMAP_64M,
    );
    // The PVH image still boots through its 64-bit ELF entry.
    expect_done(
        &floor(&[PVH_ELF, "ember.test=hello"]),
        &["ember-guest: hello from linux64 boot"],
    );
}

#[test]
fn bzimage_boot() {
    if !kvm_available() {
        return;
    }
    assert!(Path::new(BZIMAGE).exists());
    expect_done(
        &floor(&[BZIMAGE, "ember.test=hello"]),
        &["ember-guest: hello from bzimage boot"],
    );
    expect_done(&floor(&[BZIMAGE, "ember.test=memmap"]), &MEMMAP_64M);
}

#[test]
fn linux64_without_pvh_note_refuses_pvh() {
    if !kvm_available() {
        return;
    }
    let run = floor(&["--pvh", LINUX64_ELF]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("no PVH entry"),
        "stderr: {}",
        run.stderr
    );
}
