//! The VM configuration schema: what `chapeau --config vm.json` reads and what the REST API will
//! accept. Unknown fields are errors everywhere, so a typo never silently falls back to a default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Most vCPUs a VM may have. xAPIC ids are 8 bits, 0xff is the broadcast id and the IOAPIC takes
/// one id in the same space, which leaves 254 for vCPUs without needing x2APIC.
pub const MAX_VCPUS: u8 = 254;
/// Upper bound on guest RAM (1 TiB). Purely syntactic: whether the host has it is checked by the vmm.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Linux x86 `COMMAND_LINE_SIZE`, which counts the terminating NUL: the text must be shorter.
pub const CMDLINE_MAX_SIZE: usize = 2048;

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Console on the first UART; `reboot=k panic=1` make guest reboot and panic reach the i8042 reset
/// line, which is how the VM ends.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// A whole VM: the JSON document `--config` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub machine: MachineConfig,
    pub boot: BootConfig,
    #[serde(default)]
    pub serial: SerialConfig,
}

/// vCPUs and RAM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MachineConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
        }
    }
}

/// What to boot and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default)]
    pub pvm_params: PvmParams,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

/// Whether to append the guest kernel parameters a PVM host needs (PVM cannot run some
/// instructions in guest kernel mode; see DESIGN.md section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PvmParams {
    /// Append them when the host is PVM (`/sys/module/kvm_pvm` exists).
    #[default]
    Auto,
    On,
    Off,
}

impl PvmParams {
    pub fn as_str(self) -> &'static str {
        match self {
            PvmParams::Auto => "auto",
            PvmParams::On => "on",
            PvmParams::Off => "off",
        }
    }
}

impl fmt::Display for PvmParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the guest's COM1 goes. JSON: `"stdout"`, `"off"` or `{"file": "/path"}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialConfig {
    #[default]
    Stdout,
    File(PathBuf),
    Off,
}

/// The `--serial` syntax: `stdout`, `off` or `file=PATH`.
impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(SerialConfig::Stdout),
            "off" => Ok(SerialConfig::Off),
            _ => match s.strip_prefix("file=") {
                Some("") => Err(ConfigError::SerialSyntax(
                    "file= needs a path, e.g. file=/tmp/console.log",
                )),
                Some(path) => Ok(SerialConfig::File(PathBuf::from(path))),
                None => Err(ConfigError::SerialSyntax(
                    "expected stdout, off or file=PATH",
                )),
            },
        }
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdout => f.write_str("stdout"),
            SerialConfig::Off => f.write_str("off"),
            SerialConfig::File(path) => write!(f, "file={}", path.display()),
        }
    }
}

/// Everything that can be wrong with a configuration. Each message is one line meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Malformed JSON, a wrong type, an unknown field or variant; serde_json says where.
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    /// A setting with a value out of range. `setting` is named the way the user gave it
    /// (`--cpus` or `machine.vcpus`).
    #[error("invalid {setting}{}: {reason}", spaced(value))]
    Invalid {
        setting: &'static str,
        value: String,
        reason: String,
    },
    /// An error about the contents of a config file, prefixed by its path.
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("no guest kernel given: pass --kernel PATH or --config FILE")]
    MissingKernel,
    /// A `--serial` value that is not `stdout`, `off` or `file=PATH`. Only the reason: clap
    /// already quotes the flag and the value around it.
    #[error("{0}")]
    SerialSyntax(&'static str),
}

fn spaced(value: &str) -> String {
    if value.is_empty() {
        String::new()
    } else {
        format!(" {value}")
    }
}

/// How settings are named in validation errors, so they match what the user wrote.
pub(crate) struct SettingNames {
    pub vcpus: &'static str,
    pub memory: &'static str,
    pub kernel: &'static str,
    pub initrd: &'static str,
    pub cmdline: &'static str,
    pub serial: &'static str,
}

const JSON_NAMES: SettingNames = SettingNames {
    vcpus: "machine.vcpus",
    memory: "machine.memory_mib",
    kernel: "boot.kernel",
    initrd: "boot.initrd",
    cmdline: "boot.cmdline",
    serial: "serial.file",
};

impl VmConfig {
    /// Parses a JSON document. Does not validate: call [`VmConfig::validate`].
    pub fn from_json(json: &str) -> Result<VmConfig, ConfigError> {
        parse_json("VM config", json)
    }

    /// Reads, parses and validates a config file; every error names the file.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let json = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = parse_json(&path.display().to_string(), &json)?;
        config.validate().map_err(|e| ConfigError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        Ok(config)
    }

    /// Syntactic checks only; whether the host can provide the resources, or the files exist,
    /// is for the vmm to find out.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_named(&JSON_NAMES)
    }

    pub(crate) fn validate_named(&self, names: &SettingNames) -> Result<(), ConfigError> {
        let invalid = |setting, value: String, reason: String| {
            Err(ConfigError::Invalid {
                setting,
                value,
                reason,
            })
        };

        let vcpus = self.machine.vcpus;
        if vcpus == 0 {
            return invalid(names.vcpus, "0".into(), "a VM needs at least 1 vCPU".into());
        }
        if vcpus > MAX_VCPUS {
            return invalid(
                names.vcpus,
                vcpus.to_string(),
                format!("at most {MAX_VCPUS} vCPUs are supported"),
            );
        }

        let memory = self.machine.memory_mib;
        if memory == 0 {
            return invalid(
                names.memory,
                "0".into(),
                "a VM needs at least 1 MiB of memory".into(),
            );
        }
        if memory > MAX_MEMORY_MIB {
            return invalid(
                names.memory,
                memory.to_string(),
                format!("at most {MAX_MEMORY_MIB} MiB (1 TiB) is supported"),
            );
        }

        if self.boot.kernel.as_os_str().is_empty() {
            return invalid(names.kernel, "\"\"".into(), "the path is empty".into());
        }
        if let Some(initrd) = &self.boot.initrd {
            if initrd.as_os_str().is_empty() {
                return invalid(names.initrd, "\"\"".into(), "the path is empty".into());
            }
        }

        let cmdline = &self.boot.cmdline;
        if let Some(offset) = cmdline.bytes().position(|b| b == 0) {
            return invalid(
                names.cmdline,
                String::new(),
                format!("contains a NUL byte at offset {offset}"),
            );
        }
        if cmdline.len() >= CMDLINE_MAX_SIZE {
            return invalid(
                names.cmdline,
                format!("({} bytes)", cmdline.len()),
                format!("the kernel command line must be shorter than {CMDLINE_MAX_SIZE} bytes"),
            );
        }

        if let SerialConfig::File(path) = &self.serial {
            if path.as_os_str().is_empty() {
                return invalid(names.serial, "\"\"".into(), "the path is empty".into());
            }
        }
        Ok(())
    }
}

fn parse_json(origin: &str, json: &str) -> Result<VmConfig, ConfigError> {
    serde_json::from_str(json).map_err(|source| ConfigError::Parse {
        origin: origin.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> VmConfig {
        VmConfig::from_json(r#"{"boot":{"kernel":"/k"}}"#).unwrap()
    }

    fn err_of(json: &str) -> String {
        VmConfig::from_json(json).unwrap_err().to_string()
    }

    fn validate_err(config: &VmConfig) -> String {
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn minimal_json_gets_defaults() {
        let config = minimal();
        assert_eq!(
            config,
            VmConfig {
                machine: MachineConfig {
                    vcpus: 1,
                    memory_mib: 256
                },
                boot: BootConfig {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: "console=ttyS0 reboot=k panic=1".into(),
                    pvm_params: PvmParams::Auto,
                },
                serial: SerialConfig::Stdout,
            }
        );
        config.validate().unwrap();
    }

    #[test]
    fn partial_machine_keeps_other_default() {
        let config =
            VmConfig::from_json(r#"{"machine":{"vcpus":4},"boot":{"kernel":"/k"}}"#).unwrap();
        assert_eq!(config.machine.vcpus, 4);
        assert_eq!(config.machine.memory_mib, DEFAULT_MEMORY_MIB);
    }

    #[test]
    fn full_json_round_trip() {
        let json = r#"{
            "machine": {"vcpus": 2, "memory_mib": 512},
            "boot": {
                "kernel": "/guest/vmlinux",
                "initrd": "/guest/initramfs.cpio.gz",
                "cmdline": "console=ttyS0 quiet",
                "pvm_params": "off"
            },
            "serial": {"file": "/tmp/console.log"}
        }"#;
        let config = VmConfig::from_json(json).unwrap();
        let expected = VmConfig {
            machine: MachineConfig {
                vcpus: 2,
                memory_mib: 512,
            },
            boot: BootConfig {
                kernel: "/guest/vmlinux".into(),
                initrd: Some("/guest/initramfs.cpio.gz".into()),
                cmdline: "console=ttyS0 quiet".into(),
                pvm_params: PvmParams::Off,
            },
            serial: SerialConfig::File("/tmp/console.log".into()),
        };
        assert_eq!(config, expected);

        let text = serde_json::to_string(&config).unwrap();
        assert_eq!(VmConfig::from_json(&text).unwrap(), expected);
        // The serialized form is the documented one, not an internal encoding.
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["serial"]["file"], "/tmp/console.log");
        assert_eq!(value["boot"]["pvm_params"], "off");
    }

    #[test]
    fn unknown_top_level_field_rejected() {
        let msg = err_of("{\n  \"boot\": {\"kernel\": \"/k\"},\n  \"foo\": 1\n}");
        assert!(msg.starts_with("VM config: unknown field `foo`"), "{msg}");
        assert!(msg.contains("`machine`, `boot`, `serial`"), "{msg}");
        assert!(msg.contains("line 3 column"), "{msg}");
    }

    #[test]
    fn unknown_nested_fields_rejected() {
        let msg = err_of(r#"{"boot":{"kernel":"/k","kernal":"/x"}}"#);
        assert!(msg.contains("unknown field `kernal`"), "{msg}");
        let msg = err_of(r#"{"machine":{"cpus":2},"boot":{"kernel":"/k"}}"#);
        assert!(msg.contains("unknown field `cpus`"), "{msg}");
    }

    #[test]
    fn missing_boot_or_kernel_rejected() {
        assert!(err_of("{}").contains("missing field `boot`"));
        assert!(err_of(r#"{"boot":{}}"#).contains("missing field `kernel`"));
    }

    #[test]
    fn serial_forms() {
        let parse = |serial: &str| {
            VmConfig::from_json(&format!(
                r#"{{"boot":{{"kernel":"/k"}},"serial":{serial}}}"#
            ))
            .map(|c| c.serial)
        };
        assert_eq!(parse(r#""stdout""#).unwrap(), SerialConfig::Stdout);
        assert_eq!(parse(r#""off""#).unwrap(), SerialConfig::Off);
        assert_eq!(
            parse(r#"{"file":"/tmp/s"}"#).unwrap(),
            SerialConfig::File("/tmp/s".into())
        );
        assert!(parse(r#""file""#).is_err());
        assert!(parse(r#""pty""#).is_err());
        assert!(parse(r#"{"socket":"/tmp/s"}"#).is_err());
    }

    #[test]
    fn serial_from_str() {
        assert_eq!(
            "stdout".parse::<SerialConfig>().unwrap(),
            SerialConfig::Stdout
        );
        assert_eq!("off".parse::<SerialConfig>().unwrap(), SerialConfig::Off);
        assert_eq!(
            "file=/tmp/a=b".parse::<SerialConfig>().unwrap(),
            SerialConfig::File("/tmp/a=b".into())
        );
        assert_eq!(
            "file=".parse::<SerialConfig>().unwrap_err().to_string(),
            "file= needs a path, e.g. file=/tmp/console.log"
        );
        assert_eq!(
            "tty".parse::<SerialConfig>().unwrap_err().to_string(),
            "expected stdout, off or file=PATH"
        );
        // Display is the inverse of FromStr.
        for s in ["stdout", "off", "file=/x/y"] {
            assert_eq!(s.parse::<SerialConfig>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn bad_pvm_params_rejected() {
        let msg = err_of(r#"{"boot":{"kernel":"/k","pvm_params":"maybe"}}"#);
        assert!(msg.contains("unknown variant `maybe`"), "{msg}");
        assert!(msg.contains("`auto`, `on`, `off`"), "{msg}");
        let msg = err_of(r#"{"boot":{"kernel":"/k","pvm_params":true}}"#);
        assert!(msg.starts_with("VM config: "), "{msg}");
    }

    #[test]
    fn validate_vcpus() {
        let mut config = minimal();
        config.machine.vcpus = 0;
        assert_eq!(
            validate_err(&config),
            "invalid machine.vcpus 0: a VM needs at least 1 vCPU"
        );
        config.machine.vcpus = 255;
        assert_eq!(
            validate_err(&config),
            "invalid machine.vcpus 255: at most 254 vCPUs are supported"
        );
        config.machine.vcpus = MAX_VCPUS;
        config.validate().unwrap();
    }

    #[test]
    fn validate_memory() {
        let mut config = minimal();
        config.machine.memory_mib = 0;
        assert_eq!(
            validate_err(&config),
            "invalid machine.memory_mib 0: a VM needs at least 1 MiB of memory"
        );
        config.machine.memory_mib = MAX_MEMORY_MIB + 1;
        assert!(validate_err(&config).contains("at most 1048576 MiB (1 TiB)"));
        config.machine.memory_mib = MAX_MEMORY_MIB;
        config.validate().unwrap();
    }

    #[test]
    fn validate_paths() {
        let mut config = minimal();
        config.boot.kernel = PathBuf::new();
        assert_eq!(
            validate_err(&config),
            "invalid boot.kernel \"\": the path is empty"
        );
        let mut config = minimal();
        config.boot.initrd = Some(PathBuf::new());
        assert!(validate_err(&config).starts_with("invalid boot.initrd"));
        let mut config = minimal();
        config.serial = SerialConfig::File(PathBuf::new());
        assert!(validate_err(&config).starts_with("invalid serial.file"));
    }

    #[test]
    fn validate_cmdline() {
        let mut config = minimal();
        config.boot.cmdline = "a".repeat(CMDLINE_MAX_SIZE - 1);
        config.validate().unwrap();
        config.boot.cmdline.push('a');
        assert_eq!(
            validate_err(&config),
            "invalid boot.cmdline (2048 bytes): the kernel command line must be shorter than 2048 bytes"
        );
        config.boot.cmdline = "console=ttyS0\0x".into();
        assert_eq!(
            validate_err(&config),
            "invalid boot.cmdline: contains a NUL byte at offset 13"
        );
    }

    #[test]
    fn from_file_names_the_file() {
        let dir = std::env::temp_dir().join(format!("chapeau-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let missing = dir.join("missing.json");
        let msg = VmConfig::from_file(&missing).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("cannot read config file {}: ", missing.display())),
            "{msg}"
        );

        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{\"boot\":{\"kernel\":\"/k\"},\n \"foo\":1}").unwrap();
        let msg = VmConfig::from_file(&bad).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{}: unknown field `foo`", bad.display())),
            "{msg}"
        );

        let invalid = dir.join("invalid.json");
        std::fs::write(
            &invalid,
            r#"{"machine":{"vcpus":0},"boot":{"kernel":"/k"}}"#,
        )
        .unwrap();
        let msg = VmConfig::from_file(&invalid).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "{}: invalid machine.vcpus 0: a VM needs at least 1 vCPU",
                invalid.display()
            )
        );

        let good = dir.join("good.json");
        std::fs::write(&good, r#"{"boot":{"kernel":"/k"}}"#).unwrap();
        assert_eq!(VmConfig::from_file(&good).unwrap(), minimal());

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
