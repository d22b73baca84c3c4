//! Builds the ember unikernel runtime (`resources/unikernel/` plus the test
//! guest's boot code and drivers from `resources/guests/guest/`) with gcc
//! and binutils, and embeds the result into emberd: `runtime_files.rs` in
//! OUT_DIR lists `(relative path, include_bytes!(...))` for `crt0.o`,
//! `libember.a`, `ember.lds` and `include/*.h`. emberd writes these files
//! out at run time to compile users' C sources (compilers/ember.rs), so the
//! host running emberd needs gcc but not this source tree.
//!
//! `EMBER_RUNTIME_CC`, `EMBER_RUNTIME_OBJCOPY` and `EMBER_RUNTIME_AR`
//! override the tools.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Test-guest files shared with the runtime (relative to resources/guests/guest).
const GUEST_C: &[&str] = &[
    "serial.c",
    "format.c",
    "string.c",
    "cpu.c",
    "bootinfo.c",
    "timer.c",
    "virtio/mmio.c",
    "virtio/parse.c",
    "virtio/blkdev.c",
];
const GUEST_ASM: &[&str] = &["arch/entry64.S", "arch/pvh.S"];
const GUEST_OTHER: &[&str] = &[
    "guest.lds.S",
    "include/boot.h",
    "include/bootinfo.h",
    "include/ember.h",
    "include/virtio.h",
];
/// Runtime files (relative to resources/unikernel).
const RT_C: &[&str] = &[
    "src/start.c",
    "src/libc.c",
    "src/stdio.c",
    "src/volume.c",
    "src/ext4.c",
];
const RT_ASM: &[&str] = &["src/traps.S"];
const RT_OTHER: &[&str] = &["src/rt.h", "exports.txt"];
/// Headers users get (resources/unikernel/include).
const RT_HEADERS: &[&str] = &[
    "ember.h", "stdio.h", "stdlib.h", "string.h", "ctype.h", "assert.h",
];
/// Global symbols of crt0.o (the entry points the linker script names).
const CRT0_EXPORTS: &[&str] = &["elf_start64", "pvh_start32", "startup_64"];

const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",
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
    "-DLOG_PREFIX=\"ember: \"",
    // 256 KiB: user programs keep buffers on the stack.
    "-DSTACK_SIZE=0x40000",
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let resources = manifest.join("../resources");
    let guest = resources.join("guests/guest");
    let rt = resources.join("unikernel");
    let cc = env::var("EMBER_RUNTIME_CC").unwrap_or_else(|_| "gcc".into());
    let objcopy = env::var("EMBER_RUNTIME_OBJCOPY").unwrap_or_else(|_| "objcopy".into());
    let ar = env::var("EMBER_RUNTIME_AR").unwrap_or_else(|_| "ar".into());

    println!("cargo:rerun-if-changed=build.rs");
    for v in [
        "EMBER_RUNTIME_CC",
        "EMBER_RUNTIME_OBJCOPY",
        "EMBER_RUNTIME_AR",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    for f in GUEST_C.iter().chain(GUEST_ASM).chain(GUEST_OTHER) {
        println!("cargo:rerun-if-changed={}", guest.join(f).display());
    }
    for f in RT_C.iter().chain(RT_ASM).chain(RT_OTHER) {
        println!("cargo:rerun-if-changed={}", rt.join(f).display());
    }
    for h in RT_HEADERS {
        println!(
            "cargo:rerun-if-changed={}",
            rt.join("include").join(h).display()
        );
    }

    check_tool(&cc, "gcc (x86_64, with binutils)");
    check_tool(&objcopy, "objcopy (binutils)");
    check_tool(&ar, "ar (binutils)");

    let obj = out.join("ember-obj");
    let dest = out.join("ember-runtime");
    let _ = fs::remove_dir_all(&dest);
    fs::create_dir_all(&obj).expect("create obj dir");
    fs::create_dir_all(dest.join("include")).expect("create runtime dir");
    let guest_inc = guest.join("include");
    let rt_inc = rt.join("include");

    // crt0.o: the boot code, entry points kept global.
    let mut asm_objs = Vec::new();
    for f in GUEST_ASM {
        let o = obj_path(&obj, "g", f);
        compile(&cc, &[&guest_inc], &guest.join(f), &o);
        asm_objs.push(o);
    }
    let crt0_r = obj.join("crt0-r.o");
    relocatable(&cc, &asm_objs, &crt0_r);
    localize(&objcopy, &crt0_r, CRT0_EXPORTS, &dest.join("crt0.o"));

    // libember.a: one relocatable object with only exports.txt global.
    let mut objs = Vec::new();
    for f in GUEST_C {
        let o = obj_path(&obj, "g", f);
        compile(&cc, &[&guest_inc], &guest.join(f), &o);
        objs.push(o);
    }
    for f in RT_C.iter().chain(RT_ASM) {
        let o = obj_path(&obj, "rt", f);
        // Runtime files: public <ember.h> first, the guest's headers by name.
        compile(&cc, &[&rt_inc, &guest_inc], &rt.join(f), &o);
        objs.push(o);
    }
    let ember_r = obj.join("ember-r.o");
    relocatable(&cc, &objs, &ember_r);
    let exports_txt = fs::read_to_string(rt.join("exports.txt")).expect("read exports.txt");
    let exports: Vec<&str> = exports_txt
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let ember_o = obj.join("ember.o");
    localize(&objcopy, &ember_r, &exports, &ember_o);
    let lib = dest.join("libember.a");
    run(Command::new(&ar).arg("rcs").arg(&lib).arg(&ember_o));

    // The linker script (PVH note kept).
    let mut cmd = Command::new(&cc);
    cmd.args(["-E", "-P", "-undef", "-x", "c", "-D__ASSEMBLY__", "-DPVH"])
        .arg("-I")
        .arg(&guest_inc)
        .arg(guest.join("guest.lds.S"))
        .arg("-o")
        .arg(dest.join("ember.lds"));
    run(&mut cmd);

    for h in RT_HEADERS {
        fs::copy(rt_inc.join(h), dest.join("include").join(h)).expect("copy header");
    }

    // runtime_files.rs
    let mut files: Vec<String> = vec!["crt0.o".into(), "libember.a".into(), "ember.lds".into()];
    files.extend(RT_HEADERS.iter().map(|h| format!("include/{h}")));
    let mut src = String::from(
        "/// The ember runtime's files: (path relative to the runtime dir, contents).\n\
         pub const RUNTIME_FILES: &[(&str, &[u8])] = &[\n",
    );
    for f in &files {
        let abs = dest.join(f);
        writeln!(
            src,
            "    ({f:?}, include_bytes!({:?})),",
            abs.display().to_string()
        )
        .expect("format");
    }
    src.push_str("];\n");
    fs::write(out.join("runtime_files.rs"), src).expect("write runtime_files.rs");
}

fn obj_path(dir: &Path, tag: &str, src: &str) -> PathBuf {
    let name = src.replace(['/', '.'], "_");
    dir.join(format!("{tag}-{name}.o"))
}

fn compile(cc: &str, includes: &[&Path], src: &Path, out: &Path) {
    let mut cmd = Command::new(cc);
    cmd.args(CFLAGS);
    for i in includes {
        cmd.arg("-I").arg(i);
    }
    cmd.arg("-c").arg(src).arg("-o").arg(out);
    run(&mut cmd);
}

fn relocatable(cc: &str, objs: &[PathBuf], out: &Path) {
    let mut cmd = Command::new(cc);
    cmd.args(["-r", "-nostdlib", "-Wl,--build-id=none"])
        .args(objs)
        .arg("-o")
        .arg(out);
    run(&mut cmd);
}

/// Copies `input` to `out` with every defined global symbol outside `keep` made local.
fn localize(objcopy: &str, input: &Path, keep: &[&str], out: &Path) {
    let mut cmd = Command::new(objcopy);
    for k in keep {
        cmd.arg(format!("--keep-global-symbol={k}"));
    }
    cmd.arg(input).arg(out);
    run(&mut cmd);
}

fn check_tool(tool: &str, what: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => panic!(
            "api_server: `{tool}` not found or not working. emberd embeds the ember unikernel \
             runtime, which is built with {what}; install it (e.g. `apt-get install gcc \
             binutils`) or point EMBER_RUNTIME_CC / EMBER_RUNTIME_OBJCOPY / EMBER_RUNTIME_AR \
             at a working tool."
        ),
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("api_server: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "api_server: building the ember runtime failed ({}): {cmd:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
