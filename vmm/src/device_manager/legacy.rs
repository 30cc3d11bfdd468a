//! The legacy devices on the PIO bus: COM1 (8250), the i8042 (reset line, and a keyboard that
//! can type Ctrl-Alt-Del), the ACPI sleep/reset register and the ACPI Generic Event Device that
//! carries the power button.

use std::sync::{Arc, Mutex};

use api::SerialConfig;
use devices::host_files;
use devices::legacy::{
    AcpiGed, AcpiPowerDevice, OutputLimits, Serial, SerialOutput, SerialSink, ACPI_GED_LEN, I8042,
};
use devices::{Bus, ExitNotifier};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::DeviceError;
use crate::arch::x86_64::layout;

/// Where COM1's bytes go. Never blocks the vCPU that writes them: stdout is reopened
/// non-blocking with a bounded buffer, a file is capped in size and rate.
fn serial_output(config: &SerialConfig) -> Result<Box<dyn SerialSink>, DeviceError> {
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

/// The legacy devices, on their PIO bus.
pub struct LegacyDevices {
    pub pio: Bus,
    /// COM1; its input comes from the event loop.
    pub serial: Arc<Mutex<Serial>>,
    /// The power button's event source (ACPI GED).
    pub ged: Arc<Mutex<AcpiGed>>,
    /// Its keyboard types Ctrl-Alt-Del for guests without ACPI.
    pub i8042: Arc<Mutex<I8042>>,
}

/// An eventfd registered as the irqfd of legacy interrupt `gsi`.
fn legacy_irq(vm: &VmFd, gsi: u32, device: &'static str) -> Result<EventFd, DeviceError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.register_irqfd(&irq, gsi)
        .map_err(|source| DeviceError::Kvm { op: device, source })?;
    Ok(irq)
}

/// COM1, the i8042, the ACPI sleep/reset register and the ACPI GED, each with its interrupt.
pub fn legacy_devices(
    vm: &VmFd,
    serial: &SerialConfig,
    exit: &Arc<ExitNotifier>,
) -> Result<LegacyDevices, DeviceError> {
    let serial_irq = legacy_irq(vm, layout::COM1_IRQ, "IRQFD (serial)")?;
    let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_output(serial)?)));
    let keyboard_irq = legacy_irq(vm, layout::I8042_KEYBOARD_IRQ, "IRQFD (i8042)")?;
    let i8042 = Arc::new(Mutex::new(I8042::with_keyboard_interrupt(
        exit.clone(),
        keyboard_irq,
    )));
    let ged_irq = legacy_irq(vm, layout::ACPI_GED_IRQ, "IRQFD (ACPI GED)")?;
    let ged = Arc::new(Mutex::new(AcpiGed::new(ged_irq)));

    let pio = Bus::new();
    pio.insert(serial.clone(), u64::from(layout::COM1_PORT), 8)?;
    // Data port 0x60 through command port 0x64, one device.
    pio.insert(i8042.clone(), u64::from(layout::I8042_DATA_PORT), 5)?;
    let acpi_power = Arc::new(Mutex::new(AcpiPowerDevice::new(
        exit.clone(),
        layout::ACPI_S5_SLEEP_TYPE,
        layout::ACPI_RESET_VALUE,
    )));
    pio.insert(acpi_power, u64::from(layout::ACPI_SLEEP_CONTROL_PORT), 2)?;
    pio.insert(ged.clone(), u64::from(layout::ACPI_GED_PORT), ACPI_GED_LEN)?;
    Ok(LegacyDevices {
        pio,
        serial,
        ged,
        i8042,
    })
}
