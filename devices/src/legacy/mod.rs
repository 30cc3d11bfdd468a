//! Legacy PC devices that a Kata guest still touches.

mod acpi_ged;
mod acpi_power;
mod i8042;
mod serial;
pub mod serial_output;

pub use acpi_ged::{AcpiGed, ACPI_GED_EVENT_POWER_BUTTON, ACPI_GED_LEN};
pub use acpi_power::AcpiPowerDevice;
pub use i8042::{I8042Error, I8042};
pub use serial::{EventFdTrigger, Serial, SerialSink};
pub use serial_output::{OutputBudget, OutputLimits, SerialOutput};
