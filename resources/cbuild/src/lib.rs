//! What the build scripts compiling ember's freestanding C with gcc have in
//! common: `resources/guests/build.rs` (the test guest) and
//! `api_server/build.rs` (the unikernel runtime embedded into emberd). Used
//! as a build-dependency; every helper panics on failure (at the caller's
//! location), which is how a build script reports an error.
//!
//! emberd compiles users' C at run time with the same code generation and
//! link flags: `api_server/build.rs` writes [`FREESTANDING_CFLAGS`] and
//! [`LDFLAGS`] into its OUT_DIR for `compilers/ember.rs`.

use std::fmt::Display;
use std::path::Path;
use std::process::Command;

/// Code generation flags for freestanding x86-64 code: general registers
/// only (no SSE: the guest CPU state is not saved for it), no red zone, not
/// position independent, no stack protector, no unwind tables, no CET.
pub const FREESTANDING_CFLAGS: &[&str] = &[
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-mcmodel=small",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-strict-aliasing",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-common",
];

/// Link flags for a static, freestanding ELF with 4 KiB-aligned segments.
pub const LDFLAGS: &[&str] = &[
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,-z,noexecstack",
    "-Wl,--no-warn-rwx-segments",
];

/// The flags of ember's own C (gnu11, -O2, warnings as errors,
/// freestanding, [`FREESTANDING_CFLAGS`]) followed by `extra`.
///
/// `no_builtin` is the crate's choice of `-fno-builtin*`: the test guest
/// only gives up `-fno-builtin-printf`, the runtime (which has its own libc)
/// all of them (`-fno-builtin`).
pub fn cflags<'a>(no_builtin: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "-std=gnu11",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-ffreestanding",
        no_builtin,
        "-fno-tree-loop-distribute-patterns",
    ];
    flags.extend_from_slice(FREESTANDING_CFLAGS);
    flags.extend_from_slice(extra);
    flags
}

/// `cc <cflags> -I <include>... -c <src> -o <obj>`.
#[track_caller]
pub fn compile(cc: &str, cflags: &[&str], includes: &[&Path], src: &Path, obj: &Path) {
    let mut cmd = Command::new(cc);
    cmd.args(cflags);
    for i in includes {
        cmd.arg("-I").arg(i);
    }
    cmd.arg("-c").arg(src).arg("-o").arg(obj);
    run(&mut cmd);
}

/// Preprocesses the linker script `src` (`guest.lds.S`) into `out`, with
/// `defs` (e.g. `-DPVH`, which selects the PVH parts) and `-I include`.
#[track_caller]
pub fn preprocess_lds(cc: &str, defs: &[&str], include: &Path, src: &Path, out: &Path) {
    let mut cmd = Command::new(cc);
    cmd.args(["-E", "-P", "-undef", "-x", "c", "-D__ASSEMBLY__"])
        .args(defs)
        .arg("-I")
        .arg(include)
        .arg(src)
        .arg("-o")
        .arg(out);
    run(&mut cmd);
}

/// Runs `cmd`; panics with the command and its output if it fails.
#[track_caller]
pub fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "command failed ({}): {cmd:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Panics with `` `tool` not found or not working. `` and `help` unless
/// `tool --version` succeeds.
#[track_caller]
pub fn check_tool(tool: &str, help: impl Display) {
    match Command::new(tool).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => panic!("`{tool}` not found or not working. {help}"),
    }
}

/// `cargo:rerun-if-changed=<dir>/<f>` for each file.
pub fn rerun_if_changed(dir: &Path, files: impl IntoIterator<Item = impl AsRef<Path>>) {
    for f in files {
        println!("cargo:rerun-if-changed={}", dir.join(f.as_ref()).display());
    }
}

/// `cargo:rerun-if-env-changed=<var>` for each variable.
pub fn rerun_if_env_changed(vars: &[&str]) {
    for v in vars {
        println!("cargo:rerun-if-env-changed={v}");
    }
}
