//! Boots of the real test guest, one per scenario, several checks per boot.

use std::time::Duration;

use tests::{boot_timeout, guest_file, initramfs, is_pvm_host, scratch_dir, Vm, BASE_CMDLINE};

/// After the guest says it is going down, the VMM must be gone within a second (plus the
/// guest's own shutdown path, emulated on PVM hosts).
fn exit_timeout() -> Duration {
    if is_pvm_host() {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(5)
    }
}

fn boot_args(kernel: &str, cpus: u8, memory: u32, test: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        guest_file(kernel).display().to_string(),
        "--initrd".into(),
        initramfs().display().to_string(),
        "--cmdline".into(),
        format!("{BASE_CMDLINE} test={test}"),
        "--cpus".into(),
        cpus.to_string(),
        "--memory".into(),
        memory.to_string(),
    ]
}

/// The kernel's own log checks the boot path long before init speaks: the E820 map we wrote,
/// our ACPI tables, and the initramfs reaching init.
fn assert_kernel_boot_path(vm: &mut Vm) {
    let timeout = boot_timeout();
    vm.wait_for("Linux version", timeout);
    vm.wait_for(
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        timeout,
    );
    vm.wait_for("ACPI: RSDP 0x00000000000E0000", timeout);
    vm.wait_for("Run /init as init process", timeout);
}

#[test]
fn vmlinux_one_vcpu_boots_and_powers_off() {
    let mut vm = Vm::start(&boot_args("vmlinux", 1, 128, "poweroff"));
    assert_kernel_boot_path(&mut vm);
    vm.wait_for("GUEST_BOOT_OK", boot_timeout());
    vm.wait_for("GUEST_CPUS=1", boot_timeout());
    vm.wait_for("GUEST_ACTION=poweroff", boot_timeout());
    let status = vm.wait_exit(exit_timeout());
    assert!(
        status.success(),
        "poweroff must exit 0: {status:?}\n{}",
        vm.stderr()
    );
}

fn seccomp_mode(pid: u32, tid: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(|v| v.trim().to_string())
}

fn thread_names(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let tid = entry.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        threads.push((tid, comm.trim().to_string()));
    }
    threads.sort_by(|a, b| a.1.cmp(&b.1));
    threads
}

#[test]
fn two_vcpus_every_thread_filtered_and_sigterm_stops_cleanly() {
    let mut args = boot_args("vmlinux", 2, 256, "hang");
    args.extend(["--log-level".into(), "info".into()]);
    let mut vm = Vm::start(&args);
    vm.wait_for_stderr("first KVM_RUN", boot_timeout());
    // The vmm thread installs its filter right after starting the vCPUs; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    let threads = thread_names(vm.pid());
    // Recent KVM runs its NX-huge-page recovery worker as a thread of the VM's owner
    // ("kvm-nx-lpage-recovery"); it is KVM's, not ours, and inherits our filter anyway.
    let names: Vec<&str> = threads
        .iter()
        .map(|(_, n)| n.as_str())
        .filter(|n| !n.starts_with("kvm-"))
        .collect();
    assert_eq!(names, ["vcpu0", "vcpu1", "vmm"], "threads: {threads:?}");
    for (tid, name) in &threads {
        assert_eq!(
            seccomp_mode(vm.pid(), tid).as_deref(),
            Some("2"),
            "thread {name} is not filtered"
        );
    }

    vm.wait_for("GUEST_BOOT_OK", boot_timeout());
    vm.wait_for("GUEST_CPUS=2", boot_timeout());
    vm.wait_for("GUEST_ACTION=hang", boot_timeout());
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(5));
    assert!(
        status.success(),
        "SIGTERM must stop the VM cleanly: {status:?}\n{}",
        vm.stderr()
    );
}

#[test]
fn guest_reboot_exits_3_with_serial_to_a_file() {
    let log = scratch_dir().join("reboot-serial.log");
    let mut args = boot_args("vmlinux", 1, 128, "reboot");
    args.extend(["--serial".into(), format!("file={}", log.display())]);
    let mut vm = Vm::start(&args);
    let status = vm.wait_exit(boot_timeout());
    assert_eq!(
        status.code(),
        Some(3),
        "a guest reset must exit 3: {status:?}\n{}",
        vm.stderr()
    );
    let serial = std::fs::read_to_string(&log).unwrap();
    assert!(
        serial.contains("GUEST_ACTION=reboot"),
        "serial log:\n{serial}"
    );
    assert!(
        vm.stdout().is_empty(),
        "serial went to the file, not stdout"
    );
}

#[test]
fn guest_panic_exits_3_from_a_config_file() {
    let config = scratch_dir().join("panic-vm.json");
    let json = format!(
        r#"{{"machine": {{"vcpus": 1, "memory_mib": 128}},
            "boot": {{"kernel": "{}", "initrd": "{}", "cmdline": "{BASE_CMDLINE} test=panic"}}}}"#,
        guest_file("vmlinux").display(),
        initramfs().display()
    );
    std::fs::write(&config, json).unwrap();
    let mut vm = Vm::start(&["--config", config.to_str().unwrap()]);
    vm.wait_for("Kernel panic - not syncing", boot_timeout());
    let status = vm.wait_exit(exit_timeout());
    assert_eq!(
        status.code(),
        Some(3),
        "panic=1 reboot=k resets the guest: exit 3: {status:?}\n{}",
        vm.stderr()
    );
}

/// A bzImage decompresses itself in guest kernel mode. On a PVM host that is emulated at ~1 M
/// instructions/s and gunzip of this kernel would take several minutes, so there the test only
/// checks that our 64-bit entry reached the decompressor (which prints before it starts) and
/// says loudly that the rest was skipped. On hardware KVM it boots to init.
#[test]
fn bzimage_boots() {
    let mut args = boot_args("bzImage", 1, 128, "poweroff");
    // The decompressor prints only with earlyprintk.
    args[5].push_str(" earlyprintk=ttyS0");
    let mut vm = Vm::start(&args);
    vm.wait_for("Decompressing Linux", boot_timeout());
    if is_pvm_host() {
        eprintln!(
            "SKIPPED on this PVM host: bzImage reached its decompressor through the 64-bit entry; \
             the emulated gunzip of the kernel would take minutes, so booting to init is only \
             checked on hardware KVM"
        );
        return;
    }
    assert_kernel_boot_path(&mut vm);
    vm.wait_for("GUEST_CPUS=1", boot_timeout());
    let status = vm.wait_exit(exit_timeout());
    assert!(status.success(), "{status:?}\n{}", vm.stderr());
}
