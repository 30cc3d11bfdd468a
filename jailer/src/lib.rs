//! chapeau-jailer: starts chapeau confined. The order matters and is:
//!
//! 1. validate (as root, on the host): id, uid/gid, binary, base dir, kept fds, bind sources;
//! 2. prepare: the jail directory (binary copy, device nodes, mount points), the cgroups, and
//!    the PVM decision (`/sys/module/kvm_pvm` is not visible from the jail);
//! 3. unshare the PID namespace and fork: the child is pid 1 of the new namespace and execs
//!    chapeau there, so chapeau itself is the namespace's init (see `jail_child`);
//! 4. the child joins the cgroups, unshares the mount namespace, joins the network namespace,
//!    pivot_roots, sets rlimits, closes inherited fds, drops to uid/gid without capabilities
//!    and with no_new_privs, and execs `/chapeau`;
//! 5. the parent waits (forwarding SIGTERM/SIGINT/SIGHUP), then removes the jail directory and
//!    cgroups; with `--daemonize` it returns as soon as the exec happened.

pub mod cgroup;
pub mod chroot;
pub mod cli;
pub mod error;
pub mod privileges;

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{dup2, execve, fork, pipe2, setsid, ForkResult, Pid};

use cgroup::Cgroups;
use chroot::{JailDir, JAIL_BINARY};
use cli::Args;
use error::{io_error, JailError, Result};

/// Where the host says it is PVM (chapeau reads it for `--pvm-params auto`).
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// The signals the waiting jailer passes on to chapeau (which handles TERM and INT through a
/// signalfd, so as the namespace's init it still receives them), plus SIGCHLD to wake it.
const FORWARDED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// The validated request, with uid/gid known to be set.
struct Jail<'a> {
    args: &'a Args,
    uid: u32,
    gid: u32,
    dir: JailDir,
}

/// Runs the jailer; returns the process exit status.
pub fn run(args: &Args) -> Result<i32> {
    if args.cleanup {
        return cleanup(args).map(|()| 0);
    }
    let jail = validate(args)?;
    // Modes are set explicitly where they matter; this only keeps defaults tight.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    chroot::prepare(
        &jail.dir,
        args.exec_file.as_deref().unwrap_or(Path::new("")),
        &args.binds,
        jail.uid,
        jail.gid,
    )?;
    let cgroups = match Cgroups::create(args.cgroup_version, &args.id, &args.cgroups) {
        Ok(cgroups) => cgroups,
        Err(e) => {
            let _ = jail.dir.remove();
            return Err(e);
        }
    };
    let started = start(&jail, &cgroups);
    let status = match started {
        Ok(Some(child)) => wait_for(child),
        Ok(None) => return Ok(0),
        Err(e) => Err(e),
    };
    if let Ok(code) = status {
        if let Some(line) = memory_limit_message(code, cgroups.memory_limit_hit()) {
            eprintln!("chapeau-jailer: {line}");
        }
    }
    let removed_cgroups = cgroups.remove();
    let removed_dir = jail.dir.remove();
    let status = status?;
    removed_cgroups?;
    removed_dir?;
    Ok(status)
}

fn validate(args: &Args) -> Result<Jail<'_>> {
    let step = "validate";
    validate_id(&args.id)?;
    let (uid, gid) = (args.uid.unwrap_or(0), args.gid.unwrap_or(0));
    if uid == 0 || gid == 0 {
        return Err(JailError::refused(
            step,
            format!("uid {uid} gid {gid}"),
            "the jail needs an unprivileged uid and gid (not 0)",
        ));
    }
    let exec_file = args.exec_file.as_deref().unwrap_or(Path::new(""));
    let meta = std::fs::metadata(exec_file).map_err(io_error("check the binary", exec_file))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(JailError::refused(
            "check the binary",
            exec_file,
            "not an executable file",
        ));
    }
    if chroot::needs_interpreter(exec_file).map_err(io_error("check the binary", exec_file))? {
        return Err(JailError::refused(
            "check the binary",
            exec_file,
            "dynamically linked: the jail has no shared libraries (build chapeau with -C target-feature=+crt-static)",
        ));
    }
    chroot::check_root_owned_dir("check the base directory", &args.chroot_base_dir)?;
    for fd in &args.keep_fds {
        if !privileges::is_open(*fd) {
            return Err(JailError::refused(
                "check the kept descriptors",
                format!("fd {fd}"),
                "not open",
            ));
        }
    }
    if let Some(netns) = &args.netns {
        std::fs::metadata(netns).map_err(io_error("check the network namespace", netns))?;
    }
    for bind in &args.binds {
        std::fs::metadata(&bind.host).map_err(io_error("check the bind source", &bind.host))?;
    }
    Ok(Jail {
        args,
        uid,
        gid,
        dir: JailDir::new(&args.chroot_base_dir, &args.id),
    })
}

/// chapeau's argv: the caller's, plus `--pvm-params on|off` decided here when the caller did
/// not say (and no `--config` file, which conflicts with it, carries the setting).
fn chapeau_argv(args: &[OsString]) -> Result<Vec<CString>> {
    let mut argv: Vec<OsString> = vec![JAIL_BINARY.into()];
    argv.extend(args.iter().cloned());
    let given = |flag: &str| {
        args.iter().any(|a| {
            a.as_bytes() == flag.as_bytes()
                || a.as_bytes().starts_with(format!("{flag}=").as_bytes())
        })
    };
    if !given("--pvm-params") && !given("--config") {
        let pvm = if Path::new(PVM_MODULE).exists() {
            "on"
        } else {
            "off"
        };
        argv.extend(["--pvm-params".into(), pvm.into()]);
    }
    argv.into_iter()
        .map(|a| {
            CString::new(a.as_bytes()).map_err(|_| {
                JailError::refused("prepare chapeau's arguments", &a, "contains a NUL byte")
            })
        })
        .collect()
}

/// Forks the jailed child. Returns its pid when the jailer is to wait for it, None once a
/// daemonized child has exec'ed. A failure in the child before exec comes back here through
/// a close-on-exec pipe: end of file without a message means the exec happened.
fn start(jail: &Jail, cgroups: &Cgroups) -> Result<Option<Pid>> {
    let argv = chapeau_argv(&jail.args.chapeau_args)?;
    let netns = match &jail.args.netns {
        Some(path) => Some(File::open(path).map_err(io_error("open the network namespace", path))?),
        None => None,
    };
    let (read_end, write_end) =
        pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io_error("create the error pipe", "pipe"))?;
    let signals = forwarded_set();
    signals
        .thread_block()
        .map_err(io_error("block the forwarded signals", "sigprocmask"))?;
    unshare(CloneFlags::CLONE_NEWPID)
        .map_err(io_error("unshare the PID namespace", "/proc/self/ns/pid"))?;
    // SAFETY: the jailer is single-threaded, so the child may run any code after fork.
    match unsafe { fork() }.map_err(io_error("fork the jailed process", "fork"))? {
        ForkResult::Child => {
            drop(read_end);
            let error = jail_child(jail, cgroups, netns, &write_end, &argv);
            let mut pipe = File::from(write_end);
            let _ = pipe.write_all(error.to_string().as_bytes());
            // SAFETY: _exit ends the child without running the parent's exit handlers twice.
            unsafe { libc::_exit(1) }
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut message = String::new();
            let _ = File::from(read_end).read_to_string(&mut message);
            if !message.is_empty() {
                let _ = waitpid(child, None);
                return Err(JailError::refused(
                    "start the jailed process",
                    &jail.dir.root,
                    message,
                ));
            }
            if jail.args.daemonize {
                println!("{child}");
                return Ok(None);
            }
            Ok(Some(child))
        }
    }
}

fn forwarded_set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in FORWARDED {
        set.add(signal);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// The jailed child, pid 1 of its PID namespace. It execs chapeau directly rather than
/// staying as an init that forks it: chapeau starts no processes (threads only), so there are
/// no orphans to reap, and chapeau handles SIGTERM/SIGINT through a signalfd (blocked signals
/// reach a namespace init). One process fewer to confine; if chapeau dies, the kernel kills
/// the whole namespace. Only returns on error.
fn jail_child(
    jail: &Jail,
    cgroups: &Cgroups,
    netns: Option<File>,
    error_pipe: &OwnedFd,
    argv: &[CString],
) -> JailError {
    let result = (|| -> Result<()> {
        if jail.args.daemonize {
            setsid().map_err(io_error("daemonize", "setsid"))?;
            let null = File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(io_error("daemonize", "/dev/null"))?;
            for fd in 0..3 {
                dup2(null.as_raw_fd(), fd).map_err(io_error("daemonize", "/dev/null"))?;
            }
        }
        cgroups.join()?;
        unshare(CloneFlags::CLONE_NEWNS)
            .map_err(io_error("unshare the mount namespace", "/proc/self/ns/mnt"))?;
        if let (Some(file), Some(path)) = (netns, &jail.args.netns) {
            setns(file, CloneFlags::CLONE_NEWNET)
                .map_err(io_error("join the network namespace", path))?;
        }
        chroot::enter(&jail.dir, &jail.args.binds)?;
        privileges::set_limits(&jail.args.resource_limit)?;
        privileges::close_inherited_fds(&jail.args.keep_fds, error_pipe.as_raw_fd())?;
        privileges::drop_to(jail.uid, jail.gid)?;
        if privileges::restrict_to_root()? != landlock::RulesetStatus::FullyEnforced {
            eprintln!("chapeau-jailer: warning: Landlock is not (fully) supported by this kernel; the jail relies on pivot_root alone");
        }
        SigSet::empty()
            .thread_set_mask()
            .map_err(io_error("restore the signal mask", "sigprocmask"))?;
        execve(&argv[0], argv, &[] as &[CString]).map_err(io_error("exec chapeau", JAIL_BINARY))?;
        Ok(())
    })();
    match result {
        Err(e) => e,
        Ok(()) => JailError::refused("exec chapeau", JAIL_BINARY, "returned"),
    }
}

/// Waits for the child, passing on the signals the jailer receives; returns chapeau's exit
/// status (128 + the signal when killed, as a shell reports it).
fn wait_for(child: Pid) -> Result<i32> {
    let signals = forwarded_set();
    loop {
        match waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(128 + signal as i32),
            Ok(_) => {}
            Err(e) => return Err(io_error("wait for chapeau", format!("pid {child}"))(e)),
        }
        let signal = signals
            .wait()
            .map_err(io_error("wait for chapeau", "sigwait"))?;
        if signal != Signal::SIGCHLD {
            let _ = kill(child, signal);
        }
    }
}

/// The line to print when chapeau ended with `code` after its memory cgroup reached the limit:
/// killed by the OOM killer, or failing (KVM could not fault in a guest page). A VM that ended
/// well is not blamed on reclaim that merely touched the limit.
fn memory_limit_message(code: i32, hit: Option<cgroup::MemoryLimitHit>) -> Option<String> {
    let hit = hit.filter(|h| h.oom_killed || code != 0)?;
    let how = if hit.oom_killed {
        "the kernel's OOM killer killed chapeau".to_owned()
    } else {
        format!("chapeau ended with status {code}")
    };
    Some(format!(
        "the VM hit its cgroup memory limit of {} bytes ({} MiB, {}) and {how}: \
         raise the limit or give the guest less memory",
        hit.limit,
        hit.limit >> 20,
        hit.file.display()
    ))
}

/// `--cleanup --id ID`: removes what a daemonized jail left, refusing while its chapeau runs
/// (a cgroup that still has a process cannot be removed, and the directory stays then).
fn cleanup(args: &Args) -> Result<()> {
    validate_id(&args.id)?;
    let cgroups = Cgroups::existing(args.cgroup_version, &args.id);
    for dir in cgroups.dirs() {
        let procs = dir.join("cgroup.procs");
        let running = std::fs::read_to_string(&procs).map_err(io_error("cleanup", &procs))?;
        if !running.trim().is_empty() {
            return Err(JailError::refused(
                "cleanup",
                dir,
                format!("the jailed process still runs (pid {})", running.trim()),
            ));
        }
    }
    cgroups.remove()?;
    JailDir::new(&args.chroot_base_dir, &args.id).remove()
}

/// The id names directories and cgroups: only characters that cannot walk out of them.
fn validate_id(id: &str) -> Result<()> {
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if id_ok {
        Ok(())
    } else {
        Err(JailError::refused(
            "validate",
            id,
            "the id must be 1 to 64 of A-Z a-z 0-9 and '-'",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cgroup::MemoryLimitHit;

    #[test]
    fn the_memory_limit_is_named_only_when_it_ended_the_vm() {
        let hit = |oom_killed| {
            Some(MemoryLimitHit {
                limit: 32 << 20,
                file: "/sys/fs/cgroup/memory/chapeau/vm1/memory.limit_in_bytes".into(),
                oom_killed,
            })
        };
        assert_eq!(
            memory_limit_message(137, hit(true)).unwrap(),
            "the VM hit its cgroup memory limit of 33554432 bytes (32 MiB, \
             /sys/fs/cgroup/memory/chapeau/vm1/memory.limit_in_bytes) and the kernel's OOM \
             killer killed chapeau: raise the limit or give the guest less memory"
        );
        assert!(memory_limit_message(1, hit(false))
            .unwrap()
            .contains("and chapeau ended with status 1:"));
        assert_eq!(memory_limit_message(0, hit(false)), None);
        assert_eq!(memory_limit_message(137, None), None);
    }
}
