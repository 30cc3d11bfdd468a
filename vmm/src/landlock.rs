//! Landlock on the running VMM. Once the VM is built, chapeau opens no host file again: every
//! file its config names (kernel, initrd, images, taps, the rng source, output files) is open,
//! every socket bound. So from `InstanceStart` on, the `vmm` thread (and the vCPU and net
//! threads it starts after) may not open, create, rename, link or execute any path, nor bind
//! or connect a TCP port; the one thing left is removing the files chapeau created (its
//! sockets, its pidfile), in the directories it created them in. The `api` thread gets the
//! same walls with no exception from its start (it never touches a path), the 9p workers their
//! own (their export). Landlock is the second wall behind seccomp: it still holds under
//! `--seccomp off` or `log`, and limits what a path-taking syscall a filter allows may reach.
//! Best effort: a kernel without Landlock leaves this wall out, said once at warn level.

use std::os::fd::OwnedFd;
use std::sync::Once;

use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetError, RulesetStatus, ABI,
};

/// The newest Landlock ABI the rules are written for; older kernels enforce what they know.
const ABI_USED: ABI = ABI::V6;

#[derive(Debug, thiserror::Error)]
#[error("cannot restrict file access with Landlock: {0}")]
pub struct LandlockError(#[from] RulesetError);

/// Restricts the calling thread and the threads it starts from now on: no path may be opened
/// or changed, no TCP port bound or connected, except that files may be removed beneath
/// `removable_dirs`.
pub fn restrict_thread(removable_dirs: &[OwnedFd]) -> Result<(), LandlockError> {
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_USED))?
        .handle_access(AccessNet::from_all(ABI_USED))?
        .create()?;
    for dir in removable_dirs {
        ruleset = ruleset.add_rule(PathBeneath::new(dir, AccessFs::RemoveFile))?;
    }
    let status = ruleset.restrict_self()?;
    if status.ruleset == RulesetStatus::NotEnforced {
        static SAID: Once = Once::new();
        SAID.call_once(|| {
            log::warn!(
                "this kernel has no Landlock: once the VM runs, only seccomp keeps chapeau \
                 from opening host files"
            )
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    /// In a thread of its own (Landlock binds the thread): nothing can be opened or created
    /// any more, not even in the removable directory, where only removal works.
    #[test]
    fn a_restricted_thread_opens_nothing_and_removes_only_where_allowed() {
        let dir = std::env::temp_dir().join(format!("chapeau-landlock-{}", std::process::id()));
        let sockets = dir.join("sockets");
        let other = dir.join("other");
        std::fs::create_dir_all(&sockets).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(sockets.join("ours.sock"), b"").unwrap();
        std::fs::write(other.join("theirs"), b"").unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        let removable = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&sockets)
            .unwrap();
        let inner = dir.clone();
        let outcome = std::thread::spawn(move || {
            restrict_thread(&[removable.into()]).unwrap();
            let denied = |r: std::io::Result<()>| {
                r.err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES)
            };
            (
                denied(std::fs::read(inner.join("secret")).map(drop)),
                denied(std::fs::write(inner.join("sockets/new"), b"x")),
                denied(std::fs::remove_file(inner.join("other/theirs"))),
                std::fs::remove_file(inner.join("sockets/ours.sock")).is_ok(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(outcome, (true, true, true, true));
        // The test's own thread is not restricted.
        assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
