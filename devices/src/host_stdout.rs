//! Our stdout for guest output, without ever blocking the thread that writes it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;

/// A new open file description for our stdout with O_NONBLOCK, so a slow terminal or pipe
/// reader never stalls a vCPU or the event loop, and without touching the flags of the
/// description we share with our parent. Falls back to a (blocking) duplicate where /proc is
/// missing or stdout is a socket (which cannot be reopened), and says so.
pub fn nonblocking_stdout(user: &str) -> io::Result<File> {
    match OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/proc/self/fd/1")
    {
        Ok(file) => Ok(file),
        Err(e) => {
            log::info!("{user}: cannot reopen stdout non-blocking ({e}); writes may block");
            Ok(File::from(io::stdout().as_fd().try_clone_to_owned()?))
        }
    }
}
