//! ACPI tables (RSDP, XSDT, hardware-reduced FADT, MADT, DSDT), built with the
//! rust-vmm `acpi_tables` crate and written to the legacy BIOS area
//! (`ACPI_START`..1 MiB, reserved in the e820 map). Guests find the RSDP
//! through the zero page's `acpi_rsdp_addr`, PVH `rsdp_paddr`, or by scanning
//! 0xE0000..0xFFFFF for `RSD PTR ` on a 16-byte boundary.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml, AmlSink};
use devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("{0} vCPUs do not fit in the MADT (1..={MAX_VCPUS})")]
    BadCpuCount(u8),
    #[error("{0} virtio devices do not fit in the DSDT names (at most 4096)")]
    TooManyDevices(usize),
    #[error("ACPI tables ({0} bytes) do not fit below 1 MiB")]
    TooBig(u64),
    #[error("cannot write ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

const OEM_ID: [u8; 6] = *b"EMBER ";
const OEM_TABLE_ID: [u8; 8] = *b"EMBERVMM";
const OEM_REVISION: u32 = 1;
/// IA-PC boot architecture flags (FADT): an 8042 is present, no VGA, no MSI.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;

/// One virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDesc {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// The tables, each with the guest address it is built for.
#[derive(Debug)]
pub struct AcpiTables {
    /// (guest address, bytes, signature), in address order; RSDP first.
    pub tables: Vec<(u64, Vec<u8>, [u8; 4])>,
}

impl AcpiTables {
    /// The RSDP's guest address.
    pub fn rsdp_addr(&self) -> u64 {
        self.tables[0].0
    }

    /// The bytes of the table with this signature (`RSD ` for the RSDP).
    #[cfg(test)]
    pub fn get(&self, sig: &[u8; 4]) -> Option<&[u8]> {
        self.tables
            .iter()
            .find(|t| &t.2 == sig)
            .map(|t| t.1.as_slice())
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT body: a `\_SB_` scope with COM1, the i8042 and each virtio-mmio device.
fn dsdt(virtio: &[VirtioMmioDesc]) -> Result<Vec<u8>, AcpiError> {
    if virtio.len() > 0x1000 {
        return Err(AcpiError::TooManyDevices(virtio.len()));
    }
    let mut devs: Vec<Vec<u8>> = Vec::new();

    // COM1: 8 ports at 0x3f8, IRQ 4 (ISA: edge, active high).
    let com1_io = aml::IO::new(SERIAL_PORT_BASE as u16, SERIAL_PORT_BASE as u16, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let uid0: aml::Byte = 0;
    devs.push(bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &com1_hid),
            &aml::Name::new("_UID".into(), &uid0),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )));

    // i8042: data 0x60, command/status 0x64, keyboard IRQ 1.
    let kbd_data = aml::IO::new(I8042_PORT_BASE as u16, I8042_PORT_BASE as u16, 1, 1);
    let kbd_cmd = aml::IO::new(I8042_PORT_BASE as u16 + 4, I8042_PORT_BASE as u16 + 4, 1, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, I8042_KBD_IRQ);
    let kbd_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = aml::EISAName::new("PNP0303");
    devs.push(bytes(&aml::Device::new(
        "PS2_".into(),
        vec![
            &aml::Name::new("_HID".into(), &kbd_hid),
            &aml::Name::new("_UID".into(), &uid0),
            &aml::Name::new("_CRS".into(), &kbd_crs),
        ],
    )));

    // virtio-mmio: Linux's virtio_mmio driver matches _HID "LNRO0005".
    for (i, d) in virtio.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, d.base as u32, d.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, d.irq);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid: aml::AmlStr = "LNRO0005";
        let uid = i as aml::DWord;
        let name = format!("V{i:03X}");
        devs.push(bytes(&aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &hid),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )));
    }

    struct Raw(Vec<u8>);
    impl Aml for Raw {
        fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
            sink.vec(&self.0);
        }
    }
    let raw: Vec<Raw> = devs.into_iter().map(Raw).collect();
    let children: Vec<&dyn Aml> = raw.iter().map(|r| r as &dyn Aml).collect();
    Ok(bytes(&aml::Scope::new("_SB_".into(), children)))
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Builds every table for `num_cpus` vCPUs and these virtio-mmio devices,
/// laid out from `ACPI_START`.
pub fn build(num_cpus: u8, virtio: &[VirtioMmioDesc]) -> Result<AcpiTables, AcpiError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(AcpiError::BadCpuCount(num_cpus));
    }
    let rsdp_addr = ACPI_START;
    let mut next = align8(rsdp_addr + Rsdp::len() as u64);

    // DSDT.
    let body = dsdt(virtio)?;
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    let dsdt_addr = next;
    next = align8(next + dsdt.len() as u64);

    // FADT: hardware reduced, DSDT by its 64-bit address.
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED)
            .into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"EMBERVMM").into();
    let fadt = bytes(&fadt.finalize());
    let fadt_addr = next;
    next = align8(next + fadt.len() as u64);

    // MADT: a local APIC per vCPU (ACPI id = APIC id = vCPU index, as in the
    // MP table) and the IOAPIC (id num_cpus + 1, GSI base 0).
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_DEFAULT_PHYS_BASE),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(num_cpus + 1, IO_APIC_DEFAULT_PHYS_BASE, 0));
    let madt = bytes(&madt);
    let madt_addr = next;
    next = align8(next + madt.len() as u64);

    // XSDT.
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    let xsdt_addr = next;
    next += xsdt.len() as u64;
    if next > HIMEM_START {
        return Err(AcpiError::TooBig(next - ACPI_START));
    }

    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(AcpiTables {
        tables: vec![
            (rsdp_addr, rsdp, *b"RSD "),
            (dsdt_addr, dsdt.as_slice().to_vec(), *b"DSDT"),
            (fadt_addr, fadt, *b"FACP"),
            (madt_addr, madt, *b"APIC"),
            (xsdt_addr, xsdt, *b"XSDT"),
        ],
    })
}

/// Builds the tables and writes them to guest memory; returns the RSDP address.
pub fn setup(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    virtio: &[VirtioMmioDesc],
) -> Result<u64, AcpiError> {
    let t = build(num_cpus, virtio)?;
    for (addr, b, _) in &t.tables {
        mem.write_slice(b, GuestAddress(*addr))?;
    }
    Ok(t.rsdp_addr())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn le64(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn devs() -> Vec<VirtioMmioDesc> {
        (0..3)
            .map(|i| VirtioMmioDesc {
                base: MMIO_MEM_START + i * MMIO_DEVICE_SIZE,
                size: MMIO_DEVICE_SIZE,
                irq: IRQ_BASE + i as u32,
            })
            .collect()
    }

    #[test]
    fn checksums_and_lengths_are_valid() {
        let t = build(4, &devs()).unwrap();
        let rsdp = t.get(b"RSD ").unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(le32(rsdp, 20) as usize, rsdp.len());
        assert_eq!(t.rsdp_addr() % 16, 0);
        assert!(t.rsdp_addr() >= 0xe0000 && t.rsdp_addr() < 0x100000);
        for (addr, b, sig) in &t.tables[1..] {
            assert_eq!(&b[..4], sig);
            assert_eq!(le32(b, 4) as usize, b.len(), "{sig:?} length");
            assert_eq!(sum(b), 0, "{sig:?} checksum");
            assert_eq!(addr % 8, 0);
            assert!(addr + b.len() as u64 <= HIMEM_START);
        }
        // Tables do not overlap.
        for w in t.tables.windows(2) {
            assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0);
        }
    }

    #[test]
    fn pointers_chain_rsdp_to_every_table() {
        let t = build(2, &devs()).unwrap();
        let addr_of = |sig: &[u8; 4]| t.tables.iter().find(|x| &x.2 == sig).unwrap().0;
        let rsdp = t.get(b"RSD ").unwrap();
        assert_eq!(le64(rsdp, 24), addr_of(b"XSDT"));
        let xsdt = t.get(b"XSDT").unwrap();
        let entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|o| le64(xsdt, o)).collect();
        assert_eq!(entries, vec![addr_of(b"FACP"), addr_of(b"APIC")]);
        let fadt = t.get(b"FACP").unwrap();
        assert_eq!(le64(fadt, 140), addr_of(b"DSDT"), "X_DSDT");
        assert_ne!(le32(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert!(fadt[8] >= 5, "FADT revision");
    }

    #[test]
    fn madt_has_one_lapic_per_vcpu_and_the_ioapic() {
        for n in [1u8, 2, 7, MAX_VCPUS] {
            let t = build(n, &[]).unwrap();
            let madt = t.get(b"APIC").unwrap();
            assert_eq!(le32(madt, 36), APIC_DEFAULT_PHYS_BASE);
            let mut off = 44;
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            while off < madt.len() {
                let (ty, len) = (madt[off], madt[off + 1] as usize);
                match ty {
                    0 => {
                        assert_eq!(le32(madt, off + 4) & 1, 1, "enabled");
                        lapics.push((madt[off + 2], madt[off + 3]));
                    }
                    1 => ioapics.push((madt[off + 2], le32(madt, off + 4), le32(madt, off + 8))),
                    _ => panic!("unexpected MADT entry {ty}"),
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            let want: Vec<(u8, u8)> = (0..n).map(|i| (i, i)).collect();
            assert_eq!(lapics, want);
            assert_eq!(ioapics, vec![(n + 1, IO_APIC_DEFAULT_PHYS_BASE, 0)]);
        }
    }

    fn find(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_describes_each_device() {
        let t = build(1, &devs()).unwrap();
        let dsdt = t.get(b"DSDT").unwrap();
        assert_eq!(
            dsdt.windows(8).filter(|w| w == b"LNRO0005").count(),
            3,
            "one _HID per virtio device"
        );
        for d in devs() {
            // Memory32Fixed: 0x86, len 9, rw, base, size.
            let mut m = vec![0x86, 9, 0, 1];
            m.extend_from_slice(&(d.base as u32).to_le_bytes());
            m.extend_from_slice(&(d.size as u32).to_le_bytes());
            assert!(find(dsdt, &m), "memory range of {d:?}");
            // Extended interrupt: 0x89, len 6, flags, count 1, irq.
            let mut i = vec![0x89, 6, 0, 0x3, 1];
            i.extend_from_slice(&d.irq.to_le_bytes());
            assert!(find(dsdt, &i), "interrupt of {d:?}");
        }
        // COM1 at 0x3f8 (8 ports) IRQ 4, i8042 at 0x60/0x64 IRQ 1.
        assert!(find(dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
        assert!(find(dsdt, &[0x89, 6, 0, 3, 1, 4, 0, 0, 0]));
        assert!(find(dsdt, &[0x47, 1, 0x60, 0, 0x60, 0, 1, 1]));
        assert!(find(dsdt, &[0x47, 1, 0x64, 0, 0x64, 0, 1, 1]));
        assert!(find(dsdt, &[0x89, 6, 0, 3, 1, 1, 0, 0, 0]));
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        assert!(matches!(build(0, &[]), Err(AcpiError::BadCpuCount(0))));
        assert!(build(MAX_VCPUS + 1, &[]).is_err());
    }

    /// Disassembles ember's DSDT with `iasl -d` (acpica-tools) and checks each
    /// device's resources. Skipped with a message when iasl is missing,
    /// unless CI is set (`.ci/run` installs acpica-tools).
    #[test]
    fn iasl_disassembles_the_dsdt() {
        let have = std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_ok();
        if !have {
            assert!(
                std::env::var_os("CI").is_none(),
                "iasl (acpica-tools) is required in CI"
            );
            eprintln!("SKIP iasl_disassembles_the_dsdt: iasl not installed (apt-get install acpica-tools)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("ember-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = build(2, &devs()).unwrap();
        let aml = dir.join("dsdt.aml");
        std::fs::write(&aml, t.get(b"DSDT").unwrap()).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .current_dir(&dir)
            .output()
            .unwrap();
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap_or_else(|e| {
            panic!(
                "iasl -d wrote no dsdt.dsl ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let _ = std::fs::remove_dir_all(&dir);
        let compact: String = dsl.split_whitespace().collect::<Vec<_>>().join(" ");
        for (i, d) in devs().iter().enumerate() {
            let dev = format!("Device (V{i:03X})");
            let start = compact
                .find(&dev)
                .unwrap_or_else(|| panic!("{dev} missing:\n{dsl}"));
            let body = &compact[start..];
            let end = body[1..]
                .find("Device (")
                .map(|e| e + 1)
                .unwrap_or(body.len());
            let body = &body[..end];
            assert!(body.contains("Name (_HID, \"LNRO0005\")"), "{body}");
            assert!(
                body.contains(&format!("Memory32Fixed (ReadWrite, 0x{:08X}, // Address Base 0x{:08X}, // Address Length", d.base, d.size)),
                "{body}"
            );
            assert!(
                body.contains(&format!(
                    "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {{ 0x{:08X}, }}",
                    d.irq
                )),
                "{body}"
            );
        }
        let com1 = &compact[compact.find("Device (COM1)").expect("COM1")..];
        assert!(com1.contains("Name (_HID, EisaId (\"PNP0501\")"), "{dsl}");
        assert!(com1.contains("IO (Decode16, 0x03F8, // Range Minimum 0x03F8, // Range Maximum 0x01, // Alignment 0x08, // Length ) Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000004, }"), "{dsl}");
        let ps2 = &compact[compact.find("Device (PS2)").expect("PS2")..];
        assert!(ps2.contains("Name (_HID, EisaId (\"PNP0303\")"), "{dsl}");
        assert!(ps2.contains("IO (Decode16, 0x0060, // Range Minimum 0x0060, // Range Maximum 0x01, // Alignment 0x01, // Length ) IO (Decode16, 0x0064, // Range Minimum 0x0064, // Range Maximum 0x01, // Alignment 0x01, // Length ) Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000001, }"), "{dsl}");
    }
}
