//! The i8042 keyboard controller, reduced to what a guest without a keyboard uses: its status and
//! command byte, and the pulse-reset command (0xFE) that `reboot=k` sends.

use std::sync::Arc;

use crate::{BusDevice, ExitNotifier, ExitReason};

const DATA_OFFSET: u64 = 0;
/// The command/status port sits 4 bytes after the data port (0x60 / 0x64).
const COMMAND_OFFSET: u64 = 4;

const CMD_READ_COMMAND_BYTE: u8 = 0x20;
const CMD_WRITE_COMMAND_BYTE: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const SELF_TEST_PASSED: u8 = 0x55;
/// Output port bit 0 low asserts the CPU reset line.
const OUTPUT_PORT_RESET_BIT: u8 = 0x01;

pub struct I8042 {
    exit: Arc<ExitNotifier>,
    status: u8,
    command_byte: u8,
    output_port: u8,
    output: Option<u8>,
    /// A command that takes its argument through the data port.
    pending: Option<u8>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self {
            exit,
            status: STATUS_SYSTEM_FLAG,
            command_byte: 0,
            output_port: OUTPUT_PORT_RESET_BIT,
            output: None,
            pending: None,
        }
    }

    fn respond(&mut self, value: u8) {
        self.output = Some(value);
        self.status |= STATUS_OUTPUT_FULL;
    }

    fn command(&mut self, command: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match command {
            CMD_READ_COMMAND_BYTE => self.respond(self.command_byte),
            CMD_WRITE_COMMAND_BYTE | CMD_WRITE_OUTPUT_PORT => self.pending = Some(command),
            CMD_SELF_TEST => self.respond(SELF_TEST_PASSED),
            CMD_READ_OUTPUT_PORT => self.respond(self.output_port),
            CMD_PULSE_RESET => self.exit.notify(ExitReason::Reset),
            _ => log::debug!("i8042: ignored command {command:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_COMMAND_BYTE) => self.command_byte = value,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_BIT == 0 {
                    self.exit.notify(ExitReason::Reset);
                }
            }
            // Bytes for a keyboard that is not there.
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => {
                self.status &= !STATUS_OUTPUT_FULL;
                self.output.take().unwrap_or(0)
            }
            COMMAND_OFFSET => self.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            DATA_OFFSET => self.data(value),
            COMMAND_OFFSET => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (I8042, Arc<ExitNotifier>) {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        (I8042::new(exit.clone()), exit)
    }

    #[test]
    fn pulse_reset_ends_the_vm() {
        let (mut dev, exit) = controller();
        dev.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn output_port_reset_bit_ends_the_vm() {
        let (mut dev, exit) = controller();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA_OFFSET, &[0x02]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn command_byte_round_trips_and_status_reports_output() {
        let (mut dev, exit) = controller();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_COMMAND_BYTE]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_COMMAND_BYTE]);
        let mut status = [0u8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        let mut value = [0u8];
        dev.read(DATA_OFFSET, &mut value);
        assert_eq!(value[0], 0x47);
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & STATUS_OUTPUT_FULL, 0);
        assert_eq!(exit.reason(), None);
    }
}
