//! Builds the ember unikernel runtime (`resources/unikernel/` plus the test
//! guest's boot code and drivers from `resources/guests/guest/`) with gcc
//! and binutils, and embeds the result into emberd: `runtime_files.rs` in
//! OUT_DIR lists `(relative path, include_bytes!(...))` for `crt0.o`,
//! `libember.a`, `ember.lds` and `include/*.h`. emberd writes these files
//! out at run time to compile users' C sources (compilers/ember.rs), so the
//! host running emberd needs gcc but not this source tree. `cflags.rs` in
//! OUT_DIR holds the code generation and link flags for users' C, shared
//! with this build through ember-cbuild (resources/cbuild).
//!
//! `EMBER_RUNTIME_CC`, `EMBER_RUNTIME_OBJCOPY` and `EMBER_RUNTIME_AR`
//! override the tools.
//!
//! It also compiles ember's Flintlock `.proto` files (`proto/`, wire-identical
//! to Flintlock's published contract) into the gRPC face's messages and
//! service (tonic/prost), plus the descriptor set server reflection serves.
//! protoc comes from the `protoc-bin-vendored` crate, so a clean clone needs
//! no system protoc; `PROTOC` overrides it.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ember_cbuild::{check_tool, preprocess_lds, rerun_if_changed, rerun_if_env_changed, run};

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
    "virtio/vsockdev.c",
];
const GUEST_ASM: &[&str] = &["arch/entry64.S", "arch/pvh.S"];
const GUEST_OTHER: &[&str] = &[
    "guest.lds.S",
    "include/boot.h",
    "include/bootinfo.h",
    "include/ember.h",
    "include/virtio.h",
    "include/vsock.h",
];
/// Runtime files (relative to resources/unikernel).
const RT_C: &[&str] = &[
    "src/start.c",
    "src/libc.c",
    "src/stdio.c",
    "src/volume.c",
    "src/ext4.c",
    "src/warm.c",
    "src/random.c",
];
const RT_ASM: &[&str] = &["src/traps.S"];
const RT_OTHER: &[&str] = &["src/rt.h", "exports.txt"];
/// Headers users get (resources/unikernel/include).
const RT_HEADERS: &[&str] = &[
    "ember.h", "stdio.h", "stdlib.h", "string.h", "ctype.h", "assert.h",
];
/// Global symbols of crt0.o (the entry points the linker script names).
const CRT0_EXPORTS: &[&str] = &["elf_start64", "pvh_start32", "startup_64"];

/// ember's own C flags (ember-cbuild) with all builtins off (the runtime has
/// its own libc), plus these.
const EXTRA_CFLAGS: &[&str] = &[
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
    compile_protos(&manifest, &out);
    let cc = env::var("EMBER_RUNTIME_CC").unwrap_or_else(|_| "gcc".into());
    let objcopy = env::var("EMBER_RUNTIME_OBJCOPY").unwrap_or_else(|_| "objcopy".into());
    let ar = env::var("EMBER_RUNTIME_AR").unwrap_or_else(|_| "ar".into());

    println!("cargo:rerun-if-changed=build.rs");
    rerun_if_env_changed(&[
        "EMBER_RUNTIME_CC",
        "EMBER_RUNTIME_OBJCOPY",
        "EMBER_RUNTIME_AR",
    ]);
    rerun_if_changed(&guest, GUEST_C.iter().chain(GUEST_ASM).chain(GUEST_OTHER));
    rerun_if_changed(&rt, RT_C.iter().chain(RT_ASM).chain(RT_OTHER));
    rerun_if_changed(&rt.join("include"), RT_HEADERS);

    for (tool, what) in [
        (&cc, "gcc (x86_64, with binutils)"),
        (&objcopy, "objcopy (binutils)"),
        (&ar, "ar (binutils)"),
    ] {
        check_tool(
            tool,
            format_args!(
                "emberd embeds the ember unikernel runtime, which is built with {what}; \
                 install it (e.g. `apt-get install gcc binutils`) or point EMBER_RUNTIME_CC / \
                 EMBER_RUNTIME_OBJCOPY / EMBER_RUNTIME_AR at a working tool."
            ),
        );
    }
    let cflags = ember_cbuild::cflags("-fno-builtin", EXTRA_CFLAGS);

    let obj = out.join("ember-obj");
    let dest = out.join("ember-runtime");
    let _ = fs::remove_dir_all(&dest);
    fs::create_dir_all(&obj).expect("create obj dir");
    fs::create_dir_all(dest.join("include")).expect("create runtime dir");
    let guest_inc = guest.join("include");
    let rt_inc = rt.join("include");
    let compile = |includes: &[&Path], src: &Path, obj: &Path| {
        ember_cbuild::compile(&cc, &cflags, includes, src, obj)
    };

    // crt0.o: the boot code, entry points kept global.
    let mut asm_objs = Vec::new();
    for f in GUEST_ASM {
        let o = obj_path(&obj, "g", f);
        compile(&[&guest_inc], &guest.join(f), &o);
        asm_objs.push(o);
    }
    let crt0_r = obj.join("crt0-r.o");
    relocatable(&cc, &asm_objs, &crt0_r);
    localize(&objcopy, &crt0_r, CRT0_EXPORTS, &dest.join("crt0.o"));

    // libember.a: one relocatable object with only exports.txt global.
    let mut objs = Vec::new();
    for f in GUEST_C {
        let o = obj_path(&obj, "g", f);
        compile(&[&guest_inc], &guest.join(f), &o);
        objs.push(o);
    }
    for f in RT_C.iter().chain(RT_ASM) {
        let o = obj_path(&obj, "rt", f);
        // Runtime files: public <ember.h> first, the guest's headers by name.
        compile(&[&rt_inc, &guest_inc], &rt.join(f), &o);
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
    preprocess_lds(
        &cc,
        &["-DPVH"],
        &guest_inc,
        &guest.join("guest.lds.S"),
        &dest.join("ember.lds"),
    );

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

    // cflags.rs: the code generation and link flags users' C is compiled
    // with too (compilers/ember.rs), from ember-cbuild.
    let src = format!(
        "/// Freestanding code generation flags (ember-cbuild).\n\
         const FREESTANDING_CFLAGS: &[&str] = &{:?};\n\
         /// Link flags (ember-cbuild).\n\
         const FREESTANDING_LDFLAGS: &[&str] = &{:?};\n",
        ember_cbuild::FREESTANDING_CFLAGS,
        ember_cbuild::LDFLAGS,
    );
    fs::write(out.join("cflags.rs"), src).expect("write cflags.rs");

    // The module loader /init of linux-* images (static, glibc's libc.a).
    let modload = resources.join("kernel/modload.c");
    println!("cargo:rerun-if-changed={}", modload.display());
    run(Command::new(&cc)
        .args(["-static", "-Os", "-s", "-Wall", "-Werror", "-o"])
        .arg(out.join("modload"))
        .arg(&modload));
}

/// The Flintlock gRPC contract: `flintlock_grpc.bin` (descriptor set) and
/// the prost/tonic modules in OUT_DIR.
fn compile_protos(manifest: &Path, out: &Path) {
    let dir = manifest.join("proto");
    let files = [
        dir.join("types/microvm.proto"),
        dir.join("services/microvm/v1alpha1/microvms.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    if env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
        // Read by prost-build; this build script is single-threaded.
        env::set_var("PROTOC", protoc);
    }
    let well_known = protoc_bin_vendored::include_path().expect("vendored protoc includes");
    tonic_build::configure()
        .build_client(false)
        .file_descriptor_set_path(out.join("flintlock_grpc.bin"))
        .compile_protos(&files, &[dir, well_known])
        .expect("compile the Flintlock .proto files");
}

fn obj_path(dir: &Path, tag: &str, src: &str) -> PathBuf {
    let name = src.replace(['/', '.'], "_");
    dir.join(format!("{tag}-{name}.o"))
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
