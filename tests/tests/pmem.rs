//! The Kata rootfs on persistent memory: the Kata-format image boots the guest as an NVDIMM
//! and as virtio-pmem, mounted with DAX, and a read-only image stays unchanged on the host
//! whatever the guest writes. Three boots, several checks each.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::{boot_timeout, guest_file, scratch_dir, Vm, BASE_CMDLINE};

/// Kata's root parameters for its NVDIMM image.
const KATA_ROOT: &str =
    "root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4";
/// Where the guest's `test=pmem-write` writes 4 KiB: /dev/pmem0 + 8 MiB, and /dev/pmem0 starts
/// 2 MiB into the image (after the pfn info block's reservation).
const WRITE_OFFSET: u64 = 10 << 20;
const MARKER: u8 = 0xa5;

/// A private copy of the shared image with a non-zero marker where the guest's write lands
/// (the image holds zeros there, so a zero write would otherwise not show).
fn marked_image(name: &str) -> PathBuf {
    use std::io::{Seek, SeekFrom, Write};
    let path = scratch_dir().join(name);
    let status = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(guest_file("kata-rootfs.img"))
        .arg(&path)
        .status()
        .expect("run cp");
    assert!(status.success(), "copying the image failed");
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.seek(SeekFrom::Start(WRITE_OFFSET)).unwrap();
    file.write_all(&[MARKER; 4096]).unwrap();
    path
}

fn marker_bytes(path: &Path) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    let at = WRITE_OFFSET as usize;
    data[at..at + 4096].to_vec()
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Boots from `image` as `pmem_options` with Kata's root parameters and `test=pmem-write`;
/// checks the root is the pmem partition, mounted with DAX; returns the VM after the write.
fn boot_from_pmem(image: &Path, pmem_options: &str, expected_write: &str) -> Vm {
    let cmdline = format!("{BASE_CMDLINE} {KATA_ROOT} test=pmem-write");
    let mut vm = Vm::start(&[
        "--kernel".to_string(),
        guest_file("vmlinux").display().to_string(),
        "--memory".into(),
        "256".into(),
        "--cmdline".into(),
        cmdline,
        "--log-level".into(),
        "debug".into(),
        "--pmem".into(),
        format!("file={}{pmem_options}", image.display()),
    ]);
    let timeout = boot_timeout();
    vm.wait_for("GUEST_BOOT_OK", timeout);
    vm.wait_for("GUEST_PMEM=pmem0 pmem0p1", timeout);
    vm.wait_for("GUEST_ROOT_DAX=yes", timeout);
    vm.wait_for(&format!("GUEST_PMEM_WRITE={expected_write}"), timeout);
    vm
}

fn expect_clean_exit(vm: &mut Vm) {
    let status = vm.wait_exit(Duration::from_secs(300));
    assert_eq!(status.code(), Some(0), "chapeau exit: {status:?}");
}

/// Kata's setup: a read-only NVDIMM. The guest sees it not armed and refuses the write itself;
/// the image's bytes do not change.
#[test]
fn read_only_nvdimm_boots_kata_rootfs_with_dax() {
    let image = marked_image("nvdimm-ro.img");
    let before = sha256(&image);
    let mut vm = boot_from_pmem(&image, "", "refused");
    assert!(vm
        .stdout()
        .contains("region0 read-only, marking pmem0 read-only"));
    assert!(vm
        .stdout()
        .contains("EXT4-fs (pmem0p1): mounted filesystem"));
    expect_clean_exit(&mut vm);
    assert!(vm.stderr().contains("NVDIMM"), "{}", vm.stderr());
    assert_eq!(sha256(&image), before, "the read-only image changed");
}

/// virtio-pmem over a read-only image: the guest does not know it is read-only and writes;
/// each write exits to chapeau, which drops and logs it; the VM keeps running to its end.
#[test]
fn read_only_virtio_pmem_drops_guest_writes() {
    let image = marked_image("virtio-ro.img");
    let before = sha256(&image);
    let mut vm = boot_from_pmem(&image, ",model=virtio", "done");
    vm.wait_for_stderr("dropped", Duration::from_secs(60));
    expect_clean_exit(&mut vm);
    assert!(vm.stdout().contains("1af4:105b"), "virtio-pmem on PCI");
    assert_eq!(sha256(&image), before, "the read-only image changed");
    assert_eq!(marker_bytes(&image), vec![MARKER; 4096]);
}

/// A writable virtio-pmem image takes the guest's write, and the guest's fsync reaches us as
/// a flush request.
#[test]
fn writable_virtio_pmem_takes_writes_and_flushes() {
    let image = marked_image("virtio-rw.img");
    let mut vm = boot_from_pmem(&image, ",model=virtio,readonly=off", "done");
    vm.wait_for_stderr("flush requests, one sync", Duration::from_secs(120));
    expect_clean_exit(&mut vm);
    assert_eq!(
        marker_bytes(&image),
        vec![0; 4096],
        "the write did not land"
    );
}
