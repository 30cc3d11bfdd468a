//! The activation plumbing every one-queue device (rng, pmem) needs, written once: take the
//! queue on a vCPU thread without blocking, and bring the event loop's epoll set in line on
//! the `vmm` thread (watch the queue's notify eventfd once: the transport hands the same one to
//! every activation, so it stays watched across resets).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, ActivatedQueue, InterruptKind, QueueNotify, VirtioInterrupt};

/// The queue of an activated device, with what it needs to serve it.
pub struct ActiveQueue {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub queue: Queue,
    pub notify: Arc<QueueNotify>,
}

impl ActiveQueue {
    /// Interrupts the driver for used buffers unless it suppressed notifications.
    pub fn notify_used(&mut self, device: &str) {
        if self.queue.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Queue(0)) {
                log::warn!("{device}: cannot interrupt the guest: {e}");
            }
        }
    }

    /// Ends a pass over the queue: interrupts the driver if the pass `used` buffers, and if it
    /// stopped at its budget with buffers left, wakes the device for the rest on the event
    /// loop's next turn (so other devices get theirs in between). Returns whether it did.
    pub fn end_pass(&mut self, device: &str, used: bool, budget_spent: bool) -> bool {
        if used {
            self.notify_used(device);
        }
        let exhausted = budget_spent && self.has_more();
        if exhausted {
            let _ = self.notify.rewake();
        }
        exhausted
    }

    /// Whether the driver posted buffers we have not taken yet.
    pub fn has_more(&self) -> bool {
        self.queue
            .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != self.queue.next_avail())
    }
}

/// What the event loop should do after [`SingleQueue::handle_event`].
#[derive(Debug, PartialEq, Eq)]
pub enum QueueEvent {
    /// Serve the queue (a kick, or an activation that may have found buffers waiting).
    Process,
    /// Not ours, or nothing to do.
    Ignore,
}

/// The one queue of a one-queue device's activation, which the driver must have made ready.
pub fn the_one_queue(queues: Vec<ActivatedQueue>) -> Result<ActivatedQueue, ActivateError> {
    let got = queues.len();
    let Some(q) = queues.into_iter().next().filter(|_| got == 1) else {
        return Err(ActivateError::QueueCount { expected: 1, got });
    };
    if !q.queue.ready() {
        return Err(ActivateError::InvalidQueue { index: 0 });
    }
    Ok(q)
}

pub struct SingleQueue {
    /// Written by activate/reset (vCPU thread) so the event loop side picks up the change.
    wake: EventFd,
    active: Option<ActiveQueue>,
    /// The notify eventfd in the event loop's epoll set; stays there after a reset (kicks
    /// then are read and ignored) until an activation brings a different one.
    watched: Option<Arc<QueueNotify>>,
}

impl SingleQueue {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
            watched: None,
        })
    }

    pub fn active_mut(&mut self) -> Option<&mut ActiveQueue> {
        self.active.as_mut()
    }

    /// DRIVER_OK (vCPU thread): keeps the one queue and wakes the event loop side.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let q = the_one_queue(queues)?;
        self.active = Some(ActiveQueue {
            mem,
            interrupt,
            queue: q.queue,
            notify: q.notify,
        });
        self.wake.write(1).map_err(ActivateError::Wake)
    }

    /// Device reset (vCPU thread): drops the queue; its eventfd stays watched, for the next
    /// activation.
    pub fn reset(&mut self) {
        self.active = None;
    }

    /// `MutEventSubscriber::init`: watch the activation event.
    pub fn init(&mut self, ops: &mut EventOps, device: &str) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            log::error!("{device}: cannot watch the activation event: {e:?}");
        }
    }

    /// `MutEventSubscriber::process`: consumes the event and says whether to serve the queue.
    pub fn handle_event(
        &mut self,
        events: &Events,
        ops: &mut EventOps,
        device: &str,
    ) -> QueueEvent {
        if events.fd() == self.wake.as_raw_fd() {
            let _ = self.wake.read();
            let Some(active) = self.active.as_ref() else {
                return QueueEvent::Ignore;
            };
            let current = self.watched.as_ref();
            if !current.is_some_and(|fd| Arc::ptr_eq(fd, &active.notify)) {
                if let Some(old) = self.watched.take() {
                    let _ = ops.remove(Events::new(&*old, EventSet::IN));
                }
                match ops.add(Events::new(&*active.notify, EventSet::IN)) {
                    Ok(()) => self.watched = Some(active.notify.clone()),
                    Err(e) => log::error!("{device}: cannot watch the queue: {e:?}"),
                }
            }
            // Buffers may have been posted before activation reached us.
            return QueueEvent::Process;
        }
        match self.watched.as_ref() {
            Some(fd) if events.fd() == fd.as_raw_fd() => {
                let _ = fd.read();
                if self.active.is_some() {
                    QueueEvent::Process
                } else {
                    QueueEvent::Ignore
                }
            }
            _ => QueueEvent::Ignore,
        }
    }

    #[cfg(test)]
    pub fn watched_count(&self) -> usize {
        usize::from(self.watched.is_some())
    }
}
/// Implements `MutEventSubscriber` for a one-queue device whose `SingleQueue` is its field
/// `queue` and whose `process_queue()` serves it; `$name` prefixes its log lines.
macro_rules! single_queue_subscriber {
    ($device:ty, $name:literal) => {
        impl event_manager::MutEventSubscriber for $device {
            fn process(
                &mut self,
                events: event_manager::Events,
                ops: &mut event_manager::EventOps,
            ) {
                if self.queue.handle_event(&events, ops, $name)
                    == $crate::virtio::single_queue::QueueEvent::Process
                {
                    self.process_queue();
                }
            }

            fn init(&mut self, ops: &mut event_manager::EventOps) {
                self.queue.init(ops, $name);
            }
        }
    };
}
pub(crate) use single_queue_subscriber;
