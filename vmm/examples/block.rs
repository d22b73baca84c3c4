//! Boots ember's test guest with a virtio-blk drive; the guest reads it and
//! prints what it found (capacity, a hash of the first 4 KiB), which this
//! example checks against the file.
//!
//! `cargo run -p vmm --example block`

mod common;

use std::sync::mpsc::channel;

use vmm::config::DriveConfig;
use vmm::{MicroVm, Serial};

/// FNV-1a 32, the hash the guest prints.
fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kernel = common::guest_or_exit();
    let disk = std::env::temp_dir().join(format!("ember-example-{}.img", std::process::id()));
    let data: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i * 31 + i / 509) as u8)
        .collect();
    std::fs::write(&disk, &data)?;

    let (tx, rx) = channel::<Vec<u8>>();
    let result = MicroVm::builder()
        .kernel(&kernel)
        .cmdline("console=ttyS0 ember.test=blk")
        .memory_mib(64)
        .drive(DriveConfig {
            drive_id: "data".into(),
            path_on_host: disk.display().to_string(),
            is_root_device: false,
            is_read_only: true,
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
            socket: None,
        })
        .serial(Serial::Callback(Box::new(move |b| {
            let _ = tx.send(b.to_vec());
        })))
        .build()
        .and_then(|vm| vm.start())
        .and_then(|mut vm| vm.wait());
    let _ = std::fs::remove_file(&disk);
    let reason = result?;

    let console =
        String::from_utf8_lossy(&rx.try_iter().flatten().collect::<Vec<u8>>()).into_owned();
    let results: Vec<&str> = console
        .lines()
        .filter_map(|l| l.strip_prefix("ember-guest: blk "))
        .collect();
    for r in &results {
        println!("guest: blk {r}");
    }
    let want = format!("read fnv1a 0x{:08x}", fnv1a(&data[..4096]));
    println!("the guest ended: {reason}");
    if !results.iter().any(|r| *r == want) {
        return Err(format!("the guest did not report {want:?}").into());
    }
    println!("the guest read the drive intact");
    Ok(())
}
