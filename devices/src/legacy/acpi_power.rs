//! The hardware-reduced ACPI sleep control / reset register. With a hardware-reduced FADT, Linux
//! powers off by writing `SLP_TYP << 2 | SLP_EN` to SLEEP_CONTROL_REG and resets by writing
//! RESET_VALUE to RESET_REG; both registers live in this one byte, the status register after it.

use std::sync::Arc;

use crate::rate_limit::RateLimit;
use crate::{BusDevice, ExitNotifier, ExitReason};

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// Offset of SLEEP_STATUS_REG from SLEEP_CONTROL_REG.
const STATUS_OFFSET: u64 = 1;
/// WAK_STS: tells a guest polling for wake-up that it is "awake" so it never spins.
const WAK_STS: u8 = 1 << 7;

pub struct AcpiPowerDevice {
    exit: Arc<ExitNotifier>,
    s5_sleep_type: u8,
    reset_value: u8,
    /// Sleep types other than S5, which a guest can ask for without end.
    unsupported_sleeps: RateLimit,
}

impl AcpiPowerDevice {
    pub fn new(exit: Arc<ExitNotifier>, s5_sleep_type: u8, reset_value: u8) -> Self {
        Self {
            exit,
            s5_sleep_type,
            reset_value,
            unsupported_sleeps: RateLimit::default(),
        }
    }
}

impl BusDevice for AcpiPowerDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (STATUS_OFFSET, Some(first)) = (offset, data.first_mut()) {
            *first = WAK_STS;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else {
            return;
        };
        if value == self.reset_value {
            self.exit.notify(ExitReason::Reset);
        } else if value & SLP_EN != 0 {
            let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            if sleep_type == self.s5_sleep_type {
                self.exit.notify(ExitReason::Poweroff);
            } else {
                if let Some(n) = self.unsupported_sleeps.hit() {
                    log::warn!(
                        "guest asked for unsupported ACPI sleep type {sleep_type}; ignored ({n} times so far)"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (AcpiPowerDevice, Arc<ExitNotifier>) {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        (AcpiPowerDevice::new(exit.clone(), 5, 1), exit)
    }

    #[test]
    fn s5_powers_off() {
        let (mut dev, exit) = device();
        dev.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::Poweroff));
    }

    #[test]
    fn reset_value_resets() {
        let (mut dev, exit) = device();
        dev.write(0, &[1]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn other_sleep_states_and_type_without_enable_are_ignored() {
        let (mut dev, exit) = device();
        dev.write(0, &[(3 << 2) | SLP_EN]);
        dev.write(0, &[5 << 2]);
        dev.write(1, &[(5 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), None);
        let mut status = [0u8];
        dev.read(1, &mut status);
        assert_eq!(status[0], WAK_STS);
    }
}
