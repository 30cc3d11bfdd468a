//! chapeau's VMM: turns a `VmConfig` into a running KVM guest and runs it to its end, driven by
//! the command line, the REST API or QMP (the QEMU front end) through one runtime (`vmm.rs`).

pub mod api_server;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod device_manager;
pub mod event_loop;
pub mod host_files;
pub mod landlock;
pub mod loader;
pub mod logger;
pub mod memory;
pub mod pvm;
pub mod qemu;
pub mod qmp_server;
pub mod seccomp;
// Used by build.rs; compiled here only for its tests.
#[cfg(test)]
mod seccomp_dispatch;
#[cfg(feature = "forbidden-syscall-test")]
pub mod test_hooks;
pub mod vmm;
pub mod vstate;

/// Names the calling thread (what `ps -T` and /proc/<pid>/task/<tid>/comm show).
pub fn name_current_thread(name: &str) {
    let mut buf = [0u8; 16];
    let len = name.len().min(15);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `buf`.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}
