//! Bad input is refused with one precise line on stderr and a non-zero exit, before any guest
//! runs; never a panic. And a guest that triple-faults ends with its own status, said once.

use std::process::{Command, Stdio};

use tests::{chapeau_bin, guest_file, run_to_exit, scratch_dir};

fn assert_refused(args: &[&str], expected: &str) {
    let (status, _stdout, stderr) = run_to_exit(args);
    assert!(!status.success(), "{args:?} was accepted");
    assert!(
        status.code().is_some(),
        "{args:?} died of a signal: {status:?}"
    );
    assert!(
        stderr.contains(expected),
        "{args:?}: expected `{expected}` in:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    let lines = stderr.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(
        lines <= 2,
        "{args:?}: expected one clear line, got:\n{stderr}"
    );
}

fn kernel() -> String {
    guest_file("vmlinux").display().to_string()
}

#[test]
fn missing_kernel_file() {
    assert_refused(
        &["--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
}

#[test]
fn kernel_that_is_a_directory_or_garbage() {
    assert_refused(&["--kernel", "/tmp"], "/tmp");
    let junk = scratch_dir().join("not-a-kernel");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    assert_refused(
        &["--kernel", junk.to_str().unwrap()],
        "neither an ELF vmlinux nor a bzImage",
    );
}

#[test]
fn initrd_larger_than_memory() {
    let image = guest_file("kata-rootfs.img").display().to_string();
    assert_refused(
        &["--kernel", &kernel(), "--initrd", &image, "--memory", "48"],
        "give the VM more --memory",
    );
}

#[test]
fn zero_cpus_or_memory() {
    assert_refused(&["--kernel", &kernel(), "--cpus", "0"], "--cpus");
    assert_refused(&["--kernel", &kernel(), "--memory", "0"], "--memory");
}

#[test]
fn more_memory_than_the_host() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let host_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let too_much = (host_kib / 1024 + 1024).to_string();
    assert_refused(
        &["--kernel", &kernel(), "--memory", &too_much],
        "more than this host has",
    );
}

#[test]
fn no_kernel_at_all() {
    assert_refused(&[], "--kernel");
}

#[test]
fn unknown_json_field() {
    let config = scratch_dir().join("unknown-field.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"boot": {{"kernel": "{}", "initrd_path": "/x"}}}}"#,
            kernel()
        ),
    )
    .unwrap();
    assert_refused(&["--config", config.to_str().unwrap()], "initrd_path");
}

#[test]
fn kvm_device_missing() {
    // A private mount namespace in which /dev is an empty tmpfs: /dev/kvm is gone for chapeau
    // only. Needs root and unshare(1), which CI has.
    let script = format!(
        "mount -t tmpfs none /dev && exec {} --kernel {}",
        chapeau_bin().display(),
        kernel()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .expect("run unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("/dev/kvm does not exist"), "{stderr}");
}

#[test]
fn help_documents_every_flag() {
    let (status, stdout, _) = run_to_exit(&["--help"]);
    assert!(status.success());
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--config",
        "--log-level",
        "--pvm-params",
        "--console",
        "--port",
        "--rng",
        "--pmem",
    ] {
        assert!(stdout.contains(flag), "--help does not mention {flag}");
    }
}

#[test]
fn bad_pmem_images() {
    let dir = scratch_dir().join("pmem-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let sized = |name: &str, len: u64| {
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        path.display().to_string()
    };
    let pmem = |spec: String| vec!["--kernel".to_string(), kernel(), "--pmem".into(), spec];
    let refused = |args: Vec<String>, expected: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(&args, expected);
    };
    refused(
        pmem("file=/nonexistent/kata.img".into()),
        "cannot open pmem image /nonexistent/kata.img: No such file",
    );
    refused(
        pmem(format!("file={}", dir.display())),
        "is a directory, not a regular file",
    );
    refused(
        pmem(format!("file={}", sized("empty.img", 0))),
        "empty.img is empty",
    );
    let odd = sized("odd.img", 3 << 20);
    refused(
        pmem(format!("file={odd}")),
        &format!("the size must be a multiple of 2 MiB (2097152 bytes); pad it with `truncate -s 4194304 {odd}`"),
    );
    let good = sized("good.img", 2 << 20);
    let mut twice = pmem(format!("file={good}"));
    twice.extend([
        "--pmem".into(),
        format!("file={good},model=virtio,readonly=off"),
    ]);
    refused(
        twice,
        "given twice (model=nvdimm, readonly=on and model=virtio, readonly=off)",
    );
    refused(
        pmem(format!("file={good},model=dimm")),
        "model=dimm: expected model=nvdimm or model=virtio",
    );
}

/// A 64-bit ELF whose entry is `ud2`: with no IDT the #UD becomes a double fault, then a
/// triple fault, which KVM reports as a shutdown exit.
fn triple_fault_kernel() -> std::path::PathBuf {
    const LOAD: u64 = 0x100_0000;
    const CODE_OFFSET: u64 = 0x1000;
    const UD2: [u8; 2] = [0x0f, 0x0b];
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers right after this header
    elf.extend_from_slice(&0u64.to_le_bytes());
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 0, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for field in [CODE_OFFSET, LOAD, LOAD, 2, 2, 0x1000] {
        elf.extend_from_slice(&field.to_le_bytes());
    }
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(&UD2);
    let path = scratch_dir().join(format!("triple-fault-{}.elf", std::process::id()));
    std::fs::write(&path, elf).unwrap();
    path
}

#[test]
fn a_triple_fault_ends_the_vm_with_status_4_and_says_so() {
    let kernel = triple_fault_kernel();
    let (status, _stdout, stderr) = run_to_exit(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--serial",
        "off",
    ]);
    let _ = std::fs::remove_file(&kernel);
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("WARN: vcpu0: guest triple-faulted"),
        "{stderr}"
    );
    assert!(
        stderr.contains("chapeau: the guest triple-faulted"),
        "{stderr}"
    );
}
