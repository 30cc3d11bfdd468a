//! The wire side of chapeau: the VM configuration schema and the command line that produces it.
//! Knows nothing of KVM.

pub mod cli;
pub mod config;

pub use cli::{Cli, LogLevel};
pub use config::{
    BootConfig, ConfigError, ConsoleConfig, MachineConfig, PmemConfig, PmemModel, PortConfig,
    PvmParams, RngConfig, SerialConfig, VmConfig, DEFAULT_RNG_SOURCE, MAX_PMEM_DEVICES, MAX_PORTS,
    MAX_PORT_NAME_LEN, MAX_VCPUS,
};
