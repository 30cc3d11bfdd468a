//! virtio-pci devices on the real guest: rng and the multiport console. Two boots, many checks.

use std::io::Write;
use std::time::Duration;

use tests::{boot_timeout, connect, guest_file, initramfs, read_exactly, scratch_dir, Vm};

const AGENT_PORT: &str = "agent.channel.0";

fn args(cmdline: &str, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        guest_file("vmlinux").display().to_string(),
        "--initrd".into(),
        initramfs().display().to_string(),
        "--cmdline".into(),
        cmdline.into(),
        "--memory".into(),
        "256".into(),
    ];
    args.extend_from_slice(extra);
    args
}

fn socket_path(name: &str) -> std::path::PathBuf {
    let path = scratch_dir().join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// Kata's console (`console=hvc0`) on stdout, with rng and a named port: the guest sees all of
/// them on PCI with MSI-X.
#[test]
fn console_on_stdout_rng_and_named_port_on_pci() {
    let port = socket_path("stdout-agent.sock");
    let extra = [
        "--serial".into(),
        "off".into(),
        "--console".into(),
        "stdout".into(),
        "--rng".into(),
        "--port".into(),
        format!("name={AGENT_PORT},socket={}", port.display()),
    ];
    let mut vm = Vm::start(&args("console=hvc0 reboot=k panic=1 test=poweroff", &extra));
    let timeout = boot_timeout();
    vm.wait_for("GUEST_BOOT_OK", timeout);
    vm.wait_for(
        "GUEST_HWRNG=available=virtio_rng.0  current=virtio_rng.0",
        timeout,
    );
    vm.wait_for(&format!("GUEST_VIRTIO_PORTS={AGENT_PORT}"), timeout);
    vm.wait_for("GUEST_MSIX=yes", timeout);
    let pci = vm.wait_for("GUEST_PCI=", timeout);
    for id in ["1af4:1043", "1af4:1044"] {
        assert!(pci.contains(id), "{id} missing from {pci}");
    }
    vm.wait_for("GUEST_ACTION=poweroff", timeout);
    let status = vm.wait_exit(Duration::from_secs(300));
    assert!(status.success(), "{status:?}\n{}", vm.stderr());
}

/// The agent port's contract: bytes sent before the guest opened the port arrive once it does,
/// 1 MiB round-trips unchanged, and a reconnecting client gets a fresh session. The console
/// socket has no listener the whole time (its output is dropped) and the guest keeps running.
#[test]
fn named_port_echo_backpressure_and_reconnect() {
    let console = socket_path("echo-console.sock");
    let port = socket_path("echo-agent.sock");
    let extra = [
        "--console".into(),
        format!("socket={}", console.display()),
        "--port".into(),
        format!("name={AGENT_PORT},socket={}", port.display()),
    ];
    let mut vm = Vm::start(&args(
        "console=hvc0 reboot=k panic=1 test=echo-port",
        &extra,
    ));

    // Connected and written long before the guest's init opens the port.
    let mut client = connect(&port, Duration::from_secs(30));
    client.write_all(b"sent-before-the-guest-opened\n").unwrap();
    let early = read_exactly(&mut client, 29, boot_timeout());
    assert_eq!(early, b"sent-before-the-guest-opened\n");

    // 1 MiB through the guest and back, written and read concurrently.
    let payload: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut writer = client.try_clone().unwrap();
    let to_send = payload.clone();
    let sender = std::thread::spawn(move || writer.write_all(&to_send));
    let echoed = read_exactly(&mut client, payload.len(), Duration::from_secs(600));
    sender.join().unwrap().unwrap();
    assert!(echoed == payload, "1 MiB came back altered");

    // A new client is a new session: the guest saw the port close and reopen.
    drop(client);
    let mut again = connect(&port, Duration::from_secs(5));
    again.write_all(b"second-session\n").unwrap();
    assert_eq!(
        read_exactly(&mut again, 15, Duration::from_secs(300)),
        b"second-session\n"
    );

    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", vm.stderr());
}
