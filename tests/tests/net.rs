//! virtio-net with the real guest, inside a network namespace each test creates
//! ([`tests::netns`]). The guest's `test=net` mode sets its address and runs a TCP echo server on port 5000.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::netns::Netns;
use tests::{boot_timeout, chapeau_bin, guest_file, Vm, BASE_CMDLINE};

const GUEST_IP: &str = "10.0.0.2";
const MAC: &str = "52:54:00:12:34:56";
/// Bytes each way through the guest's echo server (CHAPEAU_NET_MIB overrides: 64 on a fast host).
fn transfer_bytes() -> u64 {
    std::env::var("CHAPEAU_NET_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(8)
        << 20
}

fn boot(ns: &Netns, nets: &[String], guest_ip: &str) -> Vm {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", ns.name()])
        .arg(chapeau_bin());
    command.args([
        "--kernel".to_string(),
        guest_file("vmlinux").display().to_string(),
        "--initrd".into(),
        tests::initramfs().display().to_string(),
        "--memory".into(),
        "256".into(),
        "--cpus".into(),
        "2".into(),
        "--cmdline".into(),
        format!("{BASE_CMDLINE} test=net guest_ip={guest_ip}"),
        "--log-level".into(),
        "info".into(),
    ]);
    for net in nets {
        command.arg("--net").arg(net);
    }
    let mut vm = Vm::start_command(&mut command);
    vm.wait_for("GUEST_BOOT_OK", boot_timeout());
    vm
}

/// FNV-1a: enough to tell the bytes that came back from those sent.
fn fnv(hash: u64, data: &[u8]) -> u64 {
    data.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Sends `total` bytes to the guest's echo server and reads them back; returns MB/s.
fn echo(addr: &str, total: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {addr}: {e}, retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("connect {addr}: {e}"),
        }
    };
    let mut reader = stream.try_clone().unwrap();
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut stream = stream;
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut sent = 0u64;
        let mut chunk = vec![0u8; 64 << 10];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        while sent < total {
            let n = chunk.len().min((total - sent) as usize);
            for b in &mut chunk[..n] {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            stream.write_all(&chunk[..n]).unwrap();
            hash = fnv(hash, &chunk[..n]);
            sent += n as u64;
        }
        hash
    });
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    reader
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    while got < total {
        let n = reader.read(&mut buf).expect("read the echo");
        assert!(n > 0, "the guest closed after {got} of {total} bytes");
        hash = fnv(hash, &buf[..n]);
        got += n as u64;
    }
    let sent_hash = writer.join().unwrap();
    assert_eq!(hash, sent_hash, "the bytes that came back differ");
    2.0 * total as f64 / start.elapsed().as_secs_f64() / 1e6
}

#[test]
fn guest_pings_is_pinged_and_echoes_tcp() {
    let ns = Netns::new("net", &[1]);
    let mut vm = boot(&ns, &[format!("tap=tap0,mac={MAC},vhost=auto")], GUEST_IP);
    vm.wait_for("GUEST_NET=eth0", boot_timeout());
    vm.wait_for(&format!("GUEST_NET_UP={GUEST_IP}/24"), boot_timeout());
    let ping = ns.output(&["busybox", "ping", "-c", "3", "-W", "10", GUEST_IP]);
    assert!(ping.contains(" 0% packet loss"), "{ping}");
    // The guest answered from the MAC we gave it.
    let neigh = ns.output(&["ip", "neigh", "show", GUEST_IP]);
    assert!(neigh.contains(MAC), "{neigh}");
    let total = transfer_bytes();
    let rate = ns.enter(move || echo(&format!("{GUEST_IP}:5000"), total));
    eprintln!(
        "TCP echo through the guest: {} MiB each way, {rate:.1} MB/s",
        total >> 20
    );
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{status:?}: {}", vm.stderr());
}

#[test]
fn two_nics_and_a_multiqueue_nic() {
    let ns = Netns::new("mq", &[1, 2]);
    let mut vm = boot(
        &ns,
        &[
            "tap=tap0,mac=52:54:00:00:00:01,vhost=off".into(),
            "tap=tap1,mac=52:54:00:00:00:02,queues=2,vhost=off".into(),
        ],
        GUEST_IP,
    );
    vm.wait_for("GUEST_NET=eth0 eth1", boot_timeout());
    vm.wait_for(&format!("GUEST_NET_UP={GUEST_IP}/24"), boot_timeout());
    let ping = ns.output(&["busybox", "ping", "-c", "2", "-W", "10", GUEST_IP]);
    assert!(ping.contains(" 0% packet loss"), "{ping}");
    vm.signal(libc::SIGTERM);
    let _ = vm.wait_exit(Duration::from_secs(60));
}

#[test]
fn vhost_on_without_vhost_net_is_a_clear_error() {
    if std::path::Path::new("/dev/vhost-net").exists() {
        eprintln!("/dev/vhost-net exists: vhost=on works here, nothing to refuse");
        return;
    }
    let ns = Netns::new("vh", &[1]);
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(chapeau_bin())
        .args(["--kernel", &guest_file("vmlinux").display().to_string()])
        .args(["--net", &format!("tap=tap0,mac={MAC},vhost=on")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("vhost=on but this host has no /dev/vhost-net"),
        "{stderr}"
    );
}

#[test]
fn vhost_net_for_real_where_the_host_has_it() {
    if !std::path::Path::new("/dev/vhost-net").exists() {
        eprintln!("SKIPPED: no /dev/vhost-net (vhost-net integration test did not run)");
        return;
    }
    let ns = Netns::new("vhon", &[1]);
    let mut vm = boot(&ns, &[format!("tap=tap0,mac={MAC},vhost=on")], GUEST_IP);
    vm.wait_for(&format!("GUEST_NET_UP={GUEST_IP}/24"), boot_timeout());
    let ping = ns.output(&["busybox", "ping", "-c", "3", "-W", "10", GUEST_IP]);
    assert!(ping.contains(" 0% packet loss"), "{ping}");
    let total = transfer_bytes();
    ns.enter(move || echo(&format!("{GUEST_IP}:5000"), total));
    vm.signal(libc::SIGTERM);
    let _ = vm.wait_exit(Duration::from_secs(60));
}
