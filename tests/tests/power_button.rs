//! The guest-visible shutdown request (the REST API's `SendCtrlAltDel`, issue 10): an ACPI power
//! button press behind a Generic Event Device, which the test guest's init (`test=wait`) answers
//! with `GUEST_POWER_BUTTON=pressed` and a power-off.
//!
//! chapeau has no way to press the button from outside until `PUT /actions` exists; until then
//! this proves the guest side under QEMU `-M microvm`, whose hardware-reduced ACPI platform
//! signals its power button the way chapeau's does (GED `ACPI0013` → `_EVT` → `Notify (PWRB,
//! 0x80)` → Linux's ACPI button driver → the "Power Button" input device). With the API, the
//! chapeau test is the same boot and checks with the press sent through the API socket, and
//! chapeau must then exit 0.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::{boot_timeout, guest_file, initramfs, is_pvm_host, scratch_dir, Vm, BASE_CMDLINE};

const QEMU: &str = "qemu-system-x86_64";

fn qemu_available() -> bool {
    Command::new(QEMU).arg("--version").output().is_ok() && Path::new("/dev/kvm").exists()
}

/// A path QEMU creates its QMP socket at, removed when the test ends, pass or fail.
struct SocketPath(PathBuf);

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A QMP session: the greeting read and capabilities negotiated.
struct Qmp(BufReader<UnixStream>);

impl Qmp {
    /// Connects once QEMU has created the socket.
    fn connect(path: &Path, timeout: Duration) -> Qmp {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("QMP socket {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("QMP read timeout");
        let mut qmp = Qmp(BufReader::new(stream));
        let greeting = qmp.line();
        assert!(greeting.contains("\"QMP\""), "QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities");
        qmp
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.0.read_line(&mut line).expect("read from QMP");
        assert!(!line.is_empty(), "QMP closed");
        line
    }

    /// Runs `command` and returns its answer, skipping asynchronous events.
    fn execute(&mut self, command: &str) -> String {
        let request = format!("{{\"execute\": \"{command}\"}}\n");
        self.0
            .get_mut()
            .write_all(request.as_bytes())
            .expect("write to QMP");
        loop {
            let line = self.line();
            if line.contains("\"return\"") || line.contains("\"error\"") {
                assert!(line.contains("\"return\""), "QMP {command}: {line}");
                return line;
            }
        }
    }
}

/// Boots the test guest waiting for its power button, presses it with `press`, and checks the
/// guest saw it and powered off.
fn power_button_powers_the_guest_off(vm: &mut Vm, press: impl FnOnce()) {
    vm.wait_for("GUEST_BOOT_OK", boot_timeout());
    vm.wait_for("GUEST_ACTION=wait", boot_timeout());
    // Printed before GUEST_ACTION=wait when init found no button.
    assert!(
        !vm.stdout().contains("GUEST_POWER_BUTTON=none"),
        "the guest found no power button:\n{}",
        vm.stdout()
    );
    press();
    vm.wait_for("GUEST_POWER_BUTTON=pressed", boot_timeout());
    let status = vm.wait_exit(boot_timeout());
    assert!(status.success(), "power-off must exit 0: {status:?}");
    eprintln!("--- guest console ---\n{}", vm.stdout());
}

#[test]
fn qemu_microvm_power_button_powers_the_test_guest_off() {
    if !qemu_available() {
        eprintln!("{QEMU} or /dev/kvm not found: skipping");
        return;
    }
    let qmp_path = SocketPath(scratch_dir().join(format!("qmp-{}.sock", std::process::id())));
    let mut cmdline = format!("{BASE_CMDLINE} test=wait");
    if is_pvm_host() {
        cmdline = vmm::pvm::with_pvm_params(&cmdline);
    }
    let mut qemu = Command::new(QEMU);
    qemu.args(["-M", "microvm,acpi=on", "-enable-kvm"])
        .args(["-cpu", "host,-arch-capabilities", "-m", "128", "-smp", "1"])
        .args([
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(guest_file("vmlinux"))
        .arg("-initrd")
        .arg(initramfs())
        .args(["-append", &cmdline])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.0.display()));
    let mut vm = Vm::start_command(&mut qemu);
    let mut qmp = Qmp::connect(&qmp_path.0, Duration::from_secs(30));
    power_button_powers_the_guest_off(&mut vm, || {
        qmp.execute("system_powerdown");
    });
}
