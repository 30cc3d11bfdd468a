//! Per-thread seccomp filters, compiled from resources/seccomp/x86_64.json by build.rs.
//! Every thread installs its own filter before it touches guest data; a syscall outside its
//! policy kills the process (SIGSYS).

use std::collections::HashMap;

use seccompiler::{sock_filter, BpfProgram};

pub const VMM_THREAD: &str = "vmm";
pub const VCPU_THREAD: &str = "vcpu";

static COMPILED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_filters.bin"));

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the built-in seccomp filters are corrupt")]
    Corrupt,
    #[error("no seccomp filter for thread category `{0}`")]
    Missing(String),
    #[error("cannot install the seccomp filter for `{name}`: {source}")]
    Install {
        name: String,
        source: seccompiler::Error,
    },
}

pub struct SeccompFilters {
    filters: HashMap<String, BpfProgram>,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SeccompError> {
        if self.0.len() < n {
            return Err(SeccompError::Corrupt);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, SeccompError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

impl SeccompFilters {
    pub fn builtin() -> Result<Self, SeccompError> {
        let mut reader = Reader(COMPILED);
        let mut filters = HashMap::new();
        while !reader.0.is_empty() {
            let name_len = reader.u32()? as usize;
            let name =
                std::str::from_utf8(reader.take(name_len)?).map_err(|_| SeccompError::Corrupt)?;
            let count = reader.u32()? as usize;
            let program = reader
                .take(count.checked_mul(8).ok_or(SeccompError::Corrupt)?)?
                .chunks_exact(8)
                .map(|c| sock_filter {
                    code: u16::from_le_bytes([c[0], c[1]]),
                    jt: c[2],
                    jf: c[3],
                    k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                })
                .collect();
            filters.insert(name.to_string(), program);
        }
        Ok(Self { filters })
    }

    pub fn get(&self, name: &str) -> Option<&BpfProgram> {
        self.filters.get(name)
    }
}

/// Installs the filter of category `name` on the calling thread.
pub fn apply(filters: &SeccompFilters, name: &str) -> Result<(), SeccompError> {
    let program = filters
        .get(name)
        .ok_or_else(|| SeccompError::Missing(name.into()))?;
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
        name: name.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_category_has_a_filter() {
        let filters = SeccompFilters::builtin().unwrap();
        for name in [VMM_THREAD, VCPU_THREAD, "9p"] {
            let program = filters.get(name).unwrap();
            assert!(program.len() > 10, "{name} filter is suspiciously short");
        }
    }

    /// Runs `body` in a forked child that first installs the `name` filter; returns the
    /// child's wait status.
    fn in_filtered_child(name: &str, body: fn()) -> i32 {
        let filters = SeccompFilters::builtin().unwrap();
        let program = filters.get(name).unwrap().clone();
        // SAFETY: the child only installs a filter, makes raw syscalls and exits; it does not
        // return into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(100) };
            }
            body();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for the child we forked; status is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn a_syscall_outside_the_policy_kills_with_sigsys() {
        for name in [VMM_THREAD, VCPU_THREAD] {
            let status = in_filtered_child(name, || {
                // SAFETY: socket(2) with constant arguments; no memory is passed.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            });
            assert!(libc::WIFSIGNALED(status), "{name}: status {status:#x}");
            assert_eq!(libc::WTERMSIG(status), libc::SIGSYS, "{name}");
        }
    }

    #[test]
    fn vcpus_may_program_msi_routes_and_hand_out_queue_eventfds() {
        let status = in_filtered_child(VCPU_THREAD, || {
            // SAFETY: ioctls on an invalid fd with a null argument fail with EBADF before the
            // kernel reads anything; fcntl duplicates stderr; close closes the duplicate.
            unsafe {
                libc::ioctl(-1, 0x4008_ae6a, std::ptr::null::<u8>()); // KVM_SET_GSI_ROUTING
                libc::ioctl(-1, 0x4040_ae79, std::ptr::null::<u8>()); // KVM_IOEVENTFD
                let fd = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
                libc::close(fd);
            }
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status:#x}"
        );
        // Other KVM ioctls stay forbidden (KVM_IRQFD: only the vmm thread wires irqfds, at boot).
        let status = in_filtered_child(VCPU_THREAD, || {
            // SAFETY: as above, an invalid fd.
            unsafe { libc::ioctl(-1, 0x4020_ae76, std::ptr::null::<u8>()) };
        });
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
    }

    #[test]
    fn an_allowed_syscall_succeeds() {
        for name in [VMM_THREAD, VCPU_THREAD] {
            let status = in_filtered_child(name, || {
                // SAFETY: an empty write to stderr passes no memory the kernel reads.
                unsafe { libc::write(2, std::ptr::null(), 0) };
            });
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{name}: {status:#x}"
            );
        }
    }
}
