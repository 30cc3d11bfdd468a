//! The QEMU-compatible front end: QEMU's command line as Kata emits it, translated into a
//! [`crate::VmConfig`], and QMP, translated into [`crate::VmmRequest`]s. Wire only: the binary
//! owns the sockets and the VM.

pub mod cmdline;
mod opts;
pub mod qmp;
pub mod server;

pub use cmdline::{parse_qemu_args, QemuError, QemuInvocation, QmpEndpoint, QEMU_PROGRAM};
pub use server::{notice_channel, QmpInbox, QmpNotice, QmpNotifier, QmpServerError};
