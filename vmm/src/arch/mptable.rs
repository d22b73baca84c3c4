//! Intel MultiProcessor Specification 1.4 tables: how guests find their CPUs,
//! the IOAPIC and the ISA interrupt routing.

use devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_DEFAULT_PHYS_BASE, IO_APIC_DEFAULT_PHYS_BASE, IRQ_MAX, MAX_VCPUS};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_VCPUS})")]
    TooManyCpus(u8),
    #[error("MP table does not fit in guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

const MPC_SPEC: u8 = 4;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MPC_APIC_USABLE: u8 = 1;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, as they
/// are to be written at `base`.
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let table_addr = base + 16;

    // Configuration table entries.
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        let kind = if irq == 0 { MP_IRQ_EXTINT } else { MP_IRQ_INT };
        // type, irq type, flags (u16, conforming), source bus, source irq, dest apic, dest pin
        entries.extend_from_slice(&[MP_INTSRC, kind, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // ExtINT to LINT0 and NMI to LINT1 of every local APIC (0xff = all).
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    // Configuration table header (44 bytes).
    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, below
    table.extend_from_slice(b"EMBER   ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    // Floating pointer (16 bytes).
    let mut fp = Vec::with_capacity(16 + table.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(MPC_SPEC);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0u8; 5]); // feature bytes: config table present
    fp[10] = checksum(&fp[..16]);
    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table for `num_cpus` at `base`.
pub fn setup(mem: &GuestMemoryMmap, base: u64, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(base, num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(base))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero_and_counts_match() {
        for cpus in [1u8, 2, 32] {
            let b = build(0x9fc00, cpus).unwrap();
            assert_eq!(&b[..4], b"_MP_");
            assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let table = &b[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count as usize, cpus as usize + 2 + 24 + 2);
            let addr = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            assert_eq!(addr, 0x9fc10);
            // processors come first, 20 bytes each
            let procs = table[44..]
                .chunks(20)
                .take(cpus as usize)
                .filter(|e| e[0] == MP_PROCESSOR)
                .count();
            assert_eq!(procs, cpus as usize);
        }
    }

    #[test]
    fn refuses_bad_cpu_counts() {
        assert!(build(0, 0).is_err());
        assert!(build(0, MAX_VCPUS + 1).is_err());
    }

    #[test]
    fn fits_below_640k() {
        let b = build(super::super::layout::MPTABLE_START, MAX_VCPUS).unwrap();
        assert!(super::super::layout::MPTABLE_START + b.len() as u64 <= 0xa0000);
    }
}
