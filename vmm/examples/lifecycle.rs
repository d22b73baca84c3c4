//! Pauses, resumes and reboots ember's test guest with Ctrl-Alt-Del. The
//! guest (`ember.test=wait-ctrlaltdel`) polls the i8042 for the key
//! sequence and resets when it sees it.
//!
//! `cargo run -p vmm --example lifecycle`

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::{ExitReason, MicroVm, Serial};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kernel = common::guest_or_exit();
    let console = Arc::new(Mutex::new(String::new()));
    let sink = console.clone();
    let mut vm = MicroVm::builder()
        .kernel(&kernel)
        .cmdline("console=ttyS0 ember.test=wait-ctrlaltdel")
        .memory_mib(64)
        .serial(Serial::Callback(Box::new(move |b| {
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(b));
        })))
        .build()?
        .start()?;

    let start = Instant::now();
    while !console.lock().unwrap().contains("waiting for ctrl-alt-del") {
        if start.elapsed() > Duration::from_secs(30) {
            return Err("the guest never got ready".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.pause()?;
    println!("paused: {}", vm.is_paused()?);
    std::thread::sleep(Duration::from_millis(200));
    vm.resume()?;
    println!("resumed: paused = {}", vm.is_paused()?);
    vm.send_ctrl_alt_del()?;
    let reason = vm.wait()?;
    print!("{}", console.lock().unwrap());
    println!("the guest ended: {reason}");
    if reason != ExitReason::I8042Reset {
        return Err(format!("expected an i8042 reset, got {reason}").into());
    }
    Ok(())
}
