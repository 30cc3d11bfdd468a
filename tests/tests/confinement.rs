//! chapeau's own walls on the real process: `--seccomp off|log|enforce` as a user sees them, a
//! thread breaking its seccomp policy ending the VMM with a message naming it, and Landlock
//! keeping the running VMM from opening a host file. The breaking is done by the test hooks
//! of a chapeau built with the vmm's `forbidden-syscall-test` feature
//! ([`tests::chapeau_with_test_hooks`]); the binary under test (and any release build) has none.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::{
    api_call, chapeau_bin, chapeau_with_test_hooks, guest_file, initramfs, scratch_dir,
    thread_seccomp_modes, Vm,
};

/// getppid(2), the syscall the test hook makes: no thread's policy allows it.
const GETPPID: u32 = 110;
const FORBIDDEN_ENV: &str = "CHAPEAU_TEST_FORBIDDEN_SYSCALL";
const SECCOMP_STATUS: i32 = 159;

fn test_dir(name: &str) -> PathBuf {
    let dir = scratch_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn hooked(args: &[&str], envs: &[(&str, &Path)]) -> Vm {
    let mut command = Command::new(chapeau_with_test_hooks());
    command.args(args);
    for (key, value) in envs {
        command.env(key, value);
    }
    Vm::start_command(&mut command)
}

/// The api thread's seccomp mode, once the API answers.
fn api_thread_mode(vm: &Vm, sock: &Path) -> String {
    tests::connect(sock, Duration::from_secs(30));
    let (status, body) = api_call(sock, "GET", "/", None);
    assert_eq!(status, 200, "{body}");
    thread_seccomp_modes(vm.pid())
        .into_iter()
        .find(|(comm, _)| comm == "api")
        .expect("an api thread")
        .1
}

fn stop(mut vm: Vm) -> String {
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", vm.stderr());
    vm.stderr()
}

/// Waits for `vm` to end with status 159 after the line naming `thread` and getppid; its
/// stderr.
fn ended_by_seccomp(mut vm: Vm, thread: &str) -> String {
    let status = vm.wait_exit(Duration::from_secs(120));
    let stderr = vm.stderr();
    assert_eq!(status.code(), Some(SECCOMP_STATUS), "{stderr}");
    let line = format!("chapeau: seccomp: thread {thread} made forbidden syscall {GETPPID}");
    assert!(stderr.contains(&line), "{stderr}");
    stderr
}

/// No VM, only the API: the api thread makes a forbidden syscall as soon as it is filtered.
/// `enforce` (the default) ends chapeau with status 159 and one line naming the thread and
/// the syscall; `log` and `off` let it live (filtered, resp. not at all, as /proc shows) and
/// say once at start that they are for debugging. The binary under test has no such hook.
#[test]
fn seccomp_modes_and_a_forbidden_syscall_in_the_api_thread() {
    let dir = test_dir("seccomp-modes");
    let sock = dir.join("api.sock");
    let api = sock.to_str().unwrap();

    let vm = hooked(&["--api-sock", api], &[(FORBIDDEN_ENV, Path::new("api"))]);
    let stderr = ended_by_seccomp(vm, "api");
    assert!(!stderr.contains("--seccomp"), "{stderr}");
    let _ = std::fs::remove_file(&sock);

    for (mode, field) in [("log", "2"), ("off", "0")] {
        let mut vm = hooked(
            &["--api-sock", api, "--seccomp", mode],
            &[(FORBIDDEN_ENV, Path::new("api"))],
        );
        vm.wait_for_stderr("made getppid", Duration::from_secs(60));
        assert_eq!(api_thread_mode(&vm, &sock), field, "--seccomp {mode}");
        let stderr = stop(vm);
        let warnings: Vec<_> = stderr
            .lines()
            .filter(|l| l.contains(&format!("--seccomp {mode}")))
            .collect();
        assert_eq!(warnings.len(), 1, "{stderr}");
        assert!(warnings[0].contains("For debugging only"), "{stderr}");
        assert!(!sock.exists(), "the API socket is removed at the end");
    }

    // The binary under test ignores the hook's variable: the code is not in it.
    let binary = std::fs::read(chapeau_bin()).unwrap();
    assert!(!binary
        .windows(FORBIDDEN_ENV.len())
        .any(|w| w == FORBIDDEN_ENV.as_bytes()));
    let plain = Vm::start_command(
        Command::new(chapeau_bin())
            .args(["--api-sock", api])
            .env(FORBIDDEN_ENV, "api"),
    );
    // Served, so past the point where the hook would have run.
    assert_eq!(api_thread_mode(&plain, &sock), "2");
    let stderr = stop(plain);
    assert!(!stderr.contains("seccomp"), "{stderr}");
}

fn vm_args<'a>(kernel: &'a str, initrd: &'a str) -> Vec<&'a str> {
    vec![
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 test=hang",
        "--memory",
        "128",
        "--serial",
        "off",
    ]
}

/// A VM: the vCPU and then the vmm thread break their policies right after they are filtered
/// (before the guest runs much): each time the VMM ends with 159 and the line names the
/// thread and the syscall.
#[test]
fn a_forbidden_syscall_in_a_vcpu_or_the_vmm_thread_ends_the_vm() {
    let kernel = guest_file("vmlinux");
    let initrd = initramfs();
    let (kernel, initrd) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    for (category, thread) in [("vcpu", "vcpu0"), ("vmm", "vmm")] {
        let vm = hooked(
            &vm_args(kernel, initrd),
            &[(FORBIDDEN_ENV, Path::new(category))],
        );
        ended_by_seccomp(vm, thread);
    }
}

/// Once the VM runs, Landlock keeps the VMM from opening a host file it could open before,
/// even with seccomp off (where nothing else would stop it): the test hook's open fails with
/// EACCES. The one thing still allowed, removing the sockets chapeau created, still works:
/// after SIGTERM the API and port sockets are gone.
#[test]
fn the_running_vmm_cannot_open_a_host_file() {
    let dir = test_dir("landlock");
    let secret = dir.join("host-secret");
    std::fs::write(&secret, "secret").unwrap();
    let sockets = dir.join("sockets");
    std::fs::create_dir(&sockets).unwrap();
    let (api, agent) = (sockets.join("api.sock"), sockets.join("agent.sock"));
    let port = format!("name=agent.channel.0,socket={}", agent.display());
    let kernel = guest_file("vmlinux");
    let initrd = initramfs();
    let mut args = vm_args(kernel.to_str().unwrap(), initrd.to_str().unwrap());
    args.extend(["--api-sock", api.to_str().unwrap(), "--port", &port]);
    args.extend(["--seccomp", "off"]);
    let mut vm = hooked(&args, &[("CHAPEAU_TEST_OPEN_AFTER_START", &secret)]);
    let line = vm.wait_for_stderr("test hook:", Duration::from_secs(120));
    assert!(
        line.contains(&format!(
            "cannot open {} after start: Permission denied",
            secret.display()
        )),
        "{line}"
    );
    assert!(api.exists() && agent.exists());
    stop(vm);
    assert!(!api.exists() && !agent.exists(), "sockets left behind");
}
