//! ember-vmm boots the test guest by every protocol and reports how it ended.

use std::process::Command;

use ember_tests::*;

struct Run {
    proc_: Proc,
    _dir: TempDir,
}

fn boot(kernel: &str, args: &str, vcpus: u8, extra: Option<(&str, serde_json::Value)>) -> Run {
    let dir = TempDir::new("boot");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&vm_config(kernel, args, vcpus, 64)).unwrap();
    if let Some((k, v)) = extra {
        cfg["boot-source"][k] = v;
    }
    let cfg_path = dir.join("vm.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--no-api").arg("--config-file").arg(&cfg_path);
    let p = Proc::spawn(cmd, dir.path(), "vmm");
    Run {
        proc_: p,
        _dir: dir,
    }
}

fn run_to_end(kernel: &str, args: &str, vcpus: u8) -> (i32, String, String) {
    let mut r = boot(kernel, args, vcpus, None);
    let st = r.proc_.wait();
    (st.code().unwrap_or(-1), r.proc_.out(), r.proc_.err())
}

#[test]
fn hello_by_linux64_protocol() {
    let (code, out, err) = run_to_end(LINUX64_ELF, "console=ttyS0 ember.test=hello", 1);
    assert_eq!(code, 0, "stderr: {err}");
    assert!(
        out.contains("ember-guest: hello from linux64 boot"),
        "{out}"
    );
    assert!(out.contains("ember-guest: done"), "{out}");
    assert!(err.contains("reset"), "{err}");
}

#[test]
fn hello_by_pvh() {
    let (code, out, err) = run_to_end(PVH_ELF, "ember.test=hello", 1);
    assert_eq!(code, 0, "stderr: {err}");
    assert!(out.contains("ember-guest: hello from pvh boot"), "{out}");
}

#[test]
fn hello_by_bzimage() {
    let (code, out, err) = run_to_end(BZIMAGE, "ember.test=hello", 1);
    assert_eq!(code, 0, "stderr: {err}");
    assert!(
        out.contains("ember-guest: hello from bzimage boot"),
        "{out}"
    );
}

#[test]
fn cmdline_reaches_the_guest_by_both_protocols() {
    for k in [LINUX64_ELF, PVH_ELF] {
        let args = "console=ttyS0 ember.test=cmdline foo=bar baz";
        let (code, out, _) = run_to_end(k, args, 1);
        assert_eq!(code, 0);
        assert!(
            out.contains(&format!("ember-guest: cmdline: {args}")),
            "{out}"
        );
    }
}

#[test]
fn memory_map_matches_machine_config() {
    for k in [LINUX64_ELF, PVH_ELF] {
        let (code, out, _) = run_to_end(k, "ember.test=memmap", 1);
        assert_eq!(code, 0);
        assert!(out.contains("ember-guest: mem 0x0 0x9fc00 1"), "{out}");
        assert!(
            out.contains("ember-guest: mem 0x100000 0x3f00000 1"),
            "{out}"
        );
    }
}

#[test]
fn mp_table_lists_every_vcpu() {
    for n in [1u8, 2, 4] {
        let (code, out, err) = run_to_end(LINUX64_ELF, "ember.test=cpus", n);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(&format!("ember-guest: cpus {n}")), "{out}");
    }
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[test]
fn initrd_is_loaded_intact_by_every_protocol() {
    let dir = TempDir::new("initrd");
    let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let p = dir.join("initrd.img");
    std::fs::write(&p, &data).unwrap();
    let want = format!("0x{:x} fnv1a 0x{:x}", data.len(), fnv1a(&data));
    for k in [LINUX64_ELF, PVH_ELF, BZIMAGE] {
        let mut r = boot(
            k,
            "ember.test=initrd",
            1,
            Some(("initrd_path", p.to_str().unwrap().into())),
        );
        assert_eq!(r.proc_.wait().code(), Some(0), "{}", r.proc_.err());
        let out = r.proc_.out();
        assert!(out.contains(&want), "want {want} in {out}");
    }
}

#[test]
fn guest_crash_is_a_clean_nonzero_exit() {
    let (code, out, err) = run_to_end(LINUX64_ELF, "ember.test=triple-fault", 1);
    assert!(out.contains("ember-guest: triple-faulting"), "{out}");
    assert_eq!(code, 3, "stderr: {err}");
    // Real hardware reports KVM_EXIT_SHUTDOWN; an emulating host may stop
    // earlier with an internal error. Either is named.
    assert!(
        err.contains("triple fault") || err.contains("KVM_EXIT_INTERNAL_ERROR"),
        "{err}"
    );
    assert!(err.contains("vCPU 0"), "{err}");
}

#[test]
fn serial_output_can_go_to_a_file() {
    let dir = TempDir::new("serial");
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, vm_config(PVH_ELF, "ember.test=hello", 1, 32)).unwrap();
    let log = dir.join("serial.log");
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.args(["--no-api", "--config-file"])
        .arg(&cfg)
        .arg("--serial-out")
        .arg(&log);
    let mut p = Proc::spawn(cmd, dir.path(), "vmm");
    assert_eq!(p.wait().code(), Some(0));
    let s = std::fs::read_to_string(&log).unwrap();
    assert!(s.contains("hello from pvh boot"), "{s}");
    assert!(!p.out().contains("hello"));
}

fn config_error(cfg: &str) -> (i32, String) {
    let dir = TempDir::new("badcfg");
    let p = dir.join("vm.json");
    std::fs::write(&p, cfg).unwrap();
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.args(["--no-api", "--config-file"]).arg(&p);
    let mut pr = Proc::spawn(cmd, dir.path(), "vmm");
    let code = pr.wait().code().unwrap_or(-1);
    (code, pr.err())
}

#[test]
fn bad_config_files_are_refused_clearly() {
    let (c, e) = config_error(&vm_config("/nonexistent/vmlinux", "", 1, 64));
    assert_eq!(c, 152);
    assert!(e.contains("kernel file cannot be opened"), "{e}");
    let (c, e) = config_error(&vm_config(LINUX64_ELF, "", 1, 0));
    assert_eq!(c, 152);
    assert!(e.contains("memory size"), "{e}");
    let (c, e) = config_error(&vm_config(LINUX64_ELF, "", 0, 64));
    assert_eq!(c, 152);
    assert!(e.contains("number of vCPUs"), "{e}");
    let (c, e) = config_error("{\"boot-source\": ");
    assert_eq!(c, 152);
    assert!(e.contains("invalid config file"), "{e}");
    let (c, e) = config_error(r#"{"boot-source":{"kernel_image_path":"/x"},"bogus":1}"#);
    assert_eq!(c, 152);
    assert!(e.contains("unknown field"), "{e}");
    // Not a kernel at all.
    let dir = TempDir::new("garbage");
    let g = dir.join("garbage");
    std::fs::write(&g, vec![0x5au8; 8192]).unwrap();
    let (c, e) = config_error(&vm_config(g.to_str().unwrap(), "", 1, 64));
    assert_eq!(c, 152);
    assert!(e.contains("neither an ELF kernel nor a bzImage"), "{e}");
}

#[test]
fn command_line_errors() {
    let dir = TempDir::new("cli");
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--no-api");
    let mut p = Proc::spawn(cmd, dir.path(), "vmm");
    assert_eq!(p.wait().code(), Some(153));
    // Firecracker's rule: --no-api requires --config-file.
    assert!(
        p.err().contains("required arguments were not provided")
            && p.err().contains("--config-file"),
        "{}",
        p.err()
    );
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--frobnicate");
    let mut p = Proc::spawn(cmd, dir.path(), "vmm2");
    assert_eq!(p.wait().code(), Some(153));
}
