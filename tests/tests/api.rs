//! The REST API on a unix socket, through a real HTTP client (curl): configure the test guest
//! with every device kind, boot it, pause it and show nothing runs, resume it, stop it; every
//! bad request gets its code and message while the server keeps serving; nothing of the VMM is
//! left afterwards.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::process::Command;

use tests::kata::GUEST_IP;
use tests::netns::Netns;
use tests::{
    api_call, boot_timeout, chapeau_bin, connect, guest_file, initramfs, read_exactly, scratch_dir,
    thread_seccomp_modes, Vm,
};

const AGENT_PORT: &str = "agent.channel.0";

/// A fresh directory for one test's sockets and files.
fn test_dir(name: &str) -> PathBuf {
    let dir = scratch_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_for_file(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts a request's status, and that the body contains `needle`.
fn expect(sock: &Path, method: &str, path: &str, body: Option<&str>, status: u16, needle: &str) {
    let (got, text) = api_call(sock, method, path, body);
    assert_eq!(got, status, "{method} {path} {body:?}: {text}");
    assert!(
        text.contains(needle),
        "{method} {path}: {needle:?} not in {text}"
    );
}

fn ok(sock: &Path, method: &str, path: &str, body: &str) {
    expect(sock, method, path, Some(body), 204, "");
}

fn state(sock: &Path) -> String {
    let (status, body) = api_call(sock, "GET", "/", None);
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    info["state"].as_str().unwrap_or_default().to_string()
}

fn exits_total(sock: &Path) -> u64 {
    let (status, body) = api_call(sock, "GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    let metrics: serde_json::Value = serde_json::from_str(&body).unwrap();
    metrics["vcpu_exits"]["total"]
        .as_u64()
        .expect("vcpu_exits.total")
}

/// The per-device counters of the metrics answer.
fn device_metrics(sock: &Path) -> serde_json::Value {
    let (status, body) = api_call(sock, "GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    let metrics: serde_json::Value = serde_json::from_str(&body).unwrap();
    metrics["devices"].clone()
}

/// Counter `path` ("net0/tx_frames", "console/ports/console/bytes_from_guest") of `devices`;
/// device ids may contain '/' ("fs/kataShared"), so the id is given apart.
fn counter(devices: &serde_json::Value, id: &str, path: &str) -> u64 {
    path.split('/')
        .fold(&devices[id], |v, key| &v[key])
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {id} {path} in {devices}"))
}

/// What the devices that carried traffic so far must show: console output and both ways of
/// the agent port, frames both ways on the NIC, 9p requests and writes, random bytes served,
/// and kicks and interrupts on each of them.
fn assert_devices_counted(devices: &serde_json::Value) {
    let agent_to_guest = format!("ports/{AGENT_PORT}/bytes_to_guest");
    let agent_from_guest = format!("ports/{AGENT_PORT}/bytes_from_guest");
    let mut wanted = vec![
        ("console", "ports/console/bytes_from_guest"),
        ("console", agent_to_guest.as_str()),
        ("console", agent_from_guest.as_str()),
        ("fs/kataShared", "requests"),
        ("fs/kataShared", "bytes_written"),
        ("rng", "bytes_served"),
        ("net0", "interrupts"),
    ];
    for id in ["console", "fs/kataShared", "rng"] {
        wanted.extend([(id, "kicks"), (id, "interrupts")]);
    }
    for (id, path) in wanted {
        assert!(
            counter(devices, id, path) > 0,
            "{id} {path} is 0: {devices}"
        );
    }
    // With vhost-net the kernel moves the frames (and reads the kicks) where we cannot count.
    if !Path::new("/dev/vhost-net").exists() {
        for path in ["rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "kicks"] {
            assert!(counter(devices, "net0", path) > 0, "net0 {path}: {devices}");
        }
    }
    // The device ids the configuration gave: the virtio-pmem image is the second pmem.
    assert_eq!(counter(devices, "pmem1", "bad_requests"), 0, "{devices}");
    assert_eq!(counter(devices, "serial", "bytes_dropped"), 0, "{devices}");
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Requests that must be refused before anything is configured, each with its code and a
/// message that names what was wrong.
fn bad_requests_before_boot(sock: &Path) {
    expect(sock, "GET", "/nowhere", None, 404, "/nowhere");
    expect(sock, "DELETE", "/machine-config", None, 405, "");
    expect(
        sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpus": 1, "memory": 128}"#),
        400,
        "unknown field `memory`",
    );
    expect(
        sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpus": "two"}"#),
        400,
        "vcpus",
    );
    expect(
        sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpus": 0}"#),
        400,
        "machine.vcpus",
    );
    expect(sock, "PUT", "/boot-source", Some("{not json"), 400, "");
    expect(
        sock,
        "PUT",
        "/ports/..",
        Some(r#"{"socket": "/tmp/x.sock"}"#),
        400,
        "port name",
    );
    let huge = format!(r#"{{"kernel": "{}"}}"#, "k".repeat(100_000));
    expect(sock, "PUT", "/boot-source", Some(&huge), 413, "65536");
    expect(
        sock,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        409,
        "not running",
    );
    expect(
        sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
        "no boot source",
    );
    expect(
        sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Reboot"}"#),
        400,
        "InstanceStart",
    );
    assert_eq!(state(sock), "Not started", "the server kept serving");
}

/// The whole lifecycle through the API, with every device kind: the console, a named port,
/// rng, the Kata image as an NVDIMM and again as virtio-pmem, a NIC on a tap in a private
/// network namespace, a shared directory over 9p.
#[test]
fn configure_boot_pause_resume_and_shut_down_through_the_api() {
    let dir = test_dir("api-lifecycle");
    let sock = dir.join("api.sock");
    let agent = dir.join("agent.sock");
    let hvc0 = dir.join("hvc0.log");
    let metrics = dir.join("metrics.json");
    let shared = scratch_dir().join("api-lifecycle-shared");
    let _ = std::fs::remove_dir_all(&shared);
    std::fs::create_dir_all(&shared).unwrap();
    // chapeau runs in the namespace, where it opens the tap by name.
    let ns = Netns::new("api", &[1]);
    let mut vm = Vm::start_command(
        Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(chapeau_bin())
            .args([
                "--api-sock",
                sock.to_str().unwrap(),
                "--id",
                "api-test-vm",
                "--log-level",
                "info",
            ]),
    );
    wait_for_file(&sock, Duration::from_secs(10));
    let (status, body) = api_call(&sock, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(body.contains(r#""id":"api-test-vm""#), "{body}");
    assert!(body.contains(r#""state":"Not started""#), "{body}");

    bad_requests_before_boot(&sock);

    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpus": 1, "memory_mib": 256}"#,
    );
    ok(
        &sock,
        "PUT",
        "/boot-source",
        &serde_json::json!({
            "kernel": guest_file("vmlinux"),
            "initrd": initramfs(),
            "cmdline": format!("console=hvc0 reboot=k panic=1 test=kata guest_ip={GUEST_IP}"),
        })
        .to_string(),
    );
    ok(&sock, "PUT", "/serial", r#""off""#);
    ok(
        &sock,
        "PUT",
        "/console",
        &serde_json::json!({ "file": hvc0 }).to_string(),
    );
    ok(
        &sock,
        "PUT",
        &format!("/ports/{AGENT_PORT}"),
        &serde_json::json!({ "socket": agent }).to_string(),
    );
    ok(&sock, "PUT", "/rng", "{}");
    ok(
        &sock,
        "PUT",
        "/pmem/rootfs",
        &serde_json::json!({ "file": guest_file("kata-rootfs.img"), "readonly": true }).to_string(),
    );
    ok(
        &sock,
        "PUT",
        "/pmem/again",
        &serde_json::json!({ "file": guest_file("kata-rootfs.img"), "model": "virtio" })
            .to_string(),
    );
    ok(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        r#"{"tap": "tap0", "mac": "52:54:00:12:34:56"}"#,
    );
    ok(
        &sock,
        "PUT",
        "/fs/kataShared",
        &serde_json::json!({ "tag": "kataShared", "path": shared }).to_string(),
    );
    ok(&sock, "PUT", "/logger", r#"{"level": "info"}"#);
    ok(
        &sock,
        "PUT",
        "/metrics",
        &serde_json::json!({ "metrics_path": metrics, "interval_s": 1 }).to_string(),
    );
    let (_, config) = api_call(&sock, "GET", "/vm/config", None);
    for wanted in [
        AGENT_PORT,
        "kata-rootfs.img",
        "virtio",
        "tap0",
        "kataShared",
    ] {
        assert!(config.contains(wanted), "no {wanted} in {config}");
    }

    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!(state(&sock), "Running");
    expect(&sock, "PUT", "/rng", Some("{}"), 409, "rng");
    expect(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        409,
        "already started",
    );
    expect(
        &sock,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Resumed"}"#),
        409,
        "not paused",
    );

    // The agent port echoes once the guest is up; before that it wrote over 9p and brought
    // up its network.
    let mut client = connect(&agent, Duration::from_secs(30));
    client.write_all(b"before-pause\n").unwrap();
    assert_eq!(
        read_exactly(&mut client, 13, boot_timeout()),
        b"before-pause\n"
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("guest-wrote.txt")).unwrap(),
        "hello-from-guest\n"
    );
    let ping = ns.output(&["busybox", "ping", "-c", "2", "-W", "10", GUEST_IP]);
    assert!(ping.contains(" 0% packet loss"), "{ping}");
    assert_devices_counted(&device_metrics(&sock));

    // Every thread is ours, named, and filtered.
    let threads = thread_seccomp_modes(vm.pid());
    let names: Vec<&str> = threads.iter().map(|(name, _)| name.as_str()).collect();
    for wanted in ["api", "vcpu0", "vmm", "net0-q0", "9p-1"] {
        assert!(names.contains(&wanted), "no {wanted} thread in {names:?}");
    }
    assert!(
        threads.iter().all(|(_, mode)| mode == "2"),
        "unfiltered threads: {threads:?}"
    );

    // Paused: no vCPU exits, no console output, no echo.
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(state(&sock), "Paused");
    expect(
        &sock,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        409,
        "not running",
    );
    let exits = exits_total(&sock);
    let devices = device_metrics(&sock);
    let console = file_len(&hvc0);
    client.write_all(b"while-paused\n").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        std::io::Read::read(&mut client, &mut byte).is_err(),
        "the guest echoed while paused"
    );
    assert_eq!(exits_total(&sock), exits, "vCPUs ran while paused");
    // No device counted anything either, though the agent's client wrote to its port.
    assert_eq!(device_metrics(&sock), devices, "devices moved while paused");
    assert_eq!(file_len(&hvc0), console, "the console wrote while paused");

    // Resumed: what was sent meanwhile comes back.
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(state(&sock), "Running");
    assert_eq!(
        read_exactly(&mut client, 13, Duration::from_secs(120)),
        b"while-paused\n"
    );
    assert!(exits_total(&sock) > exits);

    ok(&sock, "PUT", "/actions", r#"{"action_type": "Shutdown"}"#);
    let status = vm.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", vm.stderr());
    assert!(
        vm.stderr().contains("VM ended (Stopped)"),
        "{}",
        vm.stderr()
    );

    // Nothing left behind but what we asked for: the sockets are gone, the metrics written.
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, ["hvc0.log", "metrics.json"], "files left in {dir:?}");
    let flushed = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(flushed.lines().last().expect("a metrics line")).unwrap();
    assert!(last["vcpu_exits"]["total"].as_u64().unwrap() > 0, "{last}");
    // The file holds the same per-device counters as the answer, final values included.
    assert_devices_counted(&last["devices"]);
    assert!(
        counter(
            &last["devices"],
            "console",
            &format!("ports/{AGENT_PORT}/bytes_to_guest")
        ) >= 26,
        "both lines sent to the agent port: {last}"
    );
    assert!(!Path::new(&format!("/proc/{}", vm.pid())).exists());
    let _ = std::fs::remove_dir_all(&shared);
}

/// A live API socket is never taken over; a stale one is replaced and said so.
#[test]
fn a_live_api_socket_is_refused_and_a_stale_one_replaced() {
    let dir = test_dir("api-socket");
    let sock = dir.join("api.sock");
    let live = UnixListener::bind(&sock).unwrap();
    let (status, _, stderr) = tests::run_to_exit(&["--api-sock", sock.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("api.sock") && stderr.contains("listen"),
        "{stderr}"
    );
    assert!(sock.exists(), "the live socket must stay");
    drop(live);

    // Now nobody listens: a leftover of a crashed run.
    let mut vm = Vm::start(&["--api-sock", sock.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while api_call_status(&sock) != Some(200) {
        assert!(Instant::now() < deadline, "{}", vm.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(vm.stderr().contains("stale"), "{}", vm.stderr());
    vm.signal(libc::SIGTERM);
    assert!(vm.wait_exit(Duration::from_secs(10)).success());
    assert!(!sock.exists(), "the API socket must be removed at exit");
}

fn api_call_status(sock: &Path) -> Option<u16> {
    std::os::unix::net::UnixStream::connect(sock).ok()?;
    Some(api_call(sock, "GET", "/", None).0)
}

/// `SendCtrlAltDel` presses the ACPI power button: the test guest's init (`test=wait`) answers
/// it with a power-off, and chapeau exits 0. The VM here boots from flags at start, with the API
/// served beside it.
#[test]
fn send_ctrl_alt_del_powers_the_guest_off() {
    let dir = test_dir("api-ctrl-alt-del");
    let sock = dir.join("api.sock");
    let kernel = guest_file("vmlinux");
    let initrd = initramfs();
    let mut vm = Vm::start(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        &format!("{} test=wait", tests::BASE_CMDLINE),
        "--memory",
        "128",
    ]);
    wait_for_file(&sock, Duration::from_secs(10));
    assert_eq!(state(&sock), "Running");
    vm.wait_for("GUEST_ACTION=wait", boot_timeout());
    assert!(
        !vm.stdout().contains("GUEST_POWER_BUTTON=none"),
        "the guest found no power button:\n{}",
        vm.stdout()
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    vm.wait_for("GUEST_POWER_BUTTON=pressed", boot_timeout());
    let status = vm.wait_exit(boot_timeout());
    assert!(status.success(), "power-off must exit 0: {status:?}");
    assert!(
        vm.stderr().is_empty() || !vm.stderr().contains("ERROR"),
        "{}",
        vm.stderr()
    );
    assert!(!sock.exists(), "the API socket must be removed at exit");
}
