//! Boots ember's test guest through the library API alone (no `ember-vmm`
//! process): console through a callback, pause and resume, Ctrl-Alt-Del,
//! exit reasons. Skips with a message where /dev/kvm is missing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_guests::PVH_ELF;
use vmm::config::ConfigError;
use vmm::{ExitReason, MicroVm, MicroVmBuilder, MicroVmError, Serial};

const PATIENCE: Duration = Duration::from_secs(60);

fn kvm() -> bool {
    let ok = std::path::Path::new("/dev/kvm").exists();
    if !ok {
        eprintln!("skipped: /dev/kvm is missing");
    }
    ok
}

/// A builder for the test guest in `mode`, its console collected in the
/// returned string.
fn guest(mode: &str) -> (MicroVmBuilder, Arc<Mutex<String>>) {
    let console = Arc::new(Mutex::new(String::new()));
    let sink = console.clone();
    let b = MicroVm::builder()
        .kernel(PVH_ELF)
        .cmdline(format!("console=ttyS0 ember.test={mode}"))
        .vcpus(1)
        .memory_mib(32)
        .serial(Serial::Callback(Box::new(move |bytes| {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(bytes));
        })));
    (b, console)
}

fn wait_for_console(console: &Mutex<String>, needle: &str) {
    let start = Instant::now();
    while !console.lock().unwrap().contains(needle) {
        assert!(
            start.elapsed() < PATIENCE,
            "the console never showed {needle:?}:\n{}",
            console.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn hello_guest_prints_and_resets() {
    if !kvm() {
        return;
    }
    let (b, console) = guest("hello");
    let mut vm = b.build().unwrap().start().unwrap();
    let start = Instant::now();
    let reason = loop {
        if let Some(r) = vm.try_wait().unwrap() {
            break r;
        }
        assert!(start.elapsed() < PATIENCE, "the guest did not end");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(reason, ExitReason::I8042Reset);
    assert!(reason.is_clean());
    assert_eq!(vm.wait().unwrap(), reason, "wait after try_wait");
    let out = console.lock().unwrap().clone();
    assert!(out.contains("ember-guest: hello from pvh boot"), "{out}");
    assert!(out.contains("ember-guest: done"), "{out}");
    // The VMM thread is gone: requests fail instead of hanging.
    assert!(matches!(vm.pause(), Err(MicroVmError::Gone)));
}

#[test]
fn pause_resume_and_ctrl_alt_del() {
    if !kvm() {
        return;
    }
    let (b, console) = guest("wait-ctrlaltdel");
    let mut vm = b.build().unwrap().start().unwrap();
    wait_for_console(&console, "ember-guest: waiting for ctrl-alt-del");
    vm.pause().unwrap();
    assert!(vm.is_paused().unwrap());
    vm.pause().unwrap(); // idempotent
    vm.resume().unwrap();
    assert!(!vm.is_paused().unwrap());
    assert_eq!(vm.try_wait().unwrap(), None);
    vm.send_ctrl_alt_del().unwrap();
    assert_eq!(vm.wait().unwrap(), ExitReason::I8042Reset);
    let out = console.lock().unwrap().clone();
    assert!(out.contains("ember-guest: ctrl-alt-del"), "{out}");
}

#[test]
fn a_paused_guest_prints_nothing_until_resumed() {
    if !kvm() {
        return;
    }
    let (b, console) = guest("ticker");
    let mut vm = b.build().unwrap().start().unwrap();
    wait_for_console(&console, "ember-guest: tick 1\n");
    vm.pause().unwrap();
    let frozen = console.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(console.lock().unwrap().len(), frozen, "output while paused");
    vm.resume().unwrap();
    let start = Instant::now();
    while console.lock().unwrap().len() == frozen {
        assert!(start.elapsed() < PATIENCE, "no output after resume");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.stop();
    assert_eq!(vm.wait().unwrap(), ExitReason::Stopped);
}

#[test]
fn a_crashing_guest_is_not_clean() {
    if !kvm() {
        return;
    }
    let (b, _console) = guest("triple-fault");
    let mut vm = b.build().unwrap().start().unwrap();
    let reason = vm.wait().unwrap();
    assert!(matches!(reason, ExitReason::Vcpu { .. }), "{reason}");
    assert!(!reason.is_clean(), "{reason}");
    assert_eq!(reason.exit_code(), vmm::ExitCode::GuestError);
}

#[test]
fn bad_configs_are_refused_at_build() {
    let err = MicroVm::builder()
        .kernel("/nonexistent/vmlinux")
        .build()
        .unwrap_err();
    assert!(
        matches!(err, MicroVmError::Config(ConfigError::KernelFile { .. })),
        "{err}"
    );
    assert_eq!(err.exit_code(), vmm::ExitCode::BadConfiguration);
    let err = MicroVm::builder().build().unwrap_err();
    assert!(
        matches!(err, MicroVmError::Config(ConfigError::Missing(_))),
        "{err}"
    );
    let err = MicroVm::builder()
        .kernel(PVH_ELF)
        .vcpus(0)
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            MicroVmError::Config(ConfigError::Machine(
                vmm::config::MachineConfigError::InvalidVcpuCount
            ))
        ),
        "{err}"
    );
}

#[test]
fn console_through_a_pipe() {
    if !kvm() {
        return;
    }
    use std::io::Read;
    let (serial, mut reader) = Serial::pipe().unwrap();
    let mut vm = MicroVm::builder()
        .kernel(PVH_ELF)
        .cmdline("ember.test=hello")
        .memory_mib(32)
        .serial(serial)
        .build()
        .unwrap()
        .start()
        .unwrap();
    assert_eq!(vm.wait().unwrap(), ExitReason::I8042Reset);
    // The VMM thread has ended (wait joined it): the writing end is closed.
    drop(vm);
    let mut out = String::new();
    reader.read_to_string(&mut out).unwrap();
    assert!(out.contains("ember-guest: hello from pvh boot"), "{out}");
}

/// Snapshots through the library: `MicroVmHandle::create_snapshot` on a
/// paused ticker, then `MicroVmBuilder::restore` in a new microVM whose
/// console continues the count.
#[test]
fn snapshot_and_restore_through_the_library() {
    use vmm::config::snapshot::{SnapshotCreateParams, SnapshotLoadParams, SnapshotType};
    if !kvm() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-libsnap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state").to_string_lossy().into_owned();
    let mem = dir.join("mem").to_string_lossy().into_owned();
    let (b, console) = guest("ticker");
    let vm = b.build().unwrap().start().unwrap();
    wait_for_console(&console, "tick 2\n");
    vm.pause().unwrap();
    vm.create_snapshot(SnapshotCreateParams {
        mem_file_path: mem.clone(),
        snapshot_path: state.clone(),
        snapshot_type: Some(SnapshotType::Full),
        version: None,
    })
    .unwrap();
    let before = console.lock().unwrap().clone();
    drop(vm);
    let last: u64 = before
        .lines()
        .filter_map(|l| l.strip_prefix("ember-guest: tick "))
        .filter_map(|n| n.parse().ok())
        .next_back()
        .unwrap();

    let after = Arc::new(Mutex::new(String::new()));
    let sink = after.clone();
    let p: SnapshotLoadParams = serde_json::from_value(serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true
    }))
    .unwrap();
    let vm = MicroVm::builder()
        .restore(p)
        .serial(Serial::Callback(Box::new(move |bytes| {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(bytes));
        })))
        .build()
        .unwrap()
        .start()
        .unwrap();
    wait_for_console(&after, &format!("ember-guest: tick {}\n", last + 2));
    assert!(
        !after.lock().unwrap().contains("ember-guest: tick 0\n"),
        "the guest booted again"
    );
    drop(vm);
    // Machine settings and a restore do not mix.
    let p: SnapshotLoadParams =
        serde_json::from_value(serde_json::json!({"snapshot_path": "s", "mem_file_path": "m"}))
            .unwrap();
    let e = MicroVm::builder()
        .kernel(PVH_ELF)
        .restore(p)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("snapshot"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
