//! Builds the freestanding test guest (guest/) with gcc and binutils:
//!
//! - `ember-guest-linux64.elf`: ELF64 vmlinux-style image, 64-bit entry;
//! - `ember-guest-pvh.elf`: the same plus a Xen PVH note (32-bit entry);
//! - `ember-guest.bzImage`: setup sectors + the flat protected-mode image.
//!
//! The images land in OUT_DIR and are copied to `<target dir>/guests/`.
//! Set `EMBER_GUEST_CC` / `EMBER_GUEST_OBJCOPY` to override the tools.
//!
//! The boot code (arch/entry64.S, arch/pvh.S, guest.lds.S), serial.c,
//! format.c, string.c, cpu.c, bootinfo.c, timer.c and virtio/{mmio,parse,
//! blkdev}.c are also compiled into the unikernel runtime
//! (`resources/unikernel/`, built by `api_server/build.rs`).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ember_cbuild::{
    check_tool, compile, preprocess_lds, rerun_if_changed, rerun_if_env_changed, run, LDFLAGS,
};

/// ember's own C flags (ember-cbuild), with gcc's builtins except printf.
fn cflags() -> Vec<&'static str> {
    ember_cbuild::cflags("-fno-builtin-printf", &[])
}

const C_SOURCES: &[&str] = &[
    "main.c",
    "mempattern.c",
    "bootinfo.c",
    "cpu.c",
    "format.c",
    "mptable.c",
    "podagent.c",
    "podjson.c",
    "serial.c",
    "string.c",
    "tests.c",
    "timer.c",
    "virtio/balloon.c",
    "virtio/blk.c",
    "virtio/blkdev.c",
    "virtio/evil.c",
    "virtio/evilflood.c",
    "virtio/evilvsock.c",
    "virtio/mmio.c",
    "virtio/net.c",
    "virtio/parse.c",
    "virtio/rng.c",
    "virtio/probe.c",
    "virtio/snapio.c",
    "virtio/vsock.c",
    "virtio/vsockdev.c",
];
const ASM_SOURCES: &[&str] = &["arch/entry64.S", "arch/pvh.S"];
const OTHER_SOURCES: &[&str] = &[
    "arch/bzimage_header.S",
    "guest.lds.S",
    "include/boot.h",
    "include/bootinfo.h",
    "include/ember.h",
    "include/podjson.h",
    "include/virtio.h",
    "include/vsock.h",
    "hosttest/host_test.c",
];
/// Pure helpers also compiled for the host (with -DHOST_TEST) and unit-tested.
const HOST_TEST_SOURCES: &[&str] = &[
    "hosttest/host_test.c",
    "virtio/parse.c",
    "string.c",
    "podjson.c",
];

/// Physical load address of the protected-mode image.
const LOAD_ADDR: u64 = 0x10_0000;
/// Offsets of the fields build.rs patches in the bzImage setup header.
const SYSSIZE_OFF: usize = 0x1f4;
const SETUP_SECTS_OFF: usize = 0x1f1;
const INIT_SIZE_OFF: usize = 0x260;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let src = manifest.join("guest");
    let cc = env::var("EMBER_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let objcopy = env::var("EMBER_GUEST_OBJCOPY").unwrap_or_else(|_| "objcopy".into());

    println!("cargo:rerun-if-changed=build.rs");
    rerun_if_env_changed(&["EMBER_GUEST_CC", "EMBER_GUEST_OBJCOPY", "CARGO_TARGET_DIR"]);
    rerun_if_changed(
        Path::new("guest"),
        C_SOURCES.iter().chain(ASM_SOURCES).chain(OTHER_SOURCES),
    );

    for (tool, what) in [
        (&cc, "gcc (x86_64, with binutils)"),
        (&objcopy, "objcopy (binutils)"),
    ] {
        check_tool(
            tool,
            format_args!(
                "Building the test guests needs {what}; install it (e.g. `apt-get install gcc \
                 binutils`) or point EMBER_GUEST_CC / EMBER_GUEST_OBJCOPY at a working tool."
            ),
        );
    }

    let obj_dir = out.join("obj");
    fs::create_dir_all(&obj_dir).expect("create obj dir");
    let include = src.join("include");

    let cflags = cflags();
    let mut objs = Vec::new();
    for f in C_SOURCES.iter().chain(ASM_SOURCES) {
        let obj = obj_dir
            .join(Path::new(f).file_name().unwrap())
            .with_extension("o");
        compile(&cc, &cflags, &[&include], &src.join(f), &obj);
        objs.push(obj);
    }

    // Linker scripts: the C preprocessor selects the PVH parts.
    let lds_linux = out.join("guest-linux64.lds");
    let lds_pvh = out.join("guest-pvh.lds");
    for (lds, defs) in [(&lds_linux, &[][..]), (&lds_pvh, &["-DPVH"][..])] {
        preprocess_lds(&cc, defs, &include, &src.join("guest.lds.S"), lds);
    }

    let linux64 = out.join("ember-guest-linux64.elf");
    let pvh = out.join("ember-guest-pvh.elf");
    for (elf, lds) in [(&linux64, &lds_linux), (&pvh, &lds_pvh)] {
        let mut cmd = Command::new(&cc);
        cmd.args(LDFLAGS)
            .arg("-T")
            .arg(lds)
            .args(&objs)
            .arg("-o")
            .arg(elf);
        run(&mut cmd);
    }

    let bzimage = out.join("ember-guest.bzImage");
    build_bzimage(&cc, &objcopy, &src, &include, &obj_dir, &linux64, &bzimage);

    build_host_test(&cc, &src, &include, &out);

    let images = [&linux64, &pvh, &bzimage];
    if let Some(target) = target_dir(&out) {
        let dest = target.join("guests");
        if fs::create_dir_all(&dest).is_ok() {
            for img in images {
                install(img, &dest);
            }
        } else {
            println!("cargo:warning=cannot create {}", dest.display());
        }
    }
}

/// Builds `host-test`, a host program testing the guest's pure C helpers;
/// `EMBER_GUEST_HOST_TEST` (compile time) holds its path.
fn build_host_test(cc: &str, src: &Path, include: &Path, out: &Path) {
    let exe = out.join("host-test");
    let mut cmd = Command::new(cc);
    cmd.args([
        "-std=gnu11",
        "-O1",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-DHOST_TEST",
    ])
    .arg("-I")
    .arg(include);
    for f in HOST_TEST_SOURCES {
        cmd.arg(src.join(f));
    }
    cmd.arg("-o").arg(&exe);
    run(&mut cmd);
    println!("cargo:rustc-env=EMBER_GUEST_HOST_TEST={}", exe.display());
}

fn build_bzimage(
    cc: &str,
    objcopy: &str,
    src: &Path,
    include: &Path,
    obj_dir: &Path,
    linux64: &Path,
    bzimage: &Path,
) {
    let setup_obj = obj_dir.join("bzimage_header.o");
    let setup_bin = obj_dir.join("setup.bin");
    let pm_bin = obj_dir.join("vmlinux.bin");
    compile(
        cc,
        &cflags(),
        &[include],
        &src.join("arch/bzimage_header.S"),
        &setup_obj,
    );
    run(Command::new(objcopy)
        .args(["-O", "binary", "-j", ".text"])
        .arg(&setup_obj)
        .arg(&setup_bin));
    run(Command::new(objcopy)
        .args(["-O", "binary"])
        .arg(linux64)
        .arg(&pm_bin));

    let mut setup = fs::read(&setup_bin).expect("read setup.bin");
    let mut pm = fs::read(&pm_bin).expect("read vmlinux.bin");
    let elf = fs::read(linux64).expect("read linux64 elf");

    let sects = usize::from(setup[SETUP_SECTS_OFF]);
    assert_eq!(
        setup.len(),
        (sects + 1) * 512,
        "setup.bin size does not match setup_sects"
    );
    while !pm.len().is_multiple_of(16) {
        pm.push(0);
    }
    let syssize = u32::try_from(pm.len() / 16).expect("image too large");
    let mem_end = elf_mem_end(&elf);
    let init_size = (mem_end - LOAD_ADDR).next_multiple_of(4096);
    let init_size = u32::try_from(init_size).expect("image too large");
    setup[SYSSIZE_OFF..SYSSIZE_OFF + 4].copy_from_slice(&syssize.to_le_bytes());
    setup[INIT_SIZE_OFF..INIT_SIZE_OFF + 4].copy_from_slice(&init_size.to_le_bytes());

    setup.extend_from_slice(&pm);
    fs::write(bzimage, setup).expect("write bzImage");
}

/// Highest physical address (p_paddr + p_memsz) of the ELF's PT_LOAD segments.
fn elf_mem_end(elf: &[u8]) -> u64 {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    assert_eq!(&elf[0..4], b"\x7fELF", "not an ELF file");
    let phoff = usize::try_from(u64_at(0x20)).unwrap();
    let phentsize = usize::from(u16_at(0x36));
    let phnum = usize::from(u16_at(0x38));
    (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32_at(ph) == 1) // PT_LOAD
        .map(|ph| u64_at(ph + 0x18) + u64_at(ph + 0x28)) // p_paddr + p_memsz
        .max()
        .expect("no PT_LOAD segment")
}

/// `<target dir>`: CARGO_TARGET_DIR if set and absolute, else the parent of
/// the OUT_DIR ancestor that contains `build/` (target/<profile>/..).
fn target_dir(out: &Path) -> Option<PathBuf> {
    if let Some(dir) = env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return Some(dir);
        }
    }
    let profile_dir = out
        .ancestors()
        .find(|p| p.join("build").is_dir() && p.file_name().is_some_and(|n| n != "build"))?;
    profile_dir.parent().map(Path::to_path_buf)
}

/// Copies `img` into `dest` atomically (debug and release builds may race).
fn install(img: &Path, dest: &Path) {
    let name = img.file_name().unwrap();
    let tmp = dest.join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let ok = fs::copy(img, &tmp).is_ok() && fs::rename(&tmp, dest.join(name)).is_ok();
    if !ok {
        let _ = fs::remove_file(&tmp);
        println!(
            "cargo:warning=cannot install {} into {}",
            img.display(),
            dest.display()
        );
    }
}
