//! Socket writes for the servers' non-blocking loops (REST and QMP).

use std::io;
use std::os::unix::io::RawFd;

/// `send` without SIGPIPE when the peer is gone, and without blocking.
pub fn send(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is a valid buffer of `bytes.len()` bytes for the duration of the call;
    // the kernel only reads it.
    let n = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sends `output[*sent..]` as far as the socket takes it now, and empties `output` once all of
/// it is sent. An error means the socket failed (the peer is gone).
pub fn flush_output(fd: RawFd, output: &mut Vec<u8>, sent: &mut usize) -> io::Result<()> {
    while *sent < output.len() {
        match send(fd, &output[*sent..]) {
            Ok(0) => return Ok(()),
            Ok(n) => *sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    output.clear();
    *sent = 0;
    Ok(())
}
