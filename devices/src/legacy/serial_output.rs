//! Where the UART's output goes, without ever blocking the vCPU that writes it.
//!
//! The UART is written under the serial device's mutex, which the `vmm` thread also takes for
//! input: a blocking write to a stdout nobody drains would stop vCPU0 and then the event loop.
//! So output is non-blocking, with a bounded buffer for a slow reader (beyond it bytes are
//! dropped and counted), and a file gets a size cap and a rate limit so a guest cannot fill
//! the host's disk or hog its I/O.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::time::Instant;

use crate::rate_limit::RateLimit;

/// Output waiting for a slow reader; beyond it, bytes are dropped.
pub const PENDING_LIMIT: usize = 64 << 10;
/// Default size cap of a `file=` serial output: later bytes are dropped (logged once).
pub const DEFAULT_FILE_CAP: u64 = 64 << 20;
/// Default sustained rate of a `file=` output, and the burst it may write at once.
pub const DEFAULT_FILE_RATE: u64 = 1 << 20;
pub const DEFAULT_FILE_BURST: u64 = 4 << 20;

/// What an output may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// Total bytes written over the VM's life; None for no cap.
    pub cap: Option<u64>,
    /// (bytes per second, burst in bytes); None for no rate limit.
    pub rate: Option<(u64, u64)>,
}

impl OutputLimits {
    /// For a terminal or pipe: only the non-blocking bounded buffer.
    pub const STREAM: Self = Self {
        cap: None,
        rate: None,
    };
    /// For `file=`: 64 MiB in all, 1 MiB/s sustained with bursts of 4 MiB.
    pub const FILE: Self = Self {
        cap: Some(DEFAULT_FILE_CAP),
        rate: Some((DEFAULT_FILE_RATE, DEFAULT_FILE_BURST)),
    };
}

/// A token bucket in bytes.
struct ByteBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    refilled: Instant,
}

impl ByteBucket {
    fn new(rate: u64, burst: u64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            refilled: Instant::now(),
        }
    }

    /// Takes up to `want` bytes' worth of tokens; returns how many it got.
    fn take(&mut self, want: u64) -> u64 {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = u64::try_from(elapsed.as_micros() * u128::from(self.rate) / 1_000_000)
            .unwrap_or(u64::MAX);
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(self.burst);
            self.refilled = now;
        }
        let got = want.min(self.tokens);
        self.tokens -= got;
        got
    }
}

/// What a `file=` output may still take: its size cap over the VM's life and its rate.
/// Shared by the serial port and virtio-console's port 0.
pub struct OutputBudget {
    /// Names the output in the one line said when the cap is reached.
    what: &'static str,
    cap: Option<u64>,
    /// Bytes accepted so far (what the cap counts).
    accepted: u64,
    rate: Option<ByteBucket>,
    cap_reached: bool,
    /// Bytes refused by the cap or the rate.
    refused: u64,
}

impl OutputBudget {
    pub fn new(what: &'static str, limits: OutputLimits) -> Self {
        Self {
            what,
            cap: limits.cap,
            accepted: 0,
            rate: limits
                .rate
                .map(|(rate, burst)| ByteBucket::new(rate, burst)),
            cap_reached: false,
            refused: 0,
        }
    }

    /// How many of `want` bytes may go out now; they count as accepted.
    pub fn admit(&mut self, want: usize) -> usize {
        let mut allowed = want;
        if let Some(cap) = self.cap {
            let left = usize::try_from(cap.saturating_sub(self.accepted)).unwrap_or(usize::MAX);
            if left < want && !self.cap_reached {
                self.cap_reached = true;
                log::warn!(
                    "{} reached its cap of {cap} bytes; later output is dropped",
                    self.what
                );
            }
            allowed = allowed.min(left);
        }
        if let Some(bucket) = self.rate.as_mut() {
            let got = bucket.take(allowed as u64);
            allowed = usize::try_from(got).unwrap_or(allowed);
        }
        self.accepted = self.accepted.saturating_add(allowed as u64);
        self.refused = self
            .refused
            .saturating_add((want - allowed.min(want)) as u64);
        allowed
    }

    /// Bytes the cap or the rate refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    pub fn cap_reached(&self) -> bool {
        self.cap_reached
    }
}

/// The serial device's output: give it to `Serial::new` as its writer.
pub struct SerialOutput {
    file: File,
    pending: VecDeque<u8>,
    budget: OutputBudget,
    dropped: u64,
    drops: RateLimit,
    /// Writing failed (other than would-block): output is dropped from now on.
    failed: bool,
}

impl SerialOutput {
    /// Our stdout, reopened non-blocking (see `host_stdout`), with no cap or rate limit.
    pub fn stdout() -> io::Result<Self> {
        Ok(Self::new(
            crate::host_stdout::nonblocking_stdout("serial")?,
            OutputLimits::STREAM,
        ))
    }

    /// An output already opened by the VMM (e.g. the `file=` path, with `OutputLimits::FILE`).
    /// The file is made non-blocking (ours alone: the VMM opened it).
    pub fn new(file: File, limits: OutputLimits) -> Self {
        set_nonblocking(&file);
        Self {
            file,
            pending: VecDeque::new(),
            budget: OutputBudget::new("serial output", limits),
            dropped: 0,
            drops: RateLimit::default(),
            failed: false,
        }
    }

    /// Bytes dropped so far (no room, over the cap or the rate, or the output failed).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Bytes waiting for a slow reader.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Writes what is pending, as far as the output takes it without blocking.
    fn drain(&mut self) {
        while !self.failed && !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match self.file.write(front) {
                Ok(0) => self.fail(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n.min(self.pending.len()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.fail(e),
            }
        }
    }

    fn fail(&mut self, e: io::Error) {
        log::warn!("serial output failed, further output is dropped: {e}");
        self.failed = true;
        self.dropped = self.dropped.saturating_add(self.pending.len() as u64);
        self.pending.clear();
    }

    /// How many of `want` bytes the buffer and the limits let through now.
    fn admit(&mut self, want: usize) -> usize {
        let room = want.min(PENDING_LIMIT.saturating_sub(self.pending.len()));
        self.budget.admit(room)
    }
}

impl crate::legacy::SerialSink for SerialOutput {
    fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl Write for SerialOutput {
    /// Never blocks and never fails (the UART has nowhere to report it): what does not fit
    /// is dropped and counted.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.drain();
        let allowed = if self.failed {
            0
        } else {
            self.admit(buf.len())
        };
        self.pending.extend(&buf[..allowed]);
        let lost = (buf.len() - allowed) as u64;
        if lost > 0 {
            self.dropped = self.dropped.saturating_add(lost);
            if !self.failed && !self.budget.cap_reached() {
                if let Some(n) = self.drops.hit() {
                    log::info!(
                        "serial output faster than its reader or rate limit: {} bytes dropped so far ({n} times)",
                        self.dropped
                    );
                }
            }
        }
        self.drain();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain();
        Ok(())
    }
}

fn set_nonblocking(file: &File) {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd `file` owns for the call's duration; F_GETFL/F_SETFL only read
    // and set the open file description's status flags and touch no memory of ours.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::Serial;
    use crate::BusDevice;
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::mpsc;
    use std::time::Duration;
    use vmm_sys_util::eventfd::EventFd;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we pass, which has room for them.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: both fds are new and owned by nobody else.
        unsafe {
            (
                File::from(OwnedFd::from_raw_fd(fds[0])),
                File::from(OwnedFd::from_raw_fd(fds[1])),
            )
        }
    }

    #[test]
    fn a_reader_that_never_drains_blocks_nothing() {
        let (mut reader, writer) = pipe();
        let (done, finished) = mpsc::channel();
        // The guest writes 256 KiB to a pipe (64 KiB of buffer) nobody reads.
        let guest = std::thread::spawn(move || {
            let output = SerialOutput::new(writer, OutputLimits::STREAM);
            let mut serial = Serial::new(EventFd::new(0).unwrap(), Box::new(output));
            for i in 0..(1u32 << 18) {
                serial.write(0, &[b'a' + (i % 26) as u8]);
            }
            // Every byte counted as sent; what neither the pipe nor the buffer took, dropped.
            let counters = serial.counters();
            assert_eq!(counters[0], ("bytes_out", 1 << 18));
            assert_eq!(counters[1].0, "bytes_dropped");
            assert!(counters[1].1 >= (1 << 18) - 2 * PENDING_LIMIT as u64);
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(20)).is_ok(),
            "the vCPU blocked on serial output"
        );
        guest.join().unwrap();
        // What the pipe took arrives in order, from the start.
        let mut head = [0u8; 26];
        reader.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"abcdefghijklmnopqrstuvwxyz");
    }

    #[test]
    fn pending_output_is_bounded_and_drops_are_counted() {
        let (_reader, writer) = pipe();
        let mut output = SerialOutput::new(writer, OutputLimits::STREAM);
        let chunk = [b'x'; 4096];
        for _ in 0..256 {
            assert_eq!(output.write(&chunk).unwrap(), chunk.len());
        }
        assert!(output.pending() <= PENDING_LIMIT);
        // 1 MiB offered; the pipe (64 KiB) plus our buffer (64 KiB) took the rest.
        assert!(output.dropped() >= (1 << 20) - 2 * PENDING_LIMIT as u64);
    }

    #[test]
    fn a_file_output_stops_at_its_cap() {
        let path = std::env::temp_dir().join(format!("serial-cap-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let limits = OutputLimits {
            cap: Some(1000),
            rate: None,
        };
        let mut output = SerialOutput::new(file, limits);
        for _ in 0..50 {
            output.write_all(&[b'y'; 100]).unwrap();
        }
        output.flush().unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        let _ = std::fs::remove_file(&path);
        assert_eq!(size, 1000);
        assert_eq!(output.dropped(), 4000);
    }

    #[test]
    fn a_file_output_is_rate_limited() {
        let path = std::env::temp_dir().join(format!("serial-rate-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let limits = OutputLimits {
            cap: None,
            rate: Some((1000, 2000)),
        };
        let mut output = SerialOutput::new(file, limits);
        for _ in 0..1000 {
            output.write_all(&[b'z'; 100]).unwrap();
        }
        let size = std::fs::metadata(&path).unwrap().len();
        let _ = std::fs::remove_file(&path);
        // The burst, plus what a second or so at 1000 B/s earns while the loop runs.
        assert!((2000..4000).contains(&size), "{size} bytes written");
    }
}
