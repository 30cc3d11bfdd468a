//! Network namespaces the tests create (their taps and traffic never leave them; `ip netns
//! del` on drop removes everything, pass or fail).

use std::os::fd::AsRawFd;
use std::process::Command;

/// A network namespace with taps `tap0..tapN` (host side 10.0.N.1/24), deleted on drop.
pub struct Netns(String);

fn run(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("run a command");
    assert!(status.success(), "{args:?} failed");
}

impl Netns {
    pub fn name(&self) -> &str {
        &self.0
    }

    /// `taps` gives each tap's queue count.
    pub fn new(tag: &str, taps: &[u16]) -> Netns {
        let name = format!("chapeau-{tag}-{}", std::process::id());
        // A namespace left by an earlier run of this pid: usually there is none (quietly).
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        for (i, queues) in taps.iter().enumerate() {
            let tap = format!("tap{i}");
            let mut add = vec!["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"];
            if *queues > 1 {
                add.push("multi_queue");
            }
            ns.ip(&add);
            ns.ip(&["addr", "add", &format!("10.0.{i}.1/24"), "dev", &tap]);
            ns.ip(&["link", "set", &tap, "up"]);
        }
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.0, "ip"];
        all.extend_from_slice(args);
        run(&all);
    }

    pub fn output(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("run in the namespace");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Runs `body` on a thread inside the namespace (for sockets there).
    pub fn enter<T: Send + 'static>(&self, body: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on this thread only, with a namespace descriptor we hold.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            body()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
