//! The legacy devices on the PIO bus: COM1 (8250), the i8042 (reset line) and the ACPI
//! sleep/reset register.

use std::io::Write;
use std::sync::{Arc, Mutex};

use api::SerialConfig;
use devices::host_files;
use devices::legacy::{AcpiPowerDevice, OutputLimits, Serial, SerialOutput, I8042};
use devices::{Bus, ExitNotifier};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::DeviceError;
use crate::arch::x86_64::layout;

/// Where COM1's bytes go. Never blocks the vCPU that writes them: stdout is reopened
/// non-blocking with a bounded buffer, a file is capped in size and rate.
fn serial_output(config: &SerialConfig) -> Result<Box<dyn Write + Send>, DeviceError> {
    Ok(match config {
        SerialConfig::Stdout => {
            Box::new(SerialOutput::stdout().map_err(DeviceError::SerialStdout)?)
        }
        SerialConfig::Off => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(SerialOutput::new(
            host_files::open_output("serial output", path)?,
            OutputLimits::FILE,
        )),
    })
}

/// The PIO bus with the legacy devices on it, and the serial port (its input comes from the
/// event loop).
pub fn legacy_devices(
    vm: &VmFd,
    serial: &SerialConfig,
    exit: &Arc<ExitNotifier>,
) -> Result<(Bus, Arc<Mutex<Serial>>), DeviceError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
        .map_err(|source| DeviceError::Kvm {
            op: "IRQFD (serial)",
            source,
        })?;
    let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_output(serial)?)));

    let pio = Bus::new();
    pio.insert(serial.clone(), u64::from(layout::COM1_PORT), 8)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
    // Data port 0x60 through command port 0x64, one device.
    pio.insert(i8042, u64::from(layout::I8042_DATA_PORT), 5)?;
    let acpi_power = Arc::new(Mutex::new(AcpiPowerDevice::new(
        exit.clone(),
        layout::ACPI_S5_SLEEP_TYPE,
        layout::ACPI_RESET_VALUE,
    )));
    pio.insert(acpi_power, u64::from(layout::ACPI_SLEEP_CONTROL_PORT), 2)?;
    Ok((pio, serial))
}
