//! Per-VM cgroups: `chapeau/<id>` under the v2 hierarchy, or under each v1 controller's
//! hierarchy. The jailer makes them and writes the limits; the jailed child moves itself in;
//! the jailer removes them when the child has ended.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::Duration;

use crate::cli::{CgroupSetting, CgroupVersion, CONTROLLERS};
use crate::error::{io_error, JailError, Result};

/// Where the kernel says cgroups are mounted.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// This VM's cgroup directories, each with its v1 controller (None for v2's single one).
pub struct Cgroups {
    dirs: Vec<(Option<&'static str>, PathBuf)>,
}

/// The mount point of the cgroup2 hierarchy, or of the v1 hierarchy holding `controller`.
fn mount_point(version: CgroupVersion, controller: &str) -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string(MOUNTINFO).map_err(io_error("find the cgroup mounts", MOUNTINFO))?;
    for line in mountinfo.lines() {
        // mountinfo(5): "... mount_point options - fstype source super_options".
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut right = right.split(' ');
        let (fstype, super_options) = (right.next(), right.nth(1).unwrap_or_default());
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        let found = match version {
            CgroupVersion::V2 => fstype == Some("cgroup2"),
            CgroupVersion::V1 => {
                fstype == Some("cgroup") && super_options.split(',').any(|o| o == controller)
            }
        };
        if found {
            return Ok(PathBuf::from(point));
        }
    }
    Err(JailError::refused(
        "find the cgroup mounts",
        MOUNTINFO,
        match version {
            CgroupVersion::V2 => "no cgroup2 hierarchy is mounted".to_owned(),
            CgroupVersion::V1 => format!("no cgroup v1 hierarchy has the {controller} controller"),
        },
    ))
}

/// The controllers the settings name, each once, in a fixed order.
fn controllers_named(settings: &[CgroupSetting]) -> Vec<&'static str> {
    CONTROLLERS
        .into_iter()
        .filter(|c| settings.iter().any(|s| s.controller() == *c))
        .collect()
}

impl Cgroups {
    /// Makes the VM's cgroups and writes `settings`. With v2 the cgroup always exists (it
    /// holds the process even with no limit, which `--cleanup` relies on); with v1 one per
    /// controller named. On error, what was made is removed.
    pub fn create(version: CgroupVersion, id: &str, settings: &[CgroupSetting]) -> Result<Self> {
        let mut cgroups = Cgroups { dirs: Vec::new() };
        let made = cgroups.create_dirs(version, id, settings);
        if let Err(e) = made {
            let _ = cgroups.remove();
            return Err(e);
        }
        Ok(cgroups)
    }

    fn create_dirs(
        &mut self,
        version: CgroupVersion,
        id: &str,
        settings: &[CgroupSetting],
    ) -> Result<()> {
        let controllers = controllers_named(settings);
        match version {
            CgroupVersion::V2 => {
                let top = mount_point(version, "")?;
                enable_controllers(&top, &controllers)?;
                let parent = top.join("chapeau");
                make_shared_dir(&parent)?;
                enable_controllers(&parent, &controllers)?;
                self.make_vm_dir(None, parent.join(id))?;
            }
            CgroupVersion::V1 => {
                for controller in controllers {
                    let parent = mount_point(version, controller)?.join("chapeau");
                    make_shared_dir(&parent)?;
                    self.make_vm_dir(Some(controller), parent.join(id))?;
                }
            }
        }
        for setting in settings {
            let dir = self
                .dirs
                .iter()
                .find(|(c, _)| c.is_none_or(|c| c == setting.controller()));
            if let Some((_, dir)) = dir {
                let file = dir.join(&setting.file);
                fs::write(&file, &setting.value)
                    .map_err(io_error("write the cgroup setting", &file))?;
            }
        }
        Ok(())
    }

    fn make_vm_dir(&mut self, controller: Option<&'static str>, dir: PathBuf) -> Result<()> {
        fs::create_dir(&dir).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                JailError::refused(
                    "create the cgroup",
                    &dir,
                    "exists: a jail with this id runs or was not cleaned up",
                )
            } else {
                io_error("create the cgroup", &dir)(e)
            }
        })?;
        self.dirs.push((controller, dir));
        Ok(())
    }

    /// Called by the jailed child before it leaves the host's mount namespace: "0" moves the
    /// writing process (its pid in our namespace would not be its pid in the cgroup's).
    pub fn join(&self) -> Result<()> {
        for (_, dir) in &self.dirs {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, "0").map_err(io_error("join the cgroup", &procs))?;
        }
        Ok(())
    }

    /// Removes the VM's cgroup directories. They must be empty: the kernel may take a moment
    /// after the last process was reaped to let go of it, hence the few retries on EBUSY.
    pub fn remove(&self) -> Result<()> {
        for (_, dir) in self.dirs.iter().rev() {
            remove_cgroup_dir(dir)?;
        }
        Ok(())
    }

    /// The directories a jail with `id` may have left, for `--cleanup`.
    pub fn existing(version: CgroupVersion, id: &str) -> Self {
        let parents: Vec<PathBuf> = match version {
            CgroupVersion::V2 => mount_point(version, "").into_iter().collect(),
            CgroupVersion::V1 => CONTROLLERS
                .iter()
                .filter_map(|c| mount_point(version, c).ok())
                .collect(),
        };
        let dirs = parents
            .into_iter()
            .map(|p| p.join("chapeau").join(id))
            .filter(|d| d.is_dir())
            .map(|d| (None, d))
            .collect();
        Cgroups { dirs }
    }

    /// When the VM's memory cgroup reached its limit: the limit in bytes, the file that sets
    /// it, and whether the kernel's OOM killer killed a process in it (else the limit was only
    /// hit, which failed an allocation, e.g. a guest page KVM could not fault in). Read after
    /// the child ended, before the cgroups are removed.
    pub fn memory_limit_hit(&self) -> Option<MemoryLimitHit> {
        let (dir, v1) = self
            .dirs
            .iter()
            .find_map(|(controller, dir)| match controller {
                Some("memory") => Some((dir, true)),
                None => Some((dir, false)),
                Some(_) => None,
            })?;
        let read = |file: &str| fs::read_to_string(dir.join(file)).ok();
        // v1 memory.oom_control and v2 memory.events both have an "oom_kill N" line.
        let count = |text: Option<String>, key: &str| -> u64 {
            text.as_deref()
                .and_then(|t| t.lines().find_map(|l| l.strip_prefix(key)))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        };
        let (limit_file, oom_kills, hits) = if v1 {
            (
                "memory.limit_in_bytes",
                count(read("memory.oom_control"), "oom_kill "),
                read("memory.failcnt")
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0),
            )
        } else {
            let events = read("memory.events");
            (
                "memory.max",
                count(events.clone(), "oom_kill "),
                count(events, "max "),
            )
        };
        let limit = read(limit_file)?.trim().parse().ok()?;
        (oom_kills > 0 || hits > 0).then(|| MemoryLimitHit {
            limit,
            file: dir.join(limit_file),
            oom_killed: oom_kills > 0,
        })
    }

    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, d)| d.as_path())
    }
}

/// See [`Cgroups::memory_limit_hit`].
#[derive(Debug, PartialEq)]
pub struct MemoryLimitHit {
    pub limit: u64,
    pub file: PathBuf,
    pub oom_killed: bool,
}

fn remove_cgroup_dir(dir: &Path) -> Result<()> {
    let mut tries = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 50 => {
                tries += 1;
                sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_error("remove the cgroup", dir)(e)),
        }
    }
}

/// `chapeau/` is shared by every jail: made once, left in place.
fn make_shared_dir(dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(io_error("create the cgroup", dir)(e))
        }
        _ => Ok(()),
    }
}

/// v2: a child cgroup can use a controller only once its parent lists it in
/// cgroup.subtree_control, which needs the controller in the parent's cgroup.controllers.
fn enable_controllers(dir: &Path, controllers: &[&str]) -> Result<()> {
    if controllers.is_empty() {
        return Ok(());
    }
    let available_file = dir.join("cgroup.controllers");
    let available = fs::read_to_string(&available_file)
        .map_err(io_error("read the cgroup controllers", &available_file))?;
    let enabled_file = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&enabled_file)
        .map_err(io_error("read the cgroup controllers", &enabled_file))?;
    for controller in controllers {
        if enabled.split_whitespace().any(|c| c == *controller) {
            continue;
        }
        if !available.split_whitespace().any(|c| c == *controller) {
            return Err(JailError::refused(
                "enable the cgroup controller",
                &available_file,
                format!("the {controller} controller is not available in this cgroup v2 hierarchy (bound to v1? try --cgroup-version 1)"),
            ));
        }
        fs::write(&enabled_file, format!("+{controller}"))
            .map_err(io_error("enable the cgroup controller", &enabled_file))?;
    }
    Ok(())
}
