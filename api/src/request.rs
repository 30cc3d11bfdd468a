//! The one typed request/response pair every front end (command line, REST, QMP) uses to drive
//! the VMM. The front ends translate their wire format into a [`VmmRequest`]; the `vmm` thread
//! answers each with a [`VmmResponse`] or a [`RequestError`], which the front end turns back
//! into its wire format (an HTTP status and `{"fault_message"}`, a QMP error class).

use serde::{Deserialize, Serialize};

use crate::config::{
    BootConfig, ConsoleConfig, FsConfig, MachineConfig, NetConfig, PmemConfig, RngConfig,
    SerialConfig, VmConfig,
};

/// Where the VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Being configured; no guest exists yet (`InstanceStart` builds and starts it).
    #[serde(rename = "Not started")]
    Configured,
    Running,
    Paused,
    /// The guest ended; the process is shutting down.
    Stopped,
}

/// `PUT /actions`: `{"action_type": "InstanceStart"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Build the configured VM and start its vCPUs.
    InstanceStart,
    /// Ask the guest to shut down (ACPI power button, or the i8042 for guests without ACPI).
    SendCtrlAltDel,
    /// Stop the VM now, in order: vCPUs parked and joined, devices dropped, files removed.
    Shutdown,
}

/// `PATCH /vm`: `{"state": "Paused"}` or `{"state": "Resumed"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateChange {
    pub state: RequestedState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestedState {
    Paused,
    Resumed,
}

/// `PUT /logger`: where chapeau's own log goes and how much of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`.
    #[serde(default)]
    pub level: Option<String>,
    /// A file to append the log to instead of stderr (created without following symlinks).
    #[serde(default)]
    pub log_path: Option<std::path::PathBuf>,
}

/// `PUT /metrics`: a file the metrics are written to as one JSON line every `interval_s`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: std::path::PathBuf,
    #[serde(default = "default_metrics_interval")]
    pub interval_s: u32,
}

fn default_metrics_interval() -> u32 {
    60
}

/// `GET /`: who and where the VM is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: VmState,
    /// chapeau's version.
    pub vmm_version: String,
    pub app_name: String,
}

/// One request to the VMM. Every `Put*` configures the VM before it starts and is refused
/// (409) once it has: the VMM opens no new host files after start, its seccomp filter forbids it.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmRequest {
    GetInfo,
    GetConfig,
    GetMetrics,
    PutMachine(MachineConfig),
    PutBoot(BootConfig),
    /// `PUT /pmem/{id}`: adds, or replaces, the image with that id.
    PutPmem {
        id: String,
        config: PmemConfig,
    },
    /// `PUT /network-interfaces/{id}`: adds, or replaces, the interface with that id.
    PutNet {
        id: String,
        config: NetConfig,
    },
    /// `PUT /fs/{tag}`: adds, or replaces, the shared directory with that tag (`config.tag`
    /// must equal `tag`).
    PutFs {
        tag: String,
        config: FsConfig,
    },
    PutConsole(ConsoleConfig),
    /// `PUT /ports/{name}` with `{"socket": PATH}`.
    PutPort {
        name: String,
        socket: std::path::PathBuf,
    },
    PutSerial(SerialConfig),
    PutRng(RngConfig),
    PutLogger(LoggerConfig),
    PutMetrics(MetricsConfig),
    Action(ActionType),
    SetState(RequestedState),
    /// The vCPU threads' host thread ids (QMP's `query-cpus-fast`; no REST route).
    GetVcpuThreadIds,
}

impl VmmRequest {
    /// Whether the request is part of the VM's configuration ([`PendingConfig::apply`]).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            VmmRequest::PutMachine(_)
                | VmmRequest::PutBoot(_)
                | VmmRequest::PutPmem { .. }
                | VmmRequest::PutNet { .. }
                | VmmRequest::PutFs { .. }
                | VmmRequest::PutConsole(_)
                | VmmRequest::PutPort { .. }
                | VmmRequest::PutSerial(_)
                | VmmRequest::PutRng(_)
        )
    }

    /// Whether the request configures the VMM before the VM starts (409 afterwards).
    pub fn is_pre_boot(&self) -> bool {
        self.is_config() || matches!(self, VmmRequest::PutLogger(_) | VmmRequest::PutMetrics(_))
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmResponse {
    /// Done; nothing to say (HTTP 204).
    Empty,
    Info(InstanceInfo),
    /// The whole configuration, as `--config` would read it; `None` before a boot source is set
    /// gives the parts that are (`boot` absent).
    Config(serde_json::Value),
    Metrics(serde_json::Value),
    /// Thread id of vCPU 0, 1, …; empty before the VM starts.
    VcpuThreadIds(Vec<i32>),
}

/// Why a request was refused. Each kind maps to one HTTP status; the message is one line for
/// the caller and names the field, the state or the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request is malformed or a value is out of range (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// Not in this state, e.g. a pre-boot resource after start, or pausing a paused VM (409).
    #[error("{0}")]
    Conflict(String),
    /// The VMM could not do it (500): a host failure, not the caller's fault.
    #[error("{0}")]
    Internal(String),
}

/// The configuration the API builds up before `InstanceStart`: a [`VmConfig`] whose boot
/// source may not be set yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PendingConfig {
    pub machine: MachineConfig,
    pub boot: Option<BootConfig>,
    pub serial: SerialConfig,
    pub console: ConsoleConfig,
    /// Named ports in the order they were first put.
    pub ports: Vec<crate::config::PortConfig>,
    pub rng: Option<RngConfig>,
    /// pmem images by id, in the order they were first put.
    pub pmem: Vec<(String, PmemConfig)>,
    /// Network interfaces by id, in the order they were first put.
    pub net: Vec<(String, NetConfig)>,
    /// Shared directories in the order their tags were first put.
    pub fs: Vec<FsConfig>,
}

impl PendingConfig {
    /// Starts from a whole config (the command line's), pmem ids `pmem0`, `pmem1`, ….
    pub fn from_config(config: VmConfig) -> Self {
        PendingConfig {
            machine: config.machine,
            boot: Some(config.boot),
            serial: config.serial,
            console: config.console,
            ports: config.ports,
            rng: config.rng,
            pmem: config
                .pmem
                .into_iter()
                .enumerate()
                .map(|(i, p)| (format!("pmem{i}"), p))
                .collect(),
            net: config
                .net
                .into_iter()
                .enumerate()
                .map(|(i, n)| (n.id.clone().unwrap_or_else(|| format!("net{i}")), n))
                .collect(),
            fs: config.fs,
        }
    }

    fn with_boot(&self, boot: BootConfig) -> VmConfig {
        VmConfig {
            machine: self.machine.clone(),
            boot,
            serial: self.serial.clone(),
            console: self.console.clone(),
            ports: self.ports.clone(),
            rng: self.rng.clone(),
            pmem: self.pmem.iter().map(|(_, p)| p.clone()).collect(),
            net: self
                .net
                .iter()
                .map(|(id, n)| NetConfig {
                    id: Some(id.clone()),
                    ..n.clone()
                })
                .collect(),
            fs: self.fs.clone(),
        }
    }

    /// `PUT /fs/{tag}`: adds the share, or replaces the one with that tag in place.
    fn put_fs(&mut self, tag: &str, config: FsConfig) -> Result<(), RequestError> {
        if config.tag != tag {
            return Err(RequestError::BadRequest(format!(
                "the body's tag {:?} differs from the path's {tag:?}",
                config.tag
            )));
        }
        match self.fs.iter_mut().find(|fs| fs.tag == tag) {
            Some(existing) => *existing = config,
            None => self.fs.push(config),
        }
        Ok(())
    }

    /// The configuration to boot, validated; a 400 that names what is missing or wrong.
    pub fn to_config(&self) -> Result<VmConfig, RequestError> {
        let boot = self.boot.clone().ok_or_else(|| {
            RequestError::BadRequest(
                "no boot source: PUT /boot-source with a kernel before InstanceStart".into(),
            )
        })?;
        let config = self.with_boot(boot);
        config
            .validate()
            .map_err(|e| RequestError::BadRequest(e.to_string()))?;
        Ok(config)
    }

    /// Applies one pre-boot `PUT` if the whole stays valid; the configuration is unchanged
    /// otherwise. Other requests are not configuration: a 400 says so.
    pub fn apply(&mut self, request: VmmRequest) -> Result<(), RequestError> {
        fn put<T>(list: &mut Vec<(String, T)>, id: String, item: T) {
            match list.iter_mut().find(|(existing, _)| *existing == id) {
                Some((_, slot)) => *slot = item,
                None => list.push((id, item)),
            }
        }
        let mut next = self.clone();
        match request {
            VmmRequest::PutMachine(machine) => next.machine = machine,
            VmmRequest::PutBoot(boot) => next.boot = Some(boot),
            VmmRequest::PutSerial(serial) => next.serial = serial,
            VmmRequest::PutConsole(console) => next.console = console,
            VmmRequest::PutRng(rng) => next.rng = Some(rng),
            VmmRequest::PutPort { name, socket } => {
                match next.ports.iter_mut().find(|p| p.name == name) {
                    Some(port) => port.socket = socket,
                    None => next.ports.push(crate::config::PortConfig { name, socket }),
                }
            }
            VmmRequest::PutPmem { id, config } => put(&mut next.pmem, id, config),
            VmmRequest::PutNet { id, config } => put(&mut next.net, id, config),
            VmmRequest::PutFs { tag, config } => next.put_fs(&tag, config)?,
            other => {
                return Err(RequestError::BadRequest(format!(
                    "{other:?} does not configure the VM"
                )))
            }
        }
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Checks what is configured so far, as [`PendingConfig::to_config`] will, except that the
    /// boot source may still be missing: each `PUT` is refused when it makes the whole invalid.
    pub fn validate(&self) -> Result<(), RequestError> {
        let boot = self.boot.clone().unwrap_or_else(|| BootConfig {
            kernel: "(not set yet)".into(),
            initrd: None,
            cmdline: crate::config::DEFAULT_CMDLINE.into(),
            pvm_params: Default::default(),
        });
        self.with_boot(boot)
            .validate()
            .map_err(|e| RequestError::BadRequest(e.to_string()))
    }

    /// The configuration as JSON, as `GET /vm/config` shows it (boot absent until set).
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::json!({
            "machine": self.machine,
            "serial": self.serial,
            "console": self.console,
            "ports": self.ports,
            "rng": self.rng,
            "pmem": self.pmem.iter().map(|(_, p)| p).collect::<Vec<_>>(),
            "net": self.net.iter().map(|(id, n)| NetConfig { id: Some(id.clone()), ..n.clone() }).collect::<Vec<_>>(),
            "fs": self.fs,
        });
        if let Some(boot) = &self.boot {
            value["boot"] = serde_json::json!(boot);
        }
        value
    }
}
