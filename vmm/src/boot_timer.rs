//! `--boot-timer`: Firecracker's boot-time probe. A one-byte MMIO device at
//! the start of the MMIO gap (where Firecracker puts it; virtio-mmio devices
//! then start one page later). When the guest writes 123 there, the VMM
//! logs the wall-clock and CPU time since `InstanceStart` was handled, in
//! Firecracker's words (`Guest-boot-time = ...`), at info level.

use std::time::Instant;

use devices::bus::BusDevice;

/// The value a guest writes when it has booted.
pub const MAGIC_BOOT_COMPLETE: u8 = 123;

/// CPU time of the whole process in microseconds.
pub fn process_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// The probe.
pub struct BootTimer {
    start: Instant,
    start_cpu_us: u64,
}

impl BootTimer {
    /// Starts timing now.
    pub fn new() -> Self {
        BootTimer {
            start: Instant::now(),
            start_cpu_us: process_cpu_us(),
        }
    }
}

impl Default for BootTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 || data != [MAGIC_BOOT_COMPLETE] {
            return;
        }
        let us = self.start.elapsed().as_micros() as u64;
        let cpu = process_cpu_us().saturating_sub(self.start_cpu_us);
        log::info!(
            "Guest-boot-time = {us:>6} us {} ms, {cpu:>6} CPU us {} CPU ms",
            us / 1000,
            cpu / 1000
        );
    }
}
