//! The i8042 keyboard controller: its status and command byte, the pulse-reset command (0xFE)
//! that `reboot=k` sends, and a keyboard behind it that answers a driver's commands and can
//! type Ctrl-Alt-Del, the way to ask a guest with an i8042/atkbd driver (and no ACPI power
//! button handling) to shut down.
//!
//! Modelled as the hardware is: the controller has a one-byte output buffer (status bit
//! OUTPUT_FULL); the keyboard has its own small buffer whose bytes move into the output buffer
//! one at a time, each raising IRQ 1 when the command byte enables the keyboard interrupt. Linux's
//! i8042 driver reads one byte per interrupt, so every byte gets its own interrupt (an edge: the
//! `EventFd` is an irqfd).

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, ExitNotifier, ExitReason};

const DATA_OFFSET: u64 = 0;
/// The command/status port sits 4 bytes after the data port (0x60 / 0x64).
const COMMAND_OFFSET: u64 = 4;

const CMD_READ_COMMAND_BYTE: u8 = 0x20;
const CMD_WRITE_COMMAND_BYTE: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KEYBOARD_TEST: u8 = 0xab;
const CMD_DISABLE_KEYBOARD: u8 = 0xad;
const CMD_ENABLE_KEYBOARD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const SELF_TEST_PASSED: u8 = 0x55;
const KEYBOARD_TEST_PASSED: u8 = 0x00;
/// Output port bit 0 low asserts the CPU reset line.
const OUTPUT_PORT_RESET_BIT: u8 = 0x01;

/// Command byte bits.
const CB_KEYBOARD_INTERRUPT: u8 = 0x01;
const CB_KEYBOARD_DISABLED: u8 = 0x10;
/// The controller translates the keyboard's scancode set 2 into set 1.
const CB_TRANSLATE: u8 = 0x40;

/// Keyboard commands (written to the data port) and its answers.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_TYPEMATIC: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
/// An MF2 keyboard.
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_SCANCODE_SET_2: u8 = 0x02;
/// Enough for the longest reply and one Ctrl-Alt-Del; a real keyboard buffers about as much.
const KBD_BUFFER_LEN: usize = 16;

/// Ctrl, Alt and Delete pressed, then released in reverse order, in scancode set 2 (what the
/// keyboard sends) and set 1 (what the guest reads when the controller translates).
const CTRL_ALT_DEL_SET2: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
const CTRL_ALT_DEL_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    #[error("the guest has not read the keys sent before; Ctrl-Alt-Del not sent")]
    KeyboardBufferFull,
    #[error("cannot raise the keyboard interrupt: {0}")]
    Interrupt(#[source] std::io::Error),
}

pub struct I8042 {
    exit: Arc<ExitNotifier>,
    /// IRQ 1. Without it the keyboard still answers, but a guest waiting for the answers'
    /// interrupts will not see them.
    keyboard_interrupt: Option<EventFd>,
    status: u8,
    command_byte: u8,
    output_port: u8,
    /// The controller's output buffer, and whether its byte came from the keyboard.
    output: Option<(u8, bool)>,
    /// Bytes the keyboard has yet to hand to the controller.
    keyboard: VecDeque<u8>,
    /// A controller command that takes its argument through the data port.
    pending: Option<u8>,
    /// The keyboard's last command takes an argument byte (LEDs, typematic rate, scancode set).
    keyboard_argument: Option<u8>,
}

impl I8042 {
    /// A controller whose keyboard cannot interrupt.
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self {
            exit,
            keyboard_interrupt: None,
            status: STATUS_SYSTEM_FLAG,
            command_byte: 0,
            output_port: OUTPUT_PORT_RESET_BIT,
            output: None,
            keyboard: VecDeque::with_capacity(KBD_BUFFER_LEN),
            pending: None,
            keyboard_argument: None,
        }
    }

    /// A controller raising IRQ 1 through `keyboard_interrupt` (an irqfd for GSI 1).
    pub fn with_keyboard_interrupt(exit: Arc<ExitNotifier>, keyboard_interrupt: EventFd) -> Self {
        Self {
            keyboard_interrupt: Some(keyboard_interrupt),
            ..Self::new(exit)
        }
    }

    /// Types Ctrl-Alt-Del: Linux's keyboard driver then runs its ctrl_alt_del action (by default
    /// a reboot, or SIGINT to init; `chapeau` guests usually run with `reboot=k`, so an orderly
    /// halt is up to the guest's init). Nothing is sent unless the whole sequence fits.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        let keys = if self.command_byte & CB_TRANSLATE != 0 {
            CTRL_ALT_DEL_SET1
        } else {
            CTRL_ALT_DEL_SET2
        };
        if self.keyboard.len() + keys.len() > KBD_BUFFER_LEN {
            return Err(I8042Error::KeyboardBufferFull);
        }
        self.keyboard.extend(keys);
        self.deliver_keyboard_byte()
    }

    /// Moves the keyboard's next byte into an empty output buffer and raises IRQ 1 for it.
    fn deliver_keyboard_byte(&mut self) -> Result<(), I8042Error> {
        if self.output.is_some() || self.command_byte & CB_KEYBOARD_DISABLED != 0 {
            return Ok(());
        }
        let Some(byte) = self.keyboard.pop_front() else {
            return Ok(());
        };
        self.output = Some((byte, true));
        self.status |= STATUS_OUTPUT_FULL;
        match &self.keyboard_interrupt {
            Some(irq) if self.command_byte & CB_KEYBOARD_INTERRUPT != 0 => {
                irq.write(1).map_err(I8042Error::Interrupt)
            }
            _ => Ok(()),
        }
    }

    /// Called from the guest's port accesses, where an interrupt that cannot be raised can only
    /// be logged; the bytes stay readable by polling.
    fn deliver_keyboard_byte_for_guest(&mut self) {
        if let Err(e) = self.deliver_keyboard_byte() {
            log::debug!("i8042: {e}");
        }
    }

    /// A controller reply takes the output buffer; a keyboard byte there goes back to wait.
    fn respond(&mut self, value: u8) {
        if let Some((byte, true)) = self.output.take() {
            self.keyboard.push_front(byte);
        }
        self.output = Some((value, false));
        self.status |= STATUS_OUTPUT_FULL;
    }

    fn keyboard_reply(&mut self, bytes: &[u8]) {
        // A guest flooding the keyboard with commands without reading loses the surplus replies.
        // (A controller reply may have pushed a key back into a full buffer: saturate.)
        let room = KBD_BUFFER_LEN.saturating_sub(self.keyboard.len());
        self.keyboard.extend(bytes.iter().take(room));
        self.deliver_keyboard_byte_for_guest();
    }

    fn command(&mut self, command: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match command {
            CMD_READ_COMMAND_BYTE => self.respond(self.command_byte),
            CMD_WRITE_COMMAND_BYTE | CMD_WRITE_OUTPUT_PORT => self.pending = Some(command),
            CMD_SELF_TEST => self.respond(SELF_TEST_PASSED),
            CMD_KEYBOARD_TEST => self.respond(KEYBOARD_TEST_PASSED),
            CMD_DISABLE_KEYBOARD => self.command_byte |= CB_KEYBOARD_DISABLED,
            CMD_ENABLE_KEYBOARD => {
                self.command_byte &= !CB_KEYBOARD_DISABLED;
                self.deliver_keyboard_byte_for_guest();
            }
            CMD_READ_OUTPUT_PORT => self.respond(self.output_port),
            CMD_PULSE_RESET => self.exit.notify(ExitReason::Reset),
            _ => log::debug!("i8042: ignored command {command:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_COMMAND_BYTE) => {
                self.command_byte = value;
                self.deliver_keyboard_byte_for_guest();
            }
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_BIT == 0 {
                    self.exit.notify(ExitReason::Reset);
                }
            }
            _ => self.keyboard_command(value),
        }
    }

    /// A byte for the keyboard: acknowledged, and answered where the command asks for more.
    fn keyboard_command(&mut self, value: u8) {
        if let Some(command) = self.keyboard_argument.take() {
            // Scancode set 0 asks which set is in use: always set 2, translated or not.
            if command == KBD_SCANCODE_SET && value == 0 {
                return self.keyboard_reply(&[KBD_ACK, KBD_SCANCODE_SET_2]);
            }
            return self.keyboard_reply(&[KBD_ACK]);
        }
        match value {
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_TYPEMATIC => {
                self.keyboard_argument = Some(value);
                self.keyboard_reply(&[KBD_ACK]);
            }
            KBD_ECHO => self.keyboard_reply(&[KBD_ECHO]),
            KBD_GET_ID => self.keyboard_reply(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_RESET => {
                self.keyboard.clear();
                self.keyboard_reply(&[KBD_ACK, KBD_SELF_TEST_PASSED]);
            }
            _ => self.keyboard_reply(&[KBD_ACK]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => {
                let value = self.output.take().map_or(0, |(byte, _)| byte);
                self.status &= !STATUS_OUTPUT_FULL;
                self.deliver_keyboard_byte_for_guest();
                value
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

    /// A controller with IRQ 1, set up as Linux's i8042 driver leaves it: keyboard enabled,
    /// its interrupt on, translation as asked.
    fn keyboard_controller(translate: bool) -> (I8042, EventFd) {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::with_keyboard_interrupt(exit, irq.try_clone().unwrap());
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_COMMAND_BYTE]);
        let translate = if translate { CB_TRANSLATE } else { 0 };
        dev.write(DATA_OFFSET, &[CB_KEYBOARD_INTERRUPT | translate]);
        (dev, irq)
    }

    fn read_port(dev: &mut I8042, offset: u64) -> u8 {
        let mut value = [0u8];
        dev.read(offset, &mut value);
        value[0]
    }

    /// Reads bytes as Linux's interrupt handler does: one per interrupt, each after checking the
    /// status says the output buffer is full; stops when no interrupt is pending.
    fn drain_by_interrupt(dev: &mut I8042, irq: &EventFd) -> Vec<u8> {
        let mut bytes = Vec::new();
        while let Ok(count) = irq.read() {
            assert_eq!(count, 1, "one interrupt per byte");
            assert_ne!(read_port(dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
            bytes.push(read_port(dev, DATA_OFFSET));
        }
        assert_eq!(read_port(dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        bytes
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
        assert_eq!(
            read_port(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL,
            STATUS_OUTPUT_FULL
        );
        assert_eq!(read_port(&mut dev, DATA_OFFSET), 0x47);
        assert_eq!(read_port(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn ctrl_alt_del_arrives_one_byte_per_interrupt_in_set_2() {
        let (mut dev, irq) = keyboard_controller(false);
        dev.send_ctrl_alt_del().unwrap();
        assert_eq!(drain_by_interrupt(&mut dev, &irq), CTRL_ALT_DEL_SET2);
    }

    #[test]
    fn ctrl_alt_del_is_set_1_when_the_controller_translates() {
        let (mut dev, irq) = keyboard_controller(true);
        dev.send_ctrl_alt_del().unwrap();
        assert_eq!(
            drain_by_interrupt(&mut dev, &irq),
            [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
        );
    }

    #[test]
    fn unread_keys_refuse_a_second_sequence() {
        let (mut dev, irq) = keyboard_controller(false);
        dev.send_ctrl_alt_del().unwrap();
        assert!(matches!(
            dev.send_ctrl_alt_del(),
            Err(I8042Error::KeyboardBufferFull)
        ));
        assert_eq!(drain_by_interrupt(&mut dev, &irq), CTRL_ALT_DEL_SET2);
        dev.send_ctrl_alt_del().unwrap();
    }

    #[test]
    fn disabled_keyboard_holds_its_keys_until_enabled() {
        let (mut dev, irq) = keyboard_controller(false);
        dev.write(COMMAND_OFFSET, &[CMD_DISABLE_KEYBOARD]);
        dev.send_ctrl_alt_del().unwrap();
        assert!(irq.read().is_err());
        assert_eq!(read_port(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_ENABLE_KEYBOARD]);
        assert_eq!(drain_by_interrupt(&mut dev, &irq), CTRL_ALT_DEL_SET2);
    }

    #[test]
    fn keys_wait_while_the_keyboard_interrupt_is_off_and_can_be_polled() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::with_keyboard_interrupt(exit, irq.try_clone().unwrap());
        dev.send_ctrl_alt_del().unwrap();
        assert!(irq.read().is_err(), "command byte 0: no interrupt");
        assert_ne!(read_port(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read_port(&mut dev, DATA_OFFSET), CTRL_ALT_DEL_SET2[0]);
    }

    #[test]
    fn keyboard_answers_what_atkbd_asks() {
        let (mut dev, irq) = keyboard_controller(true);
        dev.write(DATA_OFFSET, &[KBD_GET_ID]);
        assert_eq!(drain_by_interrupt(&mut dev, &irq), [KBD_ACK, 0xab, 0x83]);
        dev.write(DATA_OFFSET, &[KBD_SET_LEDS]);
        dev.write(DATA_OFFSET, &[0x07]);
        assert_eq!(drain_by_interrupt(&mut dev, &irq), [KBD_ACK, KBD_ACK]);
        dev.write(DATA_OFFSET, &[KBD_SCANCODE_SET]);
        dev.write(DATA_OFFSET, &[0]);
        assert_eq!(
            drain_by_interrupt(&mut dev, &irq),
            [KBD_ACK, KBD_ACK, KBD_SCANCODE_SET_2]
        );
        dev.write(DATA_OFFSET, &[KBD_RESET]);
        assert_eq!(
            drain_by_interrupt(&mut dev, &irq),
            [KBD_ACK, KBD_SELF_TEST_PASSED]
        );
        dev.write(DATA_OFFSET, &[KBD_ECHO]);
        assert_eq!(drain_by_interrupt(&mut dev, &irq), [KBD_ECHO]);
    }

    #[test]
    fn a_controller_reply_goes_before_a_waiting_key() {
        let (mut dev, irq) = keyboard_controller(false);
        dev.send_ctrl_alt_del().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read_port(&mut dev, DATA_OFFSET), SELF_TEST_PASSED);
        // The key displaced by the reply comes next, with its own interrupt.
        assert_eq!(
            drain_by_interrupt(&mut dev, &irq),
            CTRL_ALT_DEL_SET2.to_vec()
        );
    }

    /// Whatever a guest writes and reads, in any order, the controller neither panics nor grows
    /// (a deterministic xorshift stream of port accesses, with key presses mixed in).
    #[test]
    fn arbitrary_port_traffic_keeps_the_controller_bounded() {
        let (mut dev, irq) = keyboard_controller(false);
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let [op, value, ..] = state.to_le_bytes();
            let offset = if op & 0x10 == 0 {
                DATA_OFFSET
            } else {
                COMMAND_OFFSET
            };
            match op % 8 {
                // Anything but the two ways to reset, which would end a real VM.
                0..=2 if value != CMD_PULSE_RESET && value != CMD_WRITE_OUTPUT_PORT => {
                    dev.write(offset, &[value])
                }
                3..=5 => {
                    read_port(&mut dev, offset);
                }
                6 => {
                    let _ = dev.send_ctrl_alt_del();
                }
                _ => {
                    let _ = irq.read();
                }
            }
            assert!(dev.keyboard.len() <= KBD_BUFFER_LEN + 1);
        }
    }

    #[test]
    fn a_guest_flooding_the_keyboard_keeps_a_bounded_buffer() {
        let (mut dev, _irq) = keyboard_controller(false);
        for _ in 0..1000 {
            dev.write(DATA_OFFSET, &[KBD_GET_ID]);
        }
        assert!(dev.keyboard.len() <= KBD_BUFFER_LEN);
    }
}
