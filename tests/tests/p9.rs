//! virtio-9p: the device's workers under the real `"9p"` seccomp policy (in-process, no
//! guest), then the guest mounting the tag and working on it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use devices::virtio::p9::fake_driver::{exercise, Client, FakeDriver};
use devices::virtio::p9::server::{Ownership, ServerOptions};
use devices::virtio::ThreadConfinement;
use tests::{boot_timeout, guest_file, scratch_dir, Vm, BASE_CMDLINE};
use vmm::seccomp::SeccompFilters;

/// The VMM's confinement: the seccomp filter of the thread's kind.
struct Seccomp(SeccompFilters);

impl ThreadConfinement for Seccomp {
    fn confine(&self, kind: &str) -> Result<(), String> {
        vmm::seccomp::apply(&self.0, kind).map_err(|e| e.to_string())
    }
}

fn export(name: &str) -> PathBuf {
    let dir = scratch_dir().join(format!("p9-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every operation, served by workers under the `"9p"` filter: a syscall outside it would
/// kill this test process with SIGSYS.
#[test]
fn workers_run_every_operation_under_their_seccomp_policy() {
    let dir = export("seccomp");
    let filters = SeccompFilters::builtin().unwrap();
    let options = ServerOptions {
        ownership: Ownership::Vmm,
        readonly: false,
    };
    let driver = FakeDriver::new(&dir, options, Arc::new(Seccomp(filters))).unwrap();
    let mut client = Client::over(driver);
    exercise(&mut client);
    drop(client);
    std::fs::remove_dir_all(&dir).unwrap();
}
