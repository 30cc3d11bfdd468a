//! The command line: what to jail and how. Syntax errors are clap's (exit 2); policy checks
//! (uid 0, ownership, open fds) happen in `validate` (exit 1).

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use clap::{Parser, ValueEnum};

/// Confines one chapeau process: its own mount and PID namespaces with a minimal root
/// (the binary, the device nodes a VM needs, the files bound with --bind), an optional network
/// namespace, per-VM cgroups, resource limits, no inherited descriptors, an unprivileged uid/gid
/// with no capabilities and no_new_privs. The jail lives in <base>/chapeau/<id>/root; chapeau's
/// sockets are reachable from the host there.
#[derive(Debug, Parser)]
#[command(name = "chapeau-jailer", version)]
pub struct Args {
    /// The jail's id: 1 to 64 of A-Z a-z 0-9 and '-'.
    #[arg(long)]
    pub id: String,

    /// The chapeau binary; copied (not linked) into the jail as /chapeau.
    #[arg(long, value_name = "PATH", required_unless_present = "cleanup")]
    pub exec_file: Option<PathBuf>,

    /// The unprivileged user chapeau runs as (not 0).
    #[arg(long, required_unless_present = "cleanup")]
    pub uid: Option<u32>,

    /// The unprivileged group chapeau runs as (not 0).
    #[arg(long, required_unless_present = "cleanup")]
    pub gid: Option<u32>,

    /// Where jails are made: <DIR>/chapeau/<id>/root. Must be owned by root and not
    /// world-writable.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,

    /// A network namespace to join (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,

    /// Which cgroup hierarchy holds the per-VM cgroups.
    #[arg(long, value_enum, value_name = "1|2", default_value = "2")]
    pub cgroup_version: CgroupVersion,

    /// A cgroup file to write in the VM's cgroup, e.g. memory.max=1G (v2),
    /// memory.limit_in_bytes=1073741824 (v1), pids.max=64, cpu.max="50000 100000" (v2).
    /// Controllers: cpu, memory, pids. Repeat for more.
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<CgroupSetting>,

    /// Resource limits set before exec: fsize (largest file chapeau may write, bytes) and
    /// no-file (most open descriptors).
    #[arg(long, value_name = "fsize=N,no-file=N")]
    pub resource_limit: Vec<ResourceLimits>,

    /// Makes a host file or directory visible in the jail (read-only unless ,rw); JAIL_PATH
    /// defaults to HOST_PATH. Repeat for more.
    #[arg(long = "bind", value_name = "HOST_PATH[:JAIL_PATH][,rw]")]
    pub binds: Vec<BindMount>,

    /// Return once chapeau runs (printing its pid) instead of waiting for it; the jail
    /// directory and cgroups then stay until `--cleanup`.
    #[arg(long)]
    pub daemonize: bool,

    /// An inherited descriptor to pass to chapeau (taps, vhost fds, sockets). Every other
    /// descriptor except 0, 1, 2 is closed. Repeat for more.
    #[arg(long = "keep-fd", value_name = "N")]
    pub keep_fds: Vec<RawFd>,

    /// Remove what a --daemonize jail with this id left (its directory and cgroups) once its
    /// chapeau has ended.
    #[arg(long, conflicts_with_all = ["exec_file", "uid", "gid", "daemonize", "binds", "keep_fds", "netns"])]
    pub cleanup: bool,

    /// chapeau's arguments, naming files by their paths in the jail.
    #[arg(last = true, value_name = "CHAPEAU ARGS")]
    pub chapeau_args: Vec<OsString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CgroupVersion {
    #[value(name = "1")]
    V1,
    #[value(name = "2")]
    V2,
}

/// The controllers a VM's cgroup may set (what the VM's resources need).
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// One `--cgroup FILE=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    pub file: String,
    pub value: String,
}

impl CgroupSetting {
    /// The controller the file belongs to (`memory` for `memory.max`).
    pub fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or_default()
    }
}

impl FromStr for CgroupSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (file, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not FILE=VALUE"))?;
        let controller = file.split('.').next().unwrap_or_default();
        if file.contains('/') || !file.contains('.') || !CONTROLLERS.contains(&controller) {
            return Err(format!(
                "{file:?} is not a file of the {} controllers (like memory.max)",
                CONTROLLERS.join(", ")
            ));
        }
        Ok(CgroupSetting {
            file: file.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// One `--resource-limit`; each limit is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceLimits {
    pub fsize: Option<u64>,
    pub no_file: Option<u64>,
}

impl FromStr for ResourceLimits {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut limits = ResourceLimits::default();
        for item in s.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not KEY=N"))?;
            let n = value
                .parse::<u64>()
                .map_err(|_| format!("{key}={value:?}: not a number"))?;
            match key {
                "fsize" => limits.fsize = Some(n),
                "no-file" => limits.no_file = Some(n),
                _ => return Err(format!("unknown limit {key:?} (fsize, no-file)")),
            }
        }
        Ok(limits)
    }
}

/// One `--bind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub host: PathBuf,
    /// Absolute, without `..`, not `/`.
    pub jail: PathBuf,
    pub writable: bool,
}

impl FromStr for BindMount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (paths, writable) = match s.rsplit_once(',') {
            Some((paths, "rw")) => (paths, true),
            Some((paths, "ro")) => (paths, false),
            Some((_, other)) => return Err(format!("unknown bind option {other:?} (rw, ro)")),
            None => (s, false),
        };
        let (host, jail) = paths.split_once(':').unwrap_or((paths, paths));
        let host = PathBuf::from(host);
        let jail = PathBuf::from(jail);
        if !host.is_absolute() {
            return Err(format!(
                "{}: the host path must be absolute",
                host.display()
            ));
        }
        if !is_plain_absolute(&jail) || jail == Path::new("/") || jail == Path::new("/chapeau") {
            return Err(format!(
                "{}: the jail path must be absolute, without '..', and not / or /chapeau",
                jail.display()
            ));
        }
        Ok(BindMount {
            host,
            jail,
            writable,
        })
    }
}

/// An absolute path made only of names (no `.` or `..`), so joining it under the jail root
/// stays under it.
fn is_plain_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(["chapeau-jailer"].iter().chain(args))
    }

    const BASE: [&str; 8] = [
        "--id",
        "vm-1",
        "--exec-file",
        "/bin/chapeau",
        "--uid",
        "1",
        "--gid",
        "1",
    ];

    #[test]
    fn full_command_line() {
        let mut argv = BASE.to_vec();
        argv.extend([
            "--cgroup",
            "memory.max=1G",
            "--resource-limit",
            "fsize=10,no-file=20",
            "--bind",
            "/k:/boot/k",
            "--bind",
            "/shared,rw",
            "--keep-fd",
            "5",
            "--",
            "--api-sock",
            "/api.sock",
        ]);
        let args = parse(&argv).unwrap();
        assert_eq!(args.chroot_base_dir, Path::new("/srv/jailer"));
        assert_eq!(args.cgroup_version, CgroupVersion::V2);
        assert_eq!(args.cgroups[0].controller(), "memory");
        assert_eq!(args.cgroups[0].value, "1G");
        assert_eq!(
            args.resource_limit[0],
            ResourceLimits {
                fsize: Some(10),
                no_file: Some(20)
            }
        );
        assert_eq!(args.binds[0].jail, Path::new("/boot/k"));
        assert!(!args.binds[0].writable);
        assert_eq!(args.binds[1].jail, Path::new("/shared"));
        assert!(args.binds[1].writable);
        assert_eq!(args.keep_fds, [5]);
        assert_eq!(args.chapeau_args, ["--api-sock", "/api.sock"]);
    }

    #[test]
    fn bad_syntax_is_a_usage_error() {
        for extra in [
            ["--cgroup", "memory.max"],
            ["--cgroup", "cpuset.cpus=0"],
            ["--cgroup", "../memory.max=1"],
            ["--resource-limit", "core=0"],
            ["--resource-limit", "fsize=big"],
            ["--bind", "relative"],
            ["--bind", "/a:/b/../../etc"],
            ["--bind", "/a:/"],
            ["--bind", "/a:/chapeau"],
            ["--bind", "/a,rwx"],
            ["--cgroup-version", "3"],
        ] {
            let mut argv = BASE.to_vec();
            argv.extend(extra);
            let err = parse(&argv).unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    ErrorKind::ValueValidation | ErrorKind::InvalidValue
                ),
                "{extra:?}: {err}"
            );
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn cleanup_needs_only_the_id() {
        let args = parse(&["--cleanup", "--id", "vm-1"]).unwrap();
        assert!(args.cleanup);
        assert!(parse(&["--id", "vm-1"]).is_err());
    }
}
