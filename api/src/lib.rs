//! The wire side of chapeau: the VM configuration schema, the command line that produces it, and
//! the typed requests every front end sends the VMM.
//! Knows nothing of KVM.

pub mod cli;
pub mod config;
mod nonblocking;
pub mod qemu;
pub mod request;
pub mod rest;

pub use cli::{Cli, LogLevel, SeccompMode};
pub use config::{
    BootConfig, ConfigError, ConsoleConfig, FsConfig, MacAddr, MachineConfig, NetConfig,
    PmemConfig, PmemModel, PortConfig, PvmParams, RngConfig, SecurityModel, SerialConfig,
    VhostMode, VmConfig, DEFAULT_RNG_SOURCE, MAX_FS_TAG_LEN, MAX_NET_DEVICES, MAX_NET_QUEUE_PAIRS,
    MAX_PMEM_DEVICES, MAX_PORTS, MAX_PORT_NAME_LEN, MAX_VCPUS,
};
pub use request::{
    Action, ActionType, InstanceInfo, LoggerConfig, MetricsConfig, PendingConfig, RequestError,
    RequestedState, VmState, VmStateChange, VmmRequest, VmmResponse,
};
