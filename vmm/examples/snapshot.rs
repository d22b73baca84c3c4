//! Snapshots ember's ticking test guest and restores it in a second
//! microVM of the same process: the count goes on where it stopped.
//!
//! `cargo run -p vmm --example snapshot`

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::config::snapshot::{SnapshotCreateParams, SnapshotLoadParams, SnapshotType};
use vmm::{MicroVm, Serial};

fn console() -> (Arc<Mutex<String>>, Serial) {
    let c = Arc::new(Mutex::new(String::new()));
    let sink = c.clone();
    let s = Serial::Callback(Box::new(move |b| {
        sink.lock().unwrap().push_str(&String::from_utf8_lossy(b));
    }));
    (c, s)
}

fn wait_for(c: &Mutex<String>, needle: &str) -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    while !c.lock().unwrap().contains(needle) {
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!("the console never showed {needle:?}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kernel = common::guest_or_exit();
    let dir = std::env::temp_dir().join(format!("ember-snapshot-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let state = dir.join("vm.state").to_string_lossy().into_owned();
    let mem = dir.join("vm.mem").to_string_lossy().into_owned();

    let (out, serial) = console();
    let vm = MicroVm::builder()
        .kernel(&kernel)
        .cmdline("console=ttyS0 ember.test=ticker")
        .memory_mib(32)
        .serial(serial)
        .build()?
        .start()?;
    wait_for(&out, "tick 3\n")?;
    vm.pause()?;
    let t = Instant::now();
    vm.create_snapshot(SnapshotCreateParams {
        mem_file_path: mem.clone(),
        snapshot_path: state.clone(),
        snapshot_type: Some(SnapshotType::Full),
        version: None,
    })?;
    println!("snapshot taken in {} us", t.elapsed().as_micros());
    drop(vm);
    print!("{}", out.lock().unwrap());

    let (out, serial) = console();
    let load: SnapshotLoadParams = serde_json::from_value(serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true
    }))?;
    let t = Instant::now();
    let vm = MicroVm::builder()
        .restore(load)
        .serial(serial)
        .build()?
        .start()?;
    println!("restored in {} us", t.elapsed().as_micros());
    wait_for(&out, "tick 5\n")?;
    println!("the guest goes on:");
    drop(vm);
    print!("{}", out.lock().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
