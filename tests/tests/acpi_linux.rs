//! A stock Debian cloud kernel finds ember's ACPI tables.
//!
//! Linux cannot fully boot on the CI host (nested PVM KVM: it dies on an
//! instruction the host cannot emulate), but with `earlyprintk` it gets far
//! enough to log the e820 map, every ACPI table it found and the CPUs the
//! MADT gave it. This kernel is built without `CONFIG_X86_MPPARSE`, so the
//! CPUs it counts come from ember's MADT alone.
//!
//! The kernel comes from `resources/ci/fetch-kernel.sh` (run by `.ci/run`),
//! which writes the paths of the bzImage and of the ELF vmlinux extracted from
//! it to `/var/cache/ember/kernel/{bzImage,vmlinux}.path`; `EMBER_TEST_KERNEL`
//! and `EMBER_TEST_VMLINUX` override them. Without a kernel the test prints
//! SKIP and passes (but fails when `CI` is set).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ember_tests::*;

const CACHE: &str = "/var/cache/ember/kernel";
const VCPUS: u8 = 2;
const MEM_MIB: u32 = 256;
/// How long the kernel may take to log everything. Here the vmlinux logs it
/// in ~30-60 s; the bzImage's stub first spends ~1.5-2 min decompressing
/// (LZ4) in the guest.
const BOUND: Duration = Duration::from_secs(300);
/// One Linux guest at a time: two would share the host's cores and slow both.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The kernel to boot, or None (skip). Under CI (`.ci/run` fetches the
/// kernel) a missing kernel is a failure, not a skip.
fn kernel(env: &str, file: &str) -> Option<PathBuf> {
    let p = match std::env::var_os(env) {
        Some(p) => Some(PathBuf::from(p)),
        None => std::fs::read_to_string(format!("{CACHE}/{file}"))
            .ok()
            .map(|f| PathBuf::from(f.trim())),
    };
    let p = p.filter(|p| p.is_file());
    assert!(
        p.is_some() || std::env::var_os("CI").is_none(),
        "CI is set but there is no kernel ({env} or {CACHE}/{file}): .ci/run runs resources/ci/fetch-kernel.sh"
    );
    p
}

/// Lines the kernel's own log must hold.
fn expected() -> Vec<String> {
    let mut v: Vec<String> = [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 EMBER )",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "IOAPIC[0]: apic_id 3, version 17, address 0xfec00000, GSI 0-23",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("smpboot: Allowing {VCPUS} CPUs, 0 hotplug CPUs"));
    v
}

/// Boots `kernel` with a virtio-blk device, waits (bounded) for every
/// expected line, stops the VMM and returns the serial log.
fn boot_until_acpi_is_logged(kernel: &PathBuf) -> (String, String) {
    let dir = TempDir::new("acpi-linux");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let serial = dir.join("serial.log");
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "boot_args": "earlyprintk=serial,ttyS0,115200 nokaslr console=ttyS0",
        },
        "machine-config": {"vcpu_count": VCPUS, "mem_size_mib": MEM_MIB},
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": disk,
            "is_root_device": true,
            "is_read_only": false,
        }],
    });
    let cfg_path = dir.join("vm.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut cmd = Command::new(bin("ember-vmm"));
    cmd.arg("--no-api")
        .arg("--log-level")
        .arg("info")
        .arg("--config-file")
        .arg(&cfg_path)
        .arg("--serial-out")
        .arg(&serial);
    let mut p = Proc::spawn(cmd, dir.path(), "vmm");
    let want = expected();
    let start = Instant::now();
    let log = loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        let done = want.iter().all(|w| log.contains(w.as_str()));
        if done || p.try_status().is_some() || start.elapsed() > BOUND {
            break log;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "{}: {:.1} s, VMM status {:?}",
        kernel.display(),
        start.elapsed().as_secs_f64(),
        p.try_status()
    );
    // Stop the VMM now: the rest of the boot cannot succeed on this host.
    if p.try_status().is_none() {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) };
        p.wait();
    }
    (log, p.err())
}

/// `protocol`: how ember-vmm must have entered the kernel (its info log line),
/// i.e. where the kernel read the RSDP address from.
fn check(kernel: &PathBuf, protocol: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (log, vmm_err) = boot_until_acpi_is_logged(kernel);
    let want =
        format!("boot: {protocol}, ACPI RSDP at 0xe0000, 1 virtio-mmio device(s) in the DSDT");
    assert!(
        vmm_err.contains(&want),
        "want {want:?} in ember-vmm's log:\n{vmm_err}"
    );
    let acpi: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ACPI") || l.contains("e820") || l.contains("smpboot"))
        .collect();
    eprintln!("{}:\n{}", kernel.display(), acpi.join("\n"));
    for w in expected() {
        assert!(
            log.contains(&w),
            "{}: the kernel log lacks {w:?}\n--- serial log ---\n{log}",
            kernel.display()
        );
    }
    // Every table is ember's.
    for sig in ["XSDT", "FACP", "DSDT", "APIC"] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("ACPI: {sig} 0x")))
            .unwrap();
        assert!(line.contains("EMBER  EMBERVMM"), "{line}");
    }
    for bad in ["ACPI BIOS Error", "ACPI Error", "ACPI: Invalid", "checksum"] {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains(bad) && !l.contains("Early table checksum verification disabled")
            })
            .collect();
        assert!(lines.is_empty(), "{}: {lines:?}", kernel.display());
    }
}

/// The vmlinux has a PVH note: the kernel gets the RSDP from `hvm_start_info.rsdp_paddr`.
#[test]
fn debian_kernel_finds_embers_acpi_tables_vmlinux() {
    match kernel("EMBER_TEST_VMLINUX", "vmlinux.path") {
        Some(k) => check(&k, "Pvh protocol"),
        None => eprintln!(
            "SKIP debian_kernel_finds_embers_acpi_tables_vmlinux: no kernel \
             (run resources/ci/fetch-kernel.sh or set EMBER_TEST_VMLINUX)"
        ),
    }
}

/// The bzImage boots by the Linux protocol: the RSDP comes from the zero page.
#[test]
fn debian_kernel_finds_embers_acpi_tables_bzimage() {
    match kernel("EMBER_TEST_KERNEL", "bzImage.path") {
        Some(k) => check(&k, "Linux64 protocol (bzImage)"),
        None => eprintln!(
            "SKIP debian_kernel_finds_embers_acpi_tables_bzimage: no kernel \
             (run resources/ci/fetch-kernel.sh or set EMBER_TEST_KERNEL)"
        ),
    }
}
