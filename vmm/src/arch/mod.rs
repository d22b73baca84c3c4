//! x86_64 specifics: layout, boot information, registers, CPUID, MSRs, MP table, ACPI.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
