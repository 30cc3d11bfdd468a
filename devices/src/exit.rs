//! How devices and vCPUs tell the VMM thread that the VM must end.

use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM ends. The first reason recorded wins: a guest that resets while it powers off
/// still ends for the reason it gave first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitReason {
    /// ACPI S5 from the guest.
    Poweroff = 1,
    /// The guest asked for a reset (i8042 CPU reset, ACPI reset register): we do not reboot,
    /// we exit (Kata restarts a sandbox from scratch).
    Reset = 2,
    /// The host asked (signal, API).
    Stopped = 3,
    /// KVM could not run the guest any more.
    Crashed = 4,
    /// A triple fault: the guest's CPU reset itself because it could not go on.
    TripleFault = 5,
}

impl ExitReason {
    fn from_u8(value: u8) -> Option<Self> {
        [
            Self::Poweroff,
            Self::Reset,
            Self::Stopped,
            Self::Crashed,
            Self::TripleFault,
        ]
        .into_iter()
        .find(|reason| *reason as u8 == value)
    }
}

pub struct ExitNotifier {
    reason: AtomicU8,
    event: EventFd,
}

impl ExitNotifier {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: AtomicU8::new(0),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn notify(&self, reason: ExitReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        // Only fails when the counter would overflow, which means it is already signalled.
        let _ = self.event.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        ExitReason::from_u8(self.reason.load(Ordering::Acquire))
    }

    /// Becomes readable once any reason was recorded.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_event_fires() {
        let notifier = ExitNotifier::new().unwrap();
        assert_eq!(notifier.reason(), None);
        notifier.notify(ExitReason::Poweroff);
        notifier.notify(ExitReason::Reset);
        assert_eq!(notifier.reason(), Some(ExitReason::Poweroff));
        assert_eq!(notifier.event().read().unwrap(), 2);
    }
}
