//! Boots ember's test guest and prints its console.
//!
//! `cargo run -p vmm --example hello`

mod common;

use vmm::{MicroVm, Serial};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kernel = common::guest_or_exit();
    let mut vm = MicroVm::builder()
        .kernel(&kernel)
        .cmdline("console=ttyS0 ember.test=hello")
        .vcpus(1)
        .memory_mib(64)
        .serial(Serial::Stdout)
        .build()?
        .start()?;
    // The guest prints its greeting, then resets through the i8042.
    let reason = vm.wait()?;
    println!("the guest ended: {reason}");
    assert!(reason.is_clean());
    Ok(())
}
