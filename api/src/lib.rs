//! The wire side of chapeau: the VM configuration schema and the command line that produces it.
//! Knows nothing of KVM.

pub mod cli;
pub mod config;

pub use cli::{Cli, LogLevel};
pub use config::{
    BootConfig, ConfigError, MachineConfig, PvmParams, SerialConfig, VmConfig, MAX_VCPUS,
};
