//! chapeau-jailer as root on this host, jailing `chapeau --api-sock /api.sock` (no VM) as
//! uid/gid 12345, and checking each wall from the host through /proc.

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tests::netns::Netns;

const JAILER: &str = env!("CARGO_BIN_EXE_chapeau-jailer");
const ID: u32 = 12345;

/// A static chapeau (the jail has no shared libraries): $CHAPEAU_STATIC_BIN, or built here
/// for the gnu target with crt-static.
fn static_chapeau() -> PathBuf {
    if let Some(path) = std::env::var_os("CHAPEAU_STATIC_BIN") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = "x86_64-unknown-linux-gnu";
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "vmm", "--bin", "chapeau", "--target", target])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building a static chapeau failed");
    workspace.join("target").join(target).join("debug/chapeau")
}

/// A fresh base directory owned by root, mode 0755, removed on drop.
struct Base(PathBuf);

impl Base {
    fn new() -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "chapeau-jailer-test-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Base(dir)
    }

    fn jail_dir(&self, id: &str) -> PathBuf {
        self.0.join("chapeau").join(id)
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn jailer(base: &Base, id: &str, extra: &[&str], chapeau_args: &[&str]) -> Command {
    let mut cmd = Command::new(JAILER);
    cmd.args(["--id", id, "--exec-file"])
        .arg(static_chapeau())
        .args(["--uid", "12345", "--gid", "12345", "--chroot-base-dir"])
        .arg(&base.0)
        .args(extra)
        .arg("--")
        .args(chapeau_args);
    cmd
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        sleep(Duration::from_millis(50));
    }
}

fn unified_cgroup(id: &str) -> PathBuf {
    PathBuf::from("/sys/fs/cgroup/unified/chapeau").join(id)
}

fn v1_cgroup(controller: &str, id: &str) -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
        .join(controller)
        .join("chapeau")
        .join(id)
}

/// The host pid of the jailed chapeau, from its cgroup.
fn jailed_pid(cgroup: &Path) -> u32 {
    let procs = cgroup.join("cgroup.procs");
    let mut pid = None;
    wait_until("chapeau in its cgroup", || {
        pid = fs::read_to_string(&procs)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.parse().ok()));
        pid.is_some()
    });
    pid.unwrap()
}

fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in status"))
        .trim()
        .to_owned()
}

fn api_get(socket: &Path) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(socket)
        .arg("http://localhost/")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running jailer, stopped with SIGTERM (which it forwards to chapeau) when dropped, so a
/// failed assertion does not leave a jail behind.
struct Running(Child);

impl Running {
    fn terminate(&mut self) -> i32 {
        // SAFETY: kill(2) on the jailer this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

fn stop(mut jailer: Running, pid: u32) -> i32 {
    let code = jailer.terminate();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    code
}

fn assert_nothing_left(base: &Base, id: &str) {
    assert!(!base.jail_dir(id).exists(), "jail directory left");
    for dir in [
        unified_cgroup(id),
        v1_cgroup("memory", id),
        v1_cgroup("pids", id),
        v1_cgroup("cpu", id),
    ] {
        assert!(!dir.exists(), "{} left", dir.display());
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(base.0.to_str().unwrap()), "a mount left");
}

/// What every jailed chapeau shows from the host: uid/gid 12345 and no groups, no capability
/// in any set, `NoNewPrivs`, pid 1 of its own PID namespace, its own mount namespace, the jail
/// as its root directory; on every thread too. Returns each thread's name and `Seccomp:` mode.
fn assert_confined(pid: u32, root: &Path) -> Vec<(String, String)> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = fs::read_to_string(proc_dir.join("status")).unwrap();
    assert_eq!(status_field(&status, "Uid"), "12345\t12345\t12345\t12345");
    assert_eq!(status_field(&status, "Gid"), "12345\t12345\t12345\t12345");
    assert_eq!(status_field(&status, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&status, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    // chapeau is pid 1 of its own PID namespace.
    assert_eq!(status_field(&status, "NSpid"), format!("{pid}\t1"));
    for ns in ["mnt", "pid"] {
        assert_ne!(
            fs::read_link(proc_dir.join("ns").join(ns)).unwrap(),
            fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns} namespace"
        );
    }
    let mut seccomp = Vec::new();
    for task in fs::read_dir(proc_dir.join("task")).unwrap() {
        let task = task.unwrap().path();
        let comm = fs::read_to_string(task.join("comm")).unwrap();
        let status = fs::read_to_string(task.join("status")).unwrap();
        assert_eq!(status_field(&status, "NoNewPrivs"), "1");
        assert_eq!(status_field(&status, "CapEff"), "0000000000000000");
        assert_eq!(
            status_field(&status, "Uid").split_whitespace().next(),
            Some("12345")
        );
        seccomp.push((comm.trim().to_owned(), status_field(&status, "Seccomp")));
    }
    eprintln!("seccomp per thread: {seccomp:?}");
    // Its root is the jail's root directory (same inode; the path cannot be shown from here
    // since the jail's mounts live in its own namespace).
    let (jail_root, host_view) = (
        fs::metadata(proc_dir.join("root")).unwrap(),
        fs::metadata(root).unwrap(),
    );
    assert_eq!(
        (jail_root.dev(), jail_root.ino()),
        (host_view.dev(), host_view.ino())
    );
    seccomp
}

/// The process is in the VM's v1 cgroup of each controller named, whose files hold the limits.
fn assert_in_cgroups(pid: u32, id: &str, limits: &[(&str, &str, &str)]) {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for (controller, file, value) in limits {
        assert!(
            cgroups
                .lines()
                .any(|l| l.contains(controller) && l.ends_with(&format!("/chapeau/{id}"))),
            "{cgroups}"
        );
        let path = v1_cgroup(controller, id).join(file);
        assert_eq!(
            fs::read_to_string(&path).unwrap().trim(),
            *value,
            "{}",
            path.display()
        );
    }
}

/// The process's open descriptors: number and what they point to.
fn open_fds(pid: u32) -> Vec<(String, PathBuf)> {
    let fds: Vec<(String, PathBuf)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                fs::read_link(e.path()).unwrap(),
            )
        })
        .collect();
    eprintln!("open fds: {fds:?}");
    fds
}

#[test]
fn jailed_chapeau_is_confined() {
    let base = Base::new();
    let id = "confined";
    let marker = base.0.join("host-secret");
    fs::write(&marker, "secret").unwrap();
    let shared = base.0.join("shared");
    fs::create_dir(&shared).unwrap();
    fs::write(shared.join("kernel"), "k").unwrap();
    let inherited = fs::File::open(&marker).unwrap();
    let inherited_fd = inherited.as_raw_fd();
    let bind = format!("{}:/boot", shared.display());
    let mut cmd = jailer(
        &base,
        id,
        &[
            "--cgroup-version",
            "1",
            "--cgroup",
            "memory.limit_in_bytes=268435456",
            "--cgroup",
            "pids.max=64",
            "--resource-limit",
            "fsize=1048576,no-file=128",
            "--bind",
            &bind,
            "--keep-fd",
            "8",
        ],
        &["--api-sock", "/api.sock"],
    );
    // Two inherited descriptors without close-on-exec: 7 must be closed, 8 kept.
    // SAFETY: dup2 is async-signal-safe; both targets are fixed numbers we own in the child.
    unsafe {
        cmd.pre_exec(move || {
            for fd in [7, 8] {
                if libc::dup2(inherited_fd, fd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = Running(cmd.spawn().unwrap());
    let pid = jailed_pid(&v1_cgroup("pids", id));
    let root = base.jail_dir(id).join("root");
    let socket = root.join("api.sock");
    wait_until("the API socket", || socket.exists());
    assert_eq!(api_get(&socket), "200");

    let seccomp = assert_confined(pid, &root);
    // No VM yet: the vmm thread is filtered from InstanceStart on, the api thread already.
    assert!(
        seccomp
            .iter()
            .any(|(comm, mode)| comm == "api" && mode == "2"),
        "{seccomp:?}"
    );
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    eprintln!(
        "readlink /proc/{pid}/root: {:?}",
        fs::read_link(proc_dir.join("root"))
    );
    let jail_view = proc_dir.join("root");
    assert!(jail_view.join("chapeau").exists());
    assert!(fs::File::open(jail_view.join("etc/passwd")).is_err());
    assert!(fs::File::open(jail_view.join("../../../../etc/passwd")).is_err());
    assert!(fs::File::open(jail_view.join(marker.strip_prefix("/").unwrap())).is_err());
    assert_eq!(
        fs::read_to_string(jail_view.join("boot/kernel")).unwrap(),
        "k"
    );
    let devices: Vec<_> = fs::read_dir(jail_view.join("dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(devices
        .iter()
        .all(|d| ["kvm", "net", "vhost-net", "urandom"].contains(&d.as_str())));

    // Inherited descriptors: 7 closed, 8 kept; nothing else from the host.
    let fds = open_fds(pid);
    let on_marker: Vec<_> = fds.iter().filter(|(_, t)| t == &marker).collect();
    assert_eq!(on_marker.len(), 1, "{fds:?}");
    assert_eq!(on_marker[0].0, "8");

    assert_in_cgroups(
        pid,
        id,
        &[
            ("memory", "memory.limit_in_bytes", "268435456"),
            ("pids", "pids.max", "64"),
        ],
    );
    let limits = fs::read_to_string(proc_dir.join("limits")).unwrap();
    assert!(limits
        .lines()
        .any(|l| l.starts_with("Max file size") && l.contains("1048576")));
    assert!(limits
        .lines()
        .any(|l| l.starts_with("Max open files") && l.contains("128")));

    // SIGTERM to the jailer reaches chapeau (the namespace's init), which ends cleanly.
    assert_eq!(stop(child, pid), 0);
    drop(inherited);
    assert_nothing_left(&base, id);
}

/// The path `--netns` takes for a namespace the harness made.
fn netns_path(ns: &Netns) -> PathBuf {
    PathBuf::from("/var/run/netns").join(ns.name())
}

#[test]
fn daemonized_jail_and_cleanup() {
    let base = Base::new();
    let id = "daemon";
    let netns = Netns::new("jailer", &[]);
    let netns_path = netns_path(&netns);
    let out = jailer(
        &base,
        id,
        &["--daemonize", "--netns", netns_path.to_str().unwrap()],
        &["--api-sock", "/api.sock"],
    )
    .stdout(Stdio::piped())
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(jailed_pid(&unified_cgroup(id)), pid);
    let (joined, wanted) = (
        fs::metadata(format!("/proc/{pid}/ns/net")).unwrap(),
        fs::metadata(&netns_path).unwrap(),
    );
    assert_eq!((joined.dev(), joined.ino()), (wanted.dev(), wanted.ino()));
    let socket = base.jail_dir(id).join("root/api.sock");
    wait_until("the API socket", || socket.exists());
    assert_eq!(api_get(&socket), "200");

    let cleanup = |base: &Base| {
        Command::new(JAILER)
            .args(["--cleanup", "--id", id, "--chroot-base-dir"])
            .arg(&base.0)
            .output()
            .unwrap()
    };
    let refused = cleanup(&base);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("still runs"));

    // SAFETY: kill(2) on the daemonized chapeau this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_until("chapeau to end", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    let done = cleanup(&base);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_nothing_left(&base, id);
}

#[test]
fn twenty_jails_leave_nothing_behind() {
    let base = Base::new();
    for n in 0..20 {
        let id = format!("many-{n}");
        let child = Running(
            jailer(
                &base,
                &id,
                &["--cgroup-version", "1", "--cgroup", "pids.max=32"],
                &["--api-sock", "/api.sock"],
            )
            .spawn()
            .unwrap(),
        );
        let pid = jailed_pid(&v1_cgroup("pids", &id));
        let socket = base.jail_dir(&id).join("root/api.sock");
        wait_until("the API socket", || socket.exists());
        assert_eq!(stop(child, pid), 0);
        assert_nothing_left(&base, &id);
    }
    let left: Vec<_> = fs::read_dir(base.0.join("chapeau")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

fn refused(base: &Base, id: &str, extra: &[&str]) -> Output {
    jailer(base, id, extra, &["--api-sock", "/api.sock"])
        .output()
        .unwrap()
}

fn assert_error(out: &Output, code: i32, parts: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    for part in parts {
        assert!(stderr.contains(part), "{part:?} not in {stderr:?}");
    }
}

#[test]
fn validation_errors_name_the_step_and_path() {
    let base = Base::new();
    assert_error(&refused(&base, "bad/id", &[]), 1, &["validate", "bad/id"]);
    assert_error(&refused(&base, &"x".repeat(65), &[]), 1, &["validate"]);
    assert_error(
        &refused(&base, "ok", &["--keep-fd", "99"]),
        1,
        &["fd 99", "not open"],
    );
    assert_error(
        &refused(&base, "ok", &["--cgroup", "memory.max"]),
        2,
        &["FILE=VALUE"],
    );
    assert_error(
        &refused(&base, "ok", &["--bind", "/nonexistent-src"]),
        1,
        &["bind source", "/nonexistent-src"],
    );

    let with = |exec: &Path, uid: &str, base_dir: &Path| {
        Command::new(JAILER)
            .args(["--id", "ok", "--exec-file"])
            .arg(exec)
            .args(["--uid", uid, "--gid", "12345", "--chroot-base-dir"])
            .arg(base_dir)
            .output()
            .unwrap()
    };
    let chapeau = static_chapeau();
    assert_error(
        &with(&chapeau, "0", &base.0),
        1,
        &["validate", "unprivileged"],
    );
    let missing = base.0.join("missing");
    assert_error(
        &with(&missing, "1", &base.0),
        1,
        &["check the binary", missing.to_str().unwrap()],
    );
    let not_exec = base.0.join("not-exec");
    fs::write(&not_exec, "x").unwrap();
    assert_error(
        &with(&not_exec, "1", &base.0),
        1,
        &["check the binary", "not an executable"],
    );
    let dynamic = Path::new("/bin/true");
    assert_error(
        &with(dynamic, "1", &base.0),
        1,
        &["check the binary", "dynamically linked"],
    );

    let open_base = Base::new();
    fs::set_permissions(&open_base.0, fs::Permissions::from_mode(0o777)).unwrap();
    assert_error(
        &with(&chapeau, "1", &open_base.0),
        1,
        &["base directory", "world-writable"],
    );
    let user_base = Base::new();
    chown(&user_base.0, Some(ID), Some(ID)).unwrap();
    assert_error(
        &with(&chapeau, "1", &user_base.0),
        1,
        &["base directory", "owned by uid 12345"],
    );

    // An id in use is refused, and the first jail's directory is untouched.
    fs::create_dir_all(base.jail_dir("taken")).unwrap();
    assert_error(&refused(&base, "taken", &[]), 1, &["a jail with this id"]);
    assert!(base.jail_dir("taken").exists());
}

#[test]
fn missing_v2_controller_is_a_clear_error() {
    let available = fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .or_else(|_| fs::read_to_string("/sys/fs/cgroup/cgroup.controllers"))
        .unwrap_or_default();
    if available.split_whitespace().any(|c| c == "memory") {
        eprintln!("skipped: this host has the memory controller in cgroup v2");
        return;
    }
    let base = Base::new();
    let out = refused(&base, "nomem", &["--cgroup", "memory.max=1G"]);
    assert_error(
        &out,
        1,
        &[
            "enable the cgroup controller",
            "memory controller is not available",
        ],
    );
    assert_nothing_left(&base, "nomem");
}

/// If a failed assertion leaves the jailed chapeau (host pid) running, kills it and waits for
/// its jailer (pid) to clean up, before the harness would kill the jailer.
struct KillOnDrop {
    chapeau: u32,
    jailer: u32,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if Path::new(&format!("/proc/{}", self.chapeau)).exists() {
            // SAFETY: kill(2) on the jailed chapeau this test started, then waitpid on the
            // jailer, our child, with no status wanted.
            unsafe {
                libc::kill(self.chapeau as i32, libc::SIGKILL);
                libc::waitpid(self.jailer as i32, std::ptr::null_mut(), 0);
            }
        }
    }
}

const GUEST_IP: &str = "10.0.0.2";

/// The guest's whole `PREFIX...` line: the first bytes of a line may arrive before its end.
fn guest_line(vm: &mut tests::Vm, prefix: &str) -> String {
    vm.wait_for(prefix, tests::boot_timeout());
    let start = Instant::now();
    loop {
        let stdout = vm.stdout();
        let line = stdout
            .lines()
            .find(|l| l.contains(prefix))
            .unwrap_or_default();
        if line.len() > prefix.len() || start.elapsed() > Duration::from_secs(10) {
            return line.trim().to_owned();
        }
        sleep(Duration::from_millis(100));
    }
}

/// The test guest as Kata runs it, under the jailer as uid 12345: serial and virtio console,
/// rng, the rootfs image as an NVDIMM, the shared directory over 9p (bound rw), a tap in a
/// network namespace the jail joins, the agent port and the API, every file by its jail path.
/// From the host: the guest's 9p write lands in the shared directory (owned by the jailed
/// uid), it answers ping and TCP over the tap, the agent port echoes; the process is confined
/// (see `assert_confined`) with every thread filtered, in its cgroups with their limits, its
/// descriptors only the VM's. `Shutdown` over the API ends it with 0 and nothing is left.
#[test]
fn a_kata_guest_boots_jailed_with_9p_and_net() {
    let base = Base::new();
    let id = "kata";
    let kernel = tests::guest_file("vmlinux");
    let initrd = tests::initramfs();
    let image = tests::guest_file("kata-rootfs.img");
    let shared = base.0.join("shared");
    fs::create_dir(&shared).unwrap();
    chown(&shared, Some(ID), Some(ID)).unwrap();
    // A tap the jailed uid may attach to (TUNSETIFF on a persistent tap needs its owner).
    let ns = Netns::new("jail-kata", &[]);
    let uid = ID.to_string();
    ns.ip(&[
        "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr", "user", &uid, "group", &uid,
    ]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "tap0"]);
    ns.ip(&["link", "set", "tap0", "up"]);
    let netns = netns_path(&ns);
    let binds = [
        format!("{}:/vmlinux", kernel.display()),
        format!("{}:/initramfs.cpio", initrd.display()),
        format!("{}:/rootfs.img", image.display()),
        format!("{}:/shared,rw", shared.display()),
    ];
    let mut extra = vec![
        "--cgroup-version",
        "1",
        "--cgroup",
        "memory.limit_in_bytes=1073741824",
        "--cgroup",
        "pids.max=64",
        "--netns",
        netns.to_str().unwrap(),
    ];
    for bind in &binds {
        extra.extend(["--bind", bind.as_str()]);
    }
    let cmdline = format!("console=ttyS0 reboot=k panic=1 test=kata guest_ip={GUEST_IP}");
    let mut vm = tests::Vm::start_command(&mut jailer(
        &base,
        id,
        &extra,
        &[
            "--api-sock",
            "/api.sock",
            "--kernel",
            "/vmlinux",
            "--initrd",
            "/initramfs.cpio",
            "--cmdline",
            &cmdline,
            "--memory",
            "256",
            "--console",
            "socket=/console.sock",
            "--rng",
            "--pmem",
            "file=/rootfs.img",
            "--fs",
            "tag=kataShared,path=/shared",
            "--net",
            "tap=tap0,mac=52:54:00:12:34:56,vhost=off",
            "--port",
            "name=agent.channel.0,socket=/agent.sock",
        ],
    ));
    let pid = jailed_pid(&v1_cgroup("pids", id));
    let _kill = KillOnDrop {
        chapeau: pid,
        jailer: vm.pid(),
    };
    let root = base.jail_dir(id).join("root");

    vm.wait_for("GUEST_ACTION=kata", tests::boot_timeout());
    assert_eq!(
        guest_line(&mut vm, "GUEST_NET_UP="),
        format!("GUEST_NET_UP={GUEST_IP}/24")
    );
    assert_eq!(guest_line(&mut vm, "GUEST_9P="), "GUEST_9P=ok");
    let wrote = shared.join("guest-wrote.txt");
    assert_eq!(fs::read_to_string(&wrote).unwrap(), "hello-from-guest\n");
    assert_eq!(
        fs::metadata(&wrote).unwrap().uid(),
        ID,
        "9p files are the jailed uid's"
    );
    let ping = ns.output(&["busybox", "ping", "-c", "3", "-W", "10", GUEST_IP]);
    assert!(ping.contains(" 0% packet loss"), "{ping}");
    let echoed = ns.enter(|| {
        use std::io::Read;
        let addr = format!("{GUEST_IP}:5000").parse().unwrap();
        let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(30))?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
        tcp.write_all(b"tcp-through-the-jail\n")?;
        let mut got = [0u8; 21];
        tcp.read_exact(&mut got)?;
        Ok::<_, std::io::Error>(got)
    });
    assert_eq!(&echoed.unwrap(), b"tcp-through-the-jail\n");
    let mut port = tests::connect(&root.join("agent.sock"), Duration::from_secs(30));
    port.write_all(b"jailed-echo\n").unwrap();
    assert_eq!(
        tests::read_exactly(&mut port, 12, tests::boot_timeout()),
        b"jailed-echo\n"
    );

    let seccomp = assert_confined(pid, &root);
    for (comm, mode) in &seccomp {
        if !comm.starts_with("kvm-") {
            assert_eq!(mode, "2", "thread {comm}: {seccomp:?}");
        }
    }
    for thread in ["vmm", "api", "vcpu0", "net0-q0", "9p-1"] {
        assert!(
            seccomp.iter().any(|(c, _)| c == thread),
            "no {thread}: {seccomp:?}"
        );
    }
    let (joined, wanted) = (
        fs::metadata(format!("/proc/{pid}/ns/net")).unwrap(),
        fs::metadata(&netns).unwrap(),
    );
    assert_eq!((joined.dev(), joined.ino()), (wanted.dev(), wanted.ino()));
    assert_in_cgroups(
        pid,
        id,
        &[
            ("memory", "memory.limit_in_bytes", "1073741824"),
            ("pids", "pids.max", "64"),
        ],
    );
    // Descriptors: KVM's, eventfds, epolls, sockets, stdio, the tap, the image, the rng
    // source, the export and the jail's /proc/self/fd (9p), the jail root (O_PATH, to remove
    // the sockets at the end); nothing of the host but what was bound in (shown by jail path).
    let jail_paths = ["/rootfs.img", "/shared", "/dev/", "/proc/1/fd"];
    for (fd, target) in open_fds(pid) {
        let target = target.to_string_lossy();
        let ok = ["anon_inode:", "socket:", "pipe:"]
            .iter()
            .any(|p| target.starts_with(p))
            || target == "/"
            || jail_paths.iter().any(|p| target.starts_with(p));
        assert!(ok, "fd {fd} -> {target}");
    }

    let out = Command::new("curl")
        .args(["-s", "-w", "%{http_code}", "-X", "PUT", "--unix-socket"])
        .arg(root.join("api.sock"))
        .args([
            "-d",
            r#"{"action_type": "Shutdown"}"#,
            "http://localhost/actions",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "204");
    let status = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
    // Jailed, chapeau runs as uid 12345: it has nothing to warn about.
    assert!(
        !vm.stderr().contains("without chapeau-jailer"),
        "{}",
        vm.stderr()
    );
    assert_nothing_left(&base, id);
    assert!(
        wrote.exists(),
        "the shared directory is the host's, and stays"
    );
}

/// A memory cgroup limit far below what the guest needs (12 MiB for a 256 MiB guest whose
/// kernel alone takes more once loaded; 32 MiB was measured to be enough for the test guest to
/// boot and power off): the kernel's OOM killer ends chapeau, and the jailer says
/// in one line that the VM hit its cgroup memory limit, and which; nothing is left behind.
#[test]
fn a_memory_limit_below_the_guest_needs_ends_it_with_a_clear_message() {
    let base = Base::new();
    let id = "small";
    let kernel = tests::guest_file("vmlinux");
    let initrd = tests::initramfs();
    let binds = [
        format!("{}:/vmlinux", kernel.display()),
        format!("{}:/initramfs.cpio", initrd.display()),
    ];
    let limit = 12u64 << 20;
    let setting = format!("memory.limit_in_bytes={limit}");
    let mut extra = vec!["--cgroup-version", "1", "--cgroup", &setting];
    for bind in &binds {
        extra.extend(["--bind", bind.as_str()]);
    }
    let mut vm = tests::Vm::start_command(&mut jailer(
        &base,
        id,
        &extra,
        &[
            "--kernel",
            "/vmlinux",
            "--initrd",
            "/initramfs.cpio",
            "--memory",
            "256",
            "--serial",
            "off",
        ],
    ));
    let status = vm.wait_exit(tests::boot_timeout());
    let stderr = vm.stderr();
    eprintln!("{stderr}");
    assert_ne!(status.code(), Some(0), "{stderr}");
    let lines: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("chapeau-jailer: the VM hit its cgroup memory limit"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&format!("limit of {limit} bytes (12 MiB, /sys/fs/cgroup/memory/chapeau/{id}/memory.limit_in_bytes)")),
        "{stderr}"
    );
    assert_nothing_left(&base, id);
}
