//! Our stdout for guest output, without ever blocking the thread that writes it.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

/// /dev/null's device number (major 1, minor 3).
const DEV_NULL_RDEV: u64 = (1 << 8) | 3;

/// Whether writes to this file can never wait for a reader: a regular file or /dev/null, on
/// which O_NONBLOCK changes nothing.
fn writes_never_wait(meta: &Metadata) -> bool {
    let file_type = meta.file_type();
    file_type.is_file() || (file_type.is_char_device() && meta.rdev() == DEV_NULL_RDEV)
}

/// A new open file description for our stdout with O_NONBLOCK, so a slow terminal or pipe
/// reader never stalls a vCPU or the event loop, and without touching the flags of the
/// description we share with our parent. A regular file or /dev/null is only duplicated: it
/// never makes a writer wait, and reopening through /proc costs ~0.1 ms of start-up on a PVM
/// host. Falls back to a (blocking) duplicate where /proc is missing or stdout is a socket
/// (which cannot be reopened), and says so.
pub fn nonblocking_stdout(user: &str) -> io::Result<File> {
    let duplicate = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    if duplicate
        .metadata()
        .is_ok_and(|meta| writes_never_wait(&meta))
    {
        return Ok(duplicate);
    }
    match OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/proc/self/fd/1")
    {
        Ok(file) => Ok(file),
        Err(e) => {
            log::info!("{user}: cannot reopen stdout non-blocking ({e}); writes may block");
            Ok(duplicate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn metadata(file: impl Into<OwnedFd>) -> Metadata {
        File::from(file.into()).metadata().unwrap()
    }

    #[test]
    fn only_files_and_dev_null_are_never_waited_on() {
        let regular = File::open(std::env::current_exe().unwrap()).unwrap();
        assert!(writes_never_wait(&metadata(regular)));
        assert!(writes_never_wait(&metadata(
            File::open("/dev/null").unwrap()
        )));
        assert!(!writes_never_wait(&metadata(
            File::open("/dev/zero").unwrap()
        )));
        let (_reader, writer) = std::io::pipe().unwrap();
        assert!(!writes_never_wait(&metadata(writer)));
    }
}
