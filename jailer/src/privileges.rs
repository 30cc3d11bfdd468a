//! What the jailed child gives up before exec: resource headroom, inherited descriptors, the
//! ability to gain privileges, root, and every capability.

use std::os::fd::RawFd;

use caps::CapSet;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

use crate::cli::ResourceLimits;
use crate::error::{io_error, JailError, Result};

/// Whether `fd` is open in this process.
pub fn is_open(fd: RawFd) -> bool {
    fcntl(fd, FcntlArg::F_GETFD).is_ok()
}

pub fn set_limits(limits: &[ResourceLimits]) -> Result<()> {
    for limit in limits {
        for (resource, value, name) in [
            (Resource::RLIMIT_FSIZE, limit.fsize, "fsize"),
            (Resource::RLIMIT_NOFILE, limit.no_file, "no-file"),
        ] {
            if let Some(n) = value {
                setrlimit(resource, n, n).map_err(io_error("set the resource limit", name))?;
            }
        }
    }
    Ok(())
}

/// Closes every descriptor from 3 up except `keep` (the ones chapeau is given) and the error
/// pipe (close-on-exec, gone at exec), and makes the kept ones survive exec.
pub fn close_inherited_fds(keep: &[RawFd], error_pipe: RawFd) -> Result<()> {
    let mut open: Vec<RawFd> = keep.iter().copied().chain([error_pipe]).collect();
    open.sort_unstable();
    open.dedup();
    let mut first = 3;
    for fd in open.iter().copied().filter(|fd| *fd >= 3) {
        close_range(first, fd - 1)?;
        first = fd + 1;
    }
    close_range(first, RawFd::MAX)?;
    for fd in keep.iter().copied().filter(|fd| *fd >= 3) {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
            .map_err(io_error("keep the descriptor", format!("fd {fd}")))?;
    }
    Ok(())
}

fn close_range(first: RawFd, last: RawFd) -> Result<()> {
    if first > last {
        return Ok(());
    }
    // SAFETY: close_range(2) only closes descriptors of this (single-threaded, just forked)
    // process; none of the ones it closes is owned by a Rust object still in use here (the
    // netns file was consumed by setns, the kept and error-pipe fds are outside the range).
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32) };
    if ret != 0 {
        return Err(io_error(
            "close inherited descriptors",
            format!("fds {first}..={last}"),
        )(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Drops root for uid:gid with no supplementary groups, no capability in any set (bounding and
/// ambient included, so not even an exec can bring one back) and no_new_privs; then checks the
/// kernel agrees.
pub fn drop_to(uid: u32, gid: u32) -> Result<()> {
    let step = "drop privileges";
    // The bounding set can only be lowered while we still hold CAP_SETPCAP.
    caps::clear(None, CapSet::Bounding).map_err(|e| caps_error(step, "bounding", e))?;
    caps::clear(None, CapSet::Ambient).map_err(|e| caps_error(step, "ambient", e))?;
    nix::sys::prctl::set_no_new_privs().map_err(io_error(step, "no_new_privs"))?;
    setgroups(&[]).map_err(io_error(step, "setgroups"))?;
    setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid))
        .map_err(io_error(step, format!("gid {gid}")))?;
    setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))
        .map_err(io_error(step, format!("uid {uid}")))?;
    // Leaving uid 0 empties the permitted and effective sets, not the inheritable one.
    caps::clear(None, CapSet::Inheritable).map_err(|e| caps_error(step, "inheritable", e))?;
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
        CapSet::Bounding,
    ] {
        let held = caps::read(None, set).map_err(|e| caps_error(step, "read", e))?;
        if !held.is_empty() {
            return Err(JailError::refused(
                step,
                format!("{set:?}"),
                format!("capabilities still held: {held:?}"),
            ));
        }
    }
    Ok(())
}

fn caps_error(step: &'static str, set: &str, e: caps::errors::CapsError) -> JailError {
    JailError::refused(step, format!("{set} capabilities"), e.to_string())
}

/// Landlock, as a second wall behind pivot_root: from exec on, the process can reach files
/// only beneath its root (the jail), whatever a later bug in the mount setup would expose.
/// Best effort: a kernel without Landlock leaves this one wall out (the return says so).
pub fn restrict_to_root() -> Result<landlock::RulesetStatus> {
    use landlock::{
        Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, ABI,
    };
    let step = "restrict file access with Landlock";
    let abi = ABI::V5;
    let landlock_error = |e: landlock::RulesetError| JailError::refused(step, "/", e.to_string());
    let root = PathFd::new("/").map_err(|e| JailError::refused(step, "/", e.to_string()))?;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(landlock_error)?
        .create()
        .map_err(landlock_error)?
        .add_rule(PathBeneath::new(root, AccessFs::from_all(abi)))
        .map_err(landlock_error)?
        .restrict_self()
        .map_err(landlock_error)?;
    Ok(status.ruleset)
}
