//! The ACPI Generic Event Device (GED, `_HID` `ACPI0013`): how a hardware-reduced ACPI platform,
//! which has no GPE blocks and no SCI, tells the guest that something happened. Here the only
//! event is the power button.
//!
//! One byte-wide register, the event status: each bit a pending event. Raising an event sets its
//! bit and pulses the GED's interrupt (edge-triggered: the `EventFd` is registered as an irqfd,
//! which KVM injects as a 1-then-0 pulse). The guest's GED driver then runs the DSDT's `_EVT`
//! method, which reads the register (a read returns the pending events and clears them, so no
//! event is seen twice or lost between the read and a clear) and notifies the ACPI device each
//! set bit stands for: bit 0 is `Notify (\_SB_.PWRB, 0x80)`, which Linux's ACPI button driver
//! reports as KEY_POWER from its "Power Button" input device.

use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Size of the device's register block on its bus.
pub const ACPI_GED_LEN: u64 = 1;
/// Event status bit: the power button was pressed.
pub const ACPI_GED_EVENT_POWER_BUTTON: u8 = 1 << 0;

pub struct AcpiGed {
    pending: u8,
    interrupt: EventFd,
}

impl AcpiGed {
    /// `interrupt` must be registered as the irqfd of the GSI the DSDT gives the GED.
    pub fn new(interrupt: EventFd) -> Self {
        Self {
            pending: 0,
            interrupt,
        }
    }

    /// Presses (and releases) the power button: the guest decides what that means; Linux's
    /// default is an orderly power-off. Presses before the guest reads the status coalesce.
    pub fn press_power_button(&mut self) -> std::io::Result<()> {
        self.raise(ACPI_GED_EVENT_POWER_BUTTON)
    }

    fn raise(&mut self, event: u8) -> std::io::Result<()> {
        self.pending |= event;
        self.interrupt.write(1)
    }
}

impl BusDevice for AcpiGed {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (0, Some(first)) = (offset, data.first_mut()) {
            *first = std::mem::take(&mut self.pending);
        }
    }

    /// The status register is read-only; writes change nothing.
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ged() -> (AcpiGed, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (AcpiGed::new(irq.try_clone().unwrap()), irq)
    }

    fn status(ged: &mut AcpiGed) -> u8 {
        let mut value = [0xffu8];
        ged.read(0, &mut value);
        value[0]
    }

    #[test]
    fn power_button_sets_its_bit_and_interrupts() {
        let (mut ged, irq) = ged();
        assert!(irq.read().is_err(), "no interrupt before a press");
        ged.press_power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(status(&mut ged), ACPI_GED_EVENT_POWER_BUTTON);
    }

    #[test]
    fn reading_the_status_clears_it() {
        let (mut ged, _irq) = ged();
        ged.press_power_button().unwrap();
        ged.press_power_button().unwrap();
        assert_eq!(status(&mut ged), ACPI_GED_EVENT_POWER_BUTTON);
        assert_eq!(status(&mut ged), 0);
    }

    #[test]
    fn writes_and_other_offsets_change_nothing() {
        let (mut ged, _irq) = ged();
        ged.press_power_button().unwrap();
        ged.write(0, &[0xff]);
        let mut wide = [0xffu8; 4];
        ged.read(1, &mut wide);
        assert_eq!(wide, [0; 4]);
        ged.read(0, &mut wide);
        assert_eq!(wide, [ACPI_GED_EVENT_POWER_BUTTON, 0, 0, 0]);
        ged.read(0, &mut []);
    }
}
