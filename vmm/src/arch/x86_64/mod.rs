//! x86_64: memory layout, boot protocol, vCPU state and firmware tables.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod lapic;
pub mod layout;
pub mod msr;
pub mod regs;
