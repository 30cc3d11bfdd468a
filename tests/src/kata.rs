//! Kata's QEMU command line (`../shared/reference/kata-qemu-cmdline.split.txt`, one option per
//! line) with its paths and descriptors replaced by a test's own, shared by the `qemu` test and
//! `bench kata`, which runs the same line under chapeau and under QEMU.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use devices::virtio::net::Tap;

use crate::netns::Netns;
use crate::workspace_root;

/// The guest's address on the namespace's tap0 (host side 10.0.0.1/24).
pub const GUEST_IP: &str = "10.0.0.2";
/// The descriptor the tap reaches the VMM on, as Kata passes them (from fd 3).
pub const TAP_FD: i32 = 3;

/// Where the command line's host files are.
pub struct KataPaths<'a> {
    /// Replaces Kata's per-sandbox directories: sockets and the pidfile go here, the shared
    /// directory is `sandbox/shared`.
    pub sandbox: &'a Path,
    pub kernel: &'a Path,
    /// A Kata-format rootfs image (the NVDIMM).
    pub image: &'a Path,
}

/// Kata's command line with `paths`: the tap on fd 3 with the userspace datapath (no
/// /dev/vhost-net on the test hosts). The kernel command line is Kata's without what names its
/// systemd init (ours is the image's /sbin/init) and with a single console; `test=kata` makes
/// our init bring up the network, write over 9p and echo on the agent port.
pub fn reference_args(paths: &KataPaths) -> std::io::Result<Vec<String>> {
    let path = workspace_root().join("../shared/reference/kata-qemu-cmdline.split.txt");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("{}: {e} (../shared beside the repo)", path.display()),
        )
    })?;
    let image_size = std::fs::metadata(paths.image)?.len();
    // The first line is the binary; then one option per line, its value after the first space.
    let mut args: Vec<String> = text
        .lines()
        .skip(1)
        .flat_map(|line| match line.split_once(' ') {
            Some((option, value)) => vec![option.to_string(), value.to_string()],
            None => vec![line.to_string()],
        })
        .collect();
    let mut previous = String::new();
    for arg in &mut args {
        let replaced = match previous.as_str() {
            "-kernel" => Some(paths.kernel.display().to_string()),
            "-append" => Some(
                arg.split(' ')
                    .filter(|p| {
                        !p.starts_with("init=")
                            && !p.starts_with("systemd.")
                            && *p != "console=hvc1"
                    })
                    .chain(["test=kata", &format!("guest_ip={GUEST_IP}")])
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            "-netdev" => Some(format!("tap,id=network-0,vhost=off,fds={TAP_FD}")),
            "-object" if arg.starts_with("memory-backend-file") => Some(format!(
                "memory-backend-file,id=mem0,mem-path={},size={image_size}",
                paths.image.display()
            )),
            _ => None,
        };
        if let Some(new) = replaced {
            *arg = new;
        }
        previous = arg.clone();
    }
    let sandbox = paths.sandbox.display().to_string();
    Ok(args
        .iter()
        .map(|arg| {
            let arg = replace_sandbox_path(arg, "/run/vc/vm/", &sandbox);
            replace_sandbox_path(
                &arg,
                "/run/kata-containers/shared/sandboxes/",
                &format!("{sandbox}/shared"),
            )
        })
        .collect())
}

/// `prefix<64 hex digits>` → `dir`.
fn replace_sandbox_path(arg: &str, prefix: &str, dir: &str) -> String {
    match arg.find(prefix) {
        Some(start) if arg.len() >= start + prefix.len() + 64 => {
            let id_end = start + prefix.len() + 64;
            format!("{}{dir}{}", &arg[..start], &arg[id_end..])
        }
        _ => arg.to_string(),
    }
}

/// Has the child inherit `fd` as `target`, as Kata passes taps and sockets to QEMU.
pub fn pass_fd(command: &mut Command, fd: i32, target: i32) {
    // SAFETY: between fork and exec only dup2 and fcntl, which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself would keep FD_CLOEXEC: clear it instead.
            let rc = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Opens tap0 of `ns` as Kata hands taps to QEMU: an open descriptor.
pub fn open_tap(ns: &Netns) -> OwnedFd {
    ns.enter(|| {
        let tap = Tap::open_named("tap0", 1).expect("open tap0").remove(0);
        OwnedFd::from(tap.file().try_clone().expect("dup the tap"))
    })
}
