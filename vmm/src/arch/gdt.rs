//! Segment descriptors for the boot GDT and their KVM segment form.

use kvm_bindings::kvm_segment;

/// Builds a segment descriptor from its access/flags word, base and limit.
/// `flags` packs the access byte in bits 0..8 and the flags nibble in 12..16.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

fn base(entry: u64) -> u64 {
    ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)
}

fn limit(entry: u64) -> u32 {
    let raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM view of GDT entry number `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// GDT for the Linux 64-bit protocol: null, 64-bit code, data, TSS.
pub fn long_mode_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// GDT for PVH: null, flat 32-bit code, flat data, TSS.
pub fn pvh_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xc09b, 0, 0xffff_ffff),
        gdt_entry(0xc093, 0, 0xffff_ffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment() {
        let seg = kvm_segment_from_gdt(long_mode_gdt()[1], 1);
        assert_eq!(seg.selector, 0x08);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.s, 1);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.base, 0);
    }

    #[test]
    fn pvh_segments_are_flat_32_bit() {
        let gdt = pvh_gdt();
        let cs = kvm_segment_from_gdt(gdt[1], 1);
        assert_eq!((cs.db, cs.l, cs.limit, cs.type_), (1, 0, 0xffff_ffff, 0xb));
        let ds = kvm_segment_from_gdt(gdt[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.db), (0x10, 0x3, 1));
        let tss = kvm_segment_from_gdt(gdt[3], 3);
        assert_eq!((tss.selector, tss.limit, tss.s), (0x18, 0x67, 0));
    }

    #[test]
    fn null_entry_is_unusable() {
        let seg = kvm_segment_from_gdt(0, 0);
        assert_eq!(seg.unusable, 1);
        assert_eq!(seg.present, 0);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        assert_eq!(base(e), 0x1234_5678);
        assert_eq!(limit(e), 0xabcde);
    }
}
