//! The embedding API with `SeccompLevel::Confined`: the process configures
//! the allocator while it has one thread (so this test has its own `main`,
//! without libtest's threads), then starts microVMs whose threads run under
//! their filters: pause, resume, Ctrl-Alt-Del and a stop by drop all work
//! under them, and the embedder's own thread stays unfiltered.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_guests::PVH_ELF;
use vmm::{ExitReason, MicroVm, SeccompLevel, Serial};

/// (thread name -> Seccomp mode) of this process's threads.
fn seccomp_modes() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("")
            .trim()
            .to_string();
        m.insert(comm.trim().to_string(), mode);
    }
    m
}

fn main() {
    vmm::seccomp::configure_allocator().expect("one thread at this point");
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is missing");
        return;
    }
    let console = Arc::new(Mutex::new(String::new()));
    let sink = console.clone();
    let mut vm = MicroVm::builder()
        .kernel(PVH_ELF)
        .cmdline("console=ttyS0 ember.test=wait-ctrlaltdel")
        .memory_mib(32)
        .seccomp(SeccompLevel::Confined)
        .serial(Serial::Callback(Box::new(move |b| {
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(b));
        })))
        .build()
        .unwrap()
        .start()
        .unwrap();
    let start = Instant::now();
    while !console.lock().unwrap().contains("waiting for ctrl-alt-del") {
        assert!(start.elapsed() < Duration::from_secs(60), "guest not ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let modes = seccomp_modes();
    assert_eq!(
        modes.get("ember_vmm").map(String::as_str),
        Some("2"),
        "{modes:?}"
    );
    assert_eq!(
        modes.get("ember_vcpu0").map(String::as_str),
        Some("2"),
        "{modes:?}"
    );
    // The embedder's main thread (its task id is the process id).
    let main = std::fs::read_to_string("/proc/self/status").unwrap();
    assert!(main.lines().any(|l| l == "Seccomp:\t0"), "{main}");
    vm.pause().unwrap();
    vm.resume().unwrap();
    vm.send_ctrl_alt_del().unwrap();
    assert_eq!(vm.wait().unwrap(), ExitReason::I8042Reset);
    assert!(console
        .lock()
        .unwrap()
        .contains("ember-guest: ctrl-alt-del"));

    // A second microVM in the same process, stopped by dropping its handle.
    let vm = MicroVm::builder()
        .kernel(PVH_ELF)
        .cmdline("ember.test=ticker")
        .memory_mib(32)
        .seccomp(SeccompLevel::Confined)
        .serial(Serial::Discard)
        .build()
        .unwrap()
        .start()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(vm);
    println!("library_seccomp: ok");
}
