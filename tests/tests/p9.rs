//! virtio-9p: the device's workers under the real `"9p"` seccomp policy (in-process, no
//! guest), then the guest mounting the tag and working on it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use devices::virtio::p9::fake_driver::{exercise, Client, FakeDriver};
use devices::virtio::p9::server::{Ownership, ServerOptions};
use std::os::unix::fs::MetadataExt;
use tests::{boot_timeout, guest_file, initramfs, is_pvm_host, scratch_dir, Vm, BASE_CMDLINE};
use vmm::seccomp::{SeccompConfinement, SeccompFilters};

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
    let driver = FakeDriver::new(
        &dir,
        options,
        Arc::new(SeccompConfinement(Arc::new(filters))),
    )
    .unwrap();
    let mut client = Client::over(driver);
    exercise(&mut client);
    drop(client);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn sha256(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The guest mounts the share as Kata does and runs `test=9p-workload`: every step checked in
/// the guest, the results and the escape attempts checked here on the host's files.
#[test]
fn guest_workload_on_the_share() {
    let root = export("guest");
    let share = root.join("share");
    let outside = root.join("outside");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    std::fs::write(share.join("host-wrote.txt"), b"from-the-host\n").unwrap();
    std::os::unix::fs::symlink(&outside, share.join("out")).unwrap();
    let secret_before = std::fs::metadata(outside.join("secret")).unwrap();

    // Where guest kernel code is emulated (PVM) 64 MiB take the guest most of an hour.
    let big_mib: u64 = if is_pvm_host() { 8 } else { 64 };
    let mut vm = Vm::start(&[
        "--kernel".to_string(),
        guest_file("vmlinux").display().to_string(),
        "--initrd".into(),
        initramfs().display().to_string(),
        "--cmdline".into(),
        format!("{BASE_CMDLINE} test=9p-workload p9_big_mib={big_mib}"),
        "--memory".into(),
        "256".into(),
        "--fs".into(),
        format!("tag=kataShared,path={}", share.display()),
    ]);
    // 2,000 creates and 64 MiB from an emulated guest kernel take minutes on a PVM host.
    let timeout = boot_timeout() + Duration::from_secs(1500);
    vm.wait_for("GUEST_ACTION=9p-workload", timeout);
    vm.wait_for("GUEST_9P_WORKLOAD=", timeout);
    let status = vm.wait_exit(Duration::from_secs(300));
    // Read the result lines once the guest is done: a line seen while it was being written
    // may be cut short.
    let stdout = vm.stdout();
    let line = |prefix: &str| -> String {
        stdout
            .lines()
            .find_map(|l| l.split(prefix).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        line("GUEST_9P_WORKLOAD="),
        "ok",
        "guest workload failed:\n{stdout}"
    );
    assert_eq!(line("GUEST_9P_ESCAPES="), "tried");
    assert_eq!(status.code(), Some(0), "chapeau exit: {status:?}");

    // What the guest did is on the host.
    let guest_sha = line("GUEST_9P_BIG_SHA=");
    let big = share.join("big");
    assert_eq!(std::fs::metadata(&big).unwrap().len(), big_mib << 20);
    assert_eq!(guest_sha.len(), 64, "no checksum from the guest");
    assert!(
        sha256(&big).starts_with(&guest_sha),
        "the {big_mib} MiB file differs"
    );
    assert_eq!(std::fs::read(share.join("g")).unwrap(), b"one");
    assert_eq!(
        std::fs::metadata(share.join("g")).unwrap().mode() & 0o777,
        0o640
    );
    assert_eq!(std::fs::read_dir(share.join("many")).unwrap().count(), 2000);
    for gone in ["f", "h", "s", "d", "u"] {
        assert!(!share.join(gone).exists(), "{gone} should be gone");
    }
    // The guest's symlink to /etc is only a link in the share.
    assert_eq!(
        std::fs::read_link(share.join("evil")).unwrap(),
        std::path::Path::new("/etc")
    );
    assert!(!std::path::Path::new("/etc/pwned-etc").exists());
    // Nothing outside the share was touched or read.
    let names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["secret"]);
    let secret_after = std::fs::metadata(outside.join("secret")).unwrap();
    assert_eq!(
        std::fs::read(outside.join("secret")).unwrap(),
        b"host secret"
    );
    assert_eq!(secret_after.mtime(), secret_before.mtime());
    std::fs::remove_dir_all(&root).unwrap();
}
