//! The VM configuration schema: what `chapeau --config vm.json` reads and what the REST API will
//! accept. Unknown fields are errors everywhere, so a typo never silently falls back to a default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod net;
pub use net::{MacAddr, NetConfig, VhostMode};

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
/// Where virtio-rng reads its entropy unless told otherwise.
pub const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";
/// Named virtio-console ports a VM may have. QEMU's virtio-serial defaults to 31 ports in all;
/// port 0 is the console, which leaves 30 (and keeps the queue count, 2 per port, at 62).
pub const MAX_PORTS: usize = 30;
/// Longest port name: the guest's sysfs/udev name buffers; Linux reads PORT_NAME into a page,
/// but udev rules and `/dev/virtio-ports/<name>` want short names, as QEMU's do.
pub const MAX_PORT_NAME_LEN: usize = 127;
/// Most pmem devices (NVDIMMs plus virtio-pmem) a VM may have; Kata uses one.
pub const MAX_PMEM_DEVICES: usize = 8;
/// Network interfaces a VM may have.
pub const MAX_NET_DEVICES: usize = 8;
/// Queue pairs one interface may have: Kata asks for one per vCPU up to 8; 16 leaves room and
/// keeps the device at 33 queues.
pub const MAX_NET_QUEUE_PAIRS: u16 = 16;
/// Linux's `IFNAMSIZ` counts the terminating NUL: an interface name is at most 15 bytes.
pub const MAX_TAP_NAME_LEN: usize = 15;
/// Longest 9p mount tag. The virtio-9p config space carries a u16 length, but QEMU refuses
/// tags over 255 bytes (MAX_TAG_LEN) and Kata's runtime is written against QEMU: the same limit
/// means every tag Kata passes QEMU works here, and no longer one does.
pub const MAX_FS_TAG_LEN: usize = 255;
/// Most virtio-9p devices a VM may have; Kata uses one.
pub const MAX_FS_DEVICES: usize = 8;
/// `sun_path` is 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// A whole VM: the JSON document `--config` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub machine: MachineConfig,
    pub boot: BootConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    /// virtio-console port 0 (hvc0). The virtio-console device exists when this is not `Off`
    /// or `ports` is not empty.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Named virtio-console ports (`/dev/virtio-ports/<name>` in the guest), ports 1..=N.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// A virtio-rng device when present.
    #[serde(default)]
    pub rng: Option<RngConfig>,
    /// Image files mapped into guest physical memory as NVDIMMs or virtio-pmem devices.
    #[serde(default)]
    pub pmem: Vec<PmemConfig>,
    /// virtio-net interfaces, each on a tap.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Host directories shared with the guest over virtio-9p, one device each.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
}

impl VmConfig {
    /// Whether the VM gets a virtio-console device.
    pub fn has_virtio_console(&self) -> bool {
        self.console != ConsoleConfig::Off || !self.ports.is_empty()
    }
}

/// vCPUs and RAM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MachineConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Transparent huge pages for guest RAM. Off by default: the guest's touched memory then
    /// grows in 2 MiB steps (+6 MiB RSS for the test guest) without a faster boot on the hosts
    /// measured; worth it for memory-heavy guests on hardware KVM (fewer TLB misses).
    pub thp: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            thp: false,
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

/// virtio-rng. JSON: `{}` or `{"source": "/dev/hwrng"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// File the device reads entropy from.
    #[serde(default = "default_rng_source")]
    pub source: PathBuf,
}

fn default_rng_source() -> PathBuf {
    PathBuf::from(DEFAULT_RNG_SOURCE)
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            source: default_rng_source(),
        }
    }
}

/// The `--rng` value syntax: `source=PATH` (the flag alone means the default source).
impl FromStr for RngConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("source=") {
            Some("") => Err(ConfigError::RngSyntax(
                "source= needs a path, e.g. source=/dev/urandom",
            )),
            Some(path) => Ok(RngConfig {
                source: PathBuf::from(path),
            }),
            None => Err(ConfigError::RngSyntax("expected source=PATH")),
        }
    }
}

impl fmt::Display for RngConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "source={}", self.source.display())
    }
}

/// Where virtio-console port 0 (the guest's hvc0) goes. JSON: `"off"`, `"stdout"`,
/// `{"file": "/path"}` or `{"socket": "/path"}` (a unix socket chapeau listens on, one client at
/// a time; output is dropped while nobody is connected).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleConfig {
    #[default]
    Off,
    Stdout,
    File(PathBuf),
    Socket(PathBuf),
}

/// The `--console` syntax: `stdout`, `off`, `file=PATH` or `socket=PATH`.
impl FromStr for ConsoleConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => return Ok(ConsoleConfig::Stdout),
            "off" => return Ok(ConsoleConfig::Off),
            _ => {}
        }
        if let Some(path) = s.strip_prefix("file=") {
            if path.is_empty() {
                return Err(ConfigError::ConsoleSyntax(
                    "file= needs a path, e.g. file=/tmp/hvc0.log",
                ));
            }
            return Ok(ConsoleConfig::File(PathBuf::from(path)));
        }
        if let Some(path) = s.strip_prefix("socket=") {
            if path.is_empty() {
                return Err(ConfigError::ConsoleSyntax(
                    "socket= needs a path, e.g. socket=/run/vm/console.sock",
                ));
            }
            return Ok(ConsoleConfig::Socket(PathBuf::from(path)));
        }
        Err(ConfigError::ConsoleSyntax(
            "expected stdout, off, file=PATH or socket=PATH",
        ))
    }
}

impl fmt::Display for ConsoleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleConfig::Off => f.write_str("off"),
            ConsoleConfig::Stdout => f.write_str("stdout"),
            ConsoleConfig::File(path) => write!(f, "file={}", path.display()),
            ConsoleConfig::Socket(path) => write!(f, "socket={}", path.display()),
        }
    }
}

/// A named virtio-console port backed by a unix socket chapeau listens on (like QEMU's
/// `virtserialport` + `chardev socket,server,nowait`). JSON: `{"name": N, "socket": P}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// The guest sees `/dev/virtio-ports/<name>`.
    pub name: String,
    pub socket: PathBuf,
}

/// Splits `key=value,key=value` into the values of `keys`, in that order. Keys may come in any
/// order and at most once; values cannot contain a comma (the separator). `form` is the syntax
/// shown in errors.
fn key_values<'a, const N: usize>(
    s: &'a str,
    keys: [&str; N],
    form: &str,
) -> Result<[Option<&'a str>; N], String> {
    let mut values = [None; N];
    for item in s.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("expected {form}, found {item:?} without '='"));
        };
        let Some(i) = keys.iter().position(|k| *k == key) else {
            return Err(format!("unknown key {key:?}: expected {form}"));
        };
        if values[i].is_some() {
            return Err(format!("{key}= given twice"));
        }
        values[i] = Some(value);
    }
    Ok(values)
}

/// `on` and `off`, for [`choice`].
const ON_OFF: [(&str, bool); 2] = [("on", true), ("off", false)];

/// The value of an enumerated key from `key_values`: what `value` maps to in `choices`, or
/// `default` when the key was not given. The error lists every accepted spelling, as
/// `key=X: expected key=a or key=b`.
fn choice<T: Copy>(
    key: &str,
    value: Option<&str>,
    choices: &[(&str, T)],
    default: T,
) -> Result<T, String> {
    let Some(value) = value else {
        return Ok(default);
    };
    if let Some((_, found)) = choices.iter().find(|(spelling, _)| *spelling == value) {
        return Ok(*found);
    }
    let mut expected: Vec<String> = choices.iter().map(|(s, _)| format!("{key}={s}")).collect();
    let last = expected.pop().unwrap_or_default();
    let expected = if expected.is_empty() {
        last
    } else {
        format!("{} or {last}", expected.join(", "))
    };
    Err(format!("{key}={value}: expected {expected}"))
}

const PORT_FORM: &str = "name=NAME,socket=PATH";

/// The `--port` syntax: `name=NAME,socket=PATH`, keys in any order.
impl FromStr for PortConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = |msg: String| Err(ConfigError::PortSyntax(msg));
        match key_values(s, ["name", "socket"], PORT_FORM).map_err(ConfigError::PortSyntax)? {
            [Some(name), Some(socket)] => Ok(PortConfig {
                name: name.to_string(),
                socket: PathBuf::from(socket),
            }),
            [None, _] => syntax(format!("missing name=NAME (expected {PORT_FORM})")),
            [_, None] => syntax(format!("missing socket=PATH (expected {PORT_FORM})")),
        }
    }
}

impl fmt::Display for PortConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "name={},socket={}", self.name, self.socket.display())
    }
}

/// How the guest sees a pmem image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PmemModel {
    /// An NVDIMM described by the ACPI NFIT (what Kata's QEMU gives its guests).
    #[default]
    Nvdimm,
    /// A virtio-pmem device on PCI (what Cloud Hypervisor gives its guests).
    Virtio,
}

impl PmemModel {
    pub fn as_str(self) -> &'static str {
        match self {
            PmemModel::Nvdimm => "nvdimm",
            PmemModel::Virtio => "virtio",
        }
    }
}

/// An image file mapped into guest physical memory, the guest's /dev/pmemN. JSON:
/// `{"file": P, "model": "nvdimm"|"virtio", "readonly": true|false}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemConfig {
    pub file: PathBuf,
    #[serde(default)]
    pub model: PmemModel,
    /// Read-only on the host too: the file is opened and mapped read-only and the guest's
    /// writes are dropped. Kata's shared rootfs image must be.
    #[serde(default = "default_true")]
    pub readonly: bool,
}

fn default_true() -> bool {
    true
}

const PMEM_FORM: &str = "file=PATH[,model=nvdimm|virtio][,readonly=on|off]";

/// The `--pmem` syntax: `file=PATH[,model=nvdimm|virtio][,readonly=on|off]`.
impl FromStr for PmemConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = |msg: String| ConfigError::PmemSyntax(msg);
        let [file, model, readonly] =
            key_values(s, ["file", "model", "readonly"], PMEM_FORM).map_err(syntax)?;
        let file = match file {
            Some("") => return Err(syntax("file= needs a path".into())),
            Some(file) => PathBuf::from(file),
            None => return Err(syntax(format!("missing file=PATH (expected {PMEM_FORM})"))),
        };
        let models = [("nvdimm", PmemModel::Nvdimm), ("virtio", PmemModel::Virtio)];
        let model = choice("model", model, &models, PmemModel::Nvdimm).map_err(syntax)?;
        let readonly = choice("readonly", readonly, &ON_OFF, true).map_err(syntax)?;
        Ok(PmemConfig {
            file,
            model,
            readonly,
        })
    }
}

impl fmt::Display for PmemConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "file={},model={},readonly={}",
            self.file.display(),
            self.model.as_str(),
            if self.readonly { "on" } else { "off" }
        )
    }
}

/// Who owns what the guest creates on a 9p share (QEMU's `security_model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecurityModel {
    /// Files belong to the VMM's user; failing ownership changes are not errors (Kata's).
    #[default]
    None,
    /// The guest's uid and gid are applied to what it creates and chowns.
    Passthrough,
}

impl SecurityModel {
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityModel::None => "none",
            SecurityModel::Passthrough => "passthrough",
        }
    }
}

/// A host directory shared with the guest over virtio-9p, mounted by its tag. JSON:
/// `{"tag": T, "path": DIR, "security_model": "none"|"passthrough", "readonly": bool}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    pub tag: String,
    pub path: PathBuf,
    #[serde(default)]
    pub security_model: SecurityModel,
    /// Every change the guest asks for fails with EROFS.
    #[serde(default)]
    pub readonly: bool,
}

const FS_FORM: &str = "tag=TAG,path=DIR[,security_model=none|passthrough][,readonly=on|off]";

/// The `--fs` syntax: `tag=TAG,path=DIR[,security_model=none|passthrough][,readonly=on|off]`.
impl FromStr for FsConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = |msg: String| ConfigError::FsSyntax(msg);
        let [tag, path, security_model, readonly] =
            key_values(s, ["tag", "path", "security_model", "readonly"], FS_FORM)
                .map_err(syntax)?;
        let tag = tag.ok_or_else(|| syntax(format!("missing tag=TAG (expected {FS_FORM})")))?;
        let path = path.ok_or_else(|| syntax(format!("missing path=DIR (expected {FS_FORM})")))?;
        let models = [
            ("none", SecurityModel::None),
            ("passthrough", SecurityModel::Passthrough),
        ];
        let security_model = choice(
            "security_model",
            security_model,
            &models,
            SecurityModel::None,
        )
        .map_err(syntax)?;
        let readonly = choice("readonly", readonly, &ON_OFF, false).map_err(syntax)?;
        Ok(FsConfig {
            tag: tag.to_string(),
            path: PathBuf::from(path),
            security_model,
            readonly,
        })
    }
}

impl fmt::Display for FsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tag={},path={},security_model={},readonly={}",
            self.tag,
            self.path.display(),
            self.security_model.as_str(),
            if self.readonly { "on" } else { "off" }
        )
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
    #[error("config file {} is {found}, not a regular file", path.display())]
    NotAFile { path: PathBuf, found: &'static str },
    #[error("config file {} is larger than {MAX_CONFIG_FILE_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf },
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
    #[error(
        "no guest kernel given: pass --kernel PATH or --config FILE (or --api-sock PATH to configure it over the API)"
    )]
    MissingKernel,
    /// A `--serial` value that is not `stdout`, `off` or `file=PATH`. Only the reason: clap
    /// already quotes the flag and the value around it.
    #[error("{0}")]
    SerialSyntax(&'static str),
    /// A bad `--console` value (only the reason, as for `--serial`).
    #[error("{0}")]
    ConsoleSyntax(&'static str),
    /// A bad `--port` value.
    #[error("{0}")]
    PortSyntax(String),
    /// A bad `--rng` value.
    #[error("{0}")]
    RngSyntax(&'static str),
    /// A bad `--pmem` value.
    #[error("{0}")]
    PmemSyntax(String),
    /// A bad `--net` value.
    #[error("{0}")]
    NetSyntax(String),
    /// A bad `--fs` value.
    #[error("{0}")]
    FsSyntax(String),
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
    /// The setting as a whole, for conflicts (`--serial` / `serial`).
    pub serial_any: &'static str,
    pub console: &'static str,
    pub port: &'static str,
    pub rng: &'static str,
    pub pmem: &'static str,
    pub net: &'static str,
    pub fs: &'static str,
}

const JSON_NAMES: SettingNames = SettingNames {
    vcpus: "machine.vcpus",
    memory: "machine.memory_mib",
    kernel: "boot.kernel",
    initrd: "boot.initrd",
    cmdline: "boot.cmdline",
    serial: "serial.file",
    serial_any: "serial",
    console: "console",
    port: "ports",
    rng: "rng.source",
    pmem: "pmem",
    net: "net",
    fs: "fs",
};

impl VmConfig {
    /// Parses a JSON document. Does not validate: call [`VmConfig::validate`].
    pub fn from_json(json: &str) -> Result<VmConfig, ConfigError> {
        parse_json("VM config", json)
    }

    /// Reads, parses and validates a config file; every error names the file.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let json = read_config_file(path)?;
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

        self.validate_console(names)?;

        if let Some(rng) = &self.rng {
            if rng.source.as_os_str().is_empty() {
                return invalid(names.rng, "\"\"".into(), "the path is empty".into());
            }
        }
        check_count(names.pmem, self.pmem.len(), MAX_PMEM_DEVICES, "pmem images")?;
        if self.pmem.iter().any(|p| p.file.as_os_str().is_empty()) {
            return invalid(names.pmem, "file=\"\"".into(), "the path is empty".into());
        }
        if let Err((value, reason)) = net::validate_nets(&self.net) {
            return invalid(names.net, value, reason);
        }
        self.validate_fs(names)
    }

    fn validate_fs(&self, names: &SettingNames) -> Result<(), ConfigError> {
        let invalid = |value, reason| invalid(names.fs, value, reason);
        check_count(
            names.fs,
            self.fs.len(),
            MAX_FS_DEVICES,
            "shared directories",
        )?;
        for (i, fs) in self.fs.iter().enumerate() {
            let tag = &fs.tag;
            let shown = format!("tag={tag:?}");
            if tag.is_empty() {
                return invalid(shown, "the tag is empty".into());
            }
            if tag.len() > MAX_FS_TAG_LEN {
                return invalid(
                    format!("({} bytes)", tag.len()),
                    format!("a tag is at most {MAX_FS_TAG_LEN} bytes"),
                );
            }
            if let Some(c) = tag
                .chars()
                .find(|&c| c == '\0' || c == ',' || c.is_whitespace())
            {
                return invalid(
                    shown,
                    format!("a tag cannot contain {c:?} (the guest mounts it by name)"),
                );
            }
            if self.fs[..i].iter().any(|other| other.tag == *tag) {
                return invalid(shown, "the tag is given twice".into());
            }
            if !fs.path.is_absolute() {
                return invalid(
                    format!("path={}", fs.path.display()),
                    "the path must be absolute".into(),
                );
            }
        }
        Ok(())
    }

    fn validate_console(&self, names: &SettingNames) -> Result<(), ConfigError> {
        match &self.console {
            ConsoleConfig::Off => {}
            ConsoleConfig::Stdout => {
                if self.serial == SerialConfig::Stdout {
                    return invalid(
                        names.console,
                        "stdout".into(),
                        format!(
                            "{} is stdout too and both cannot share it; set {} to off or a file",
                            names.serial_any, names.serial_any
                        ),
                    );
                }
            }
            ConsoleConfig::File(path) | ConsoleConfig::Socket(path) => {
                if path.as_os_str().is_empty() {
                    return invalid(names.console, "\"\"".into(), "the path is empty".into());
                }
            }
        }
        if let ConsoleConfig::Socket(path) = &self.console {
            if let Err(reason) = check_socket_path(path) {
                return invalid(names.console, self.console.to_string(), reason);
            }
        }

        check_count(names.port, self.ports.len(), MAX_PORTS, "named ports")?;
        for (i, port) in self.ports.iter().enumerate() {
            let name = &port.name;
            let shown = format!("name={name:?}");
            check_port_name(names.port, name)?;
            if self.ports[..i].iter().any(|p| p.name == *name) {
                return invalid(names.port, shown, "two ports have this name".into());
            }
            let socket = &port.socket;
            let shown_socket = format!("socket={}", socket.display());
            if socket.as_os_str().is_empty() {
                return invalid(names.port, shown, "the socket path is empty".into());
            }
            if let Err(reason) = check_socket_path(socket) {
                return invalid(names.port, shown_socket, reason);
            }
            if self.ports[..i].iter().any(|p| p.socket == *socket) {
                return invalid(names.port, shown_socket, "two ports use this socket".into());
            }
            if self.console == ConsoleConfig::Socket(socket.clone()) {
                return invalid(
                    names.port,
                    shown_socket,
                    format!("{} uses this socket too", names.console),
                );
            }
        }
        Ok(())
    }
}

/// Fails with [`ConfigError::Invalid`]: `value` is the part of `setting` that is wrong.
fn invalid(setting: &'static str, value: String, reason: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        setting,
        value,
        reason,
    })
}

/// A repeated setting given `given` times, at most `max`; `things` names them in the error.
fn check_count(
    setting: &'static str,
    given: usize,
    max: usize,
    things: &str,
) -> Result<(), ConfigError> {
    if given > max {
        return invalid(
            setting,
            String::new(),
            format!("{given} {things} given, at most {max} are supported"),
        );
    }
    Ok(())
}

/// A port name must be usable as `/dev/virtio-ports/<name>` in the guest. `setting` names it in
/// the error (`ports`, `--port`, `port`).
pub fn check_port_name(setting: &'static str, name: &str) -> Result<(), ConfigError> {
    let invalid = |value, reason| invalid(setting, value, reason);
    if name.is_empty() {
        return invalid(format!("name={name:?}"), "the port name is empty".into());
    }
    if name.len() > MAX_PORT_NAME_LEN {
        return invalid(
            format!("({} bytes)", name.len()),
            format!("a port name is at most {MAX_PORT_NAME_LEN} bytes"),
        );
    }
    if name == "." || name == ".." {
        return invalid(
            format!("name={name:?}"),
            "a port name cannot be \".\" or \"..\" (it names /dev/virtio-ports/<name>)".into(),
        );
    }
    if let Some(c) = name
        .chars()
        .find(|&c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return invalid(
            format!("name={name:?}"),
            format!(
                "a port name cannot contain {c:?}: no '/', whitespace or control characters \
                 (it names /dev/virtio-ports/<name>)"
            ),
        );
    }
    Ok(())
}

/// A VM config is a few hundred bytes; this bounds what a wrong path (a log, a device) costs.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// Reads a config file: a regular file (opened O_NONBLOCK, so a FIFO cannot hang us, and
/// checked on the descriptor), at most [`MAX_CONFIG_FILE_BYTES`].
fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let read_error = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(read_error)?;
    let file_type = file.metadata().map_err(read_error)?.file_type();
    if !file_type.is_file() {
        let found = if file_type.is_dir() {
            "a directory"
        } else if file_type.is_fifo() {
            "a FIFO"
        } else if file_type.is_char_device() || file_type.is_block_device() {
            "a device"
        } else {
            "a socket"
        };
        return Err(ConfigError::NotAFile {
            path: path.to_path_buf(),
            found,
        });
    }
    let mut json = String::new();
    file.take(MAX_CONFIG_FILE_BYTES + 1)
        .read_to_string(&mut json)
        .map_err(read_error)?;
    if json.len() as u64 > MAX_CONFIG_FILE_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(json)
}

/// A unix socket path must fit `sun_path` and cannot hold a NUL.
fn check_socket_path(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if bytes.contains(&0) {
        return Err("the socket path contains a NUL byte".into());
    }
    if bytes.len() > MAX_SOCKET_PATH_LEN {
        return Err(format!(
            "a unix socket path is at most {MAX_SOCKET_PATH_LEN} bytes, this one has {}",
            bytes.len()
        ));
    }
    Ok(())
}

fn parse_json(origin: &str, json: &str) -> Result<VmConfig, ConfigError> {
    serde_json::from_str(json).map_err(|source| ConfigError::Parse {
        origin: origin.to_string(),
        source,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A VM with every boot setting given: what `full_json_round_trip`'s JSON here and the
    /// CLI's `flags_build_config` flags both describe.
    pub(crate) fn sample() -> VmConfig {
        VmConfig {
            machine: MachineConfig {
                vcpus: 2,
                memory_mib: 512,
                thp: false,
            },
            boot: BootConfig {
                kernel: "/guest/vmlinux".into(),
                initrd: Some("/guest/initramfs.cpio.gz".into()),
                cmdline: "console=ttyS0 quiet".into(),
                pvm_params: PvmParams::Off,
            },
            serial: SerialConfig::File("/tmp/console.log".into()),
            // No devices: as `minimal_json_gets_defaults` spells out.
            ..minimal()
        }
    }

    fn minimal() -> VmConfig {
        VmConfig::from_json(r#"{"boot":{"kernel":"/k"}}"#).unwrap()
    }

    fn err_of(json: &str) -> String {
        VmConfig::from_json(json).unwrap_err().to_string()
    }

    /// The error a flag value's parse gives, as the user sees it.
    fn parse_err<T: FromStr<Err = ConfigError> + fmt::Debug>(s: &str) -> String {
        s.parse::<T>().unwrap_err().to_string()
    }

    fn validate_err(config: &VmConfig) -> String {
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn choice_names_every_accepted_spelling() {
        let modes = [("auto", 0), ("on", 1), ("off", 2)];
        assert_eq!(choice("vhost", None, &modes, 0), Ok(0));
        assert_eq!(choice("vhost", Some("off"), &modes, 0), Ok(2));
        assert_eq!(
            choice("vhost", Some("yes"), &modes, 0).unwrap_err(),
            "vhost=yes: expected vhost=auto, vhost=on or vhost=off"
        );
        assert_eq!(
            choice("readonly", Some("1"), &ON_OFF, true).unwrap_err(),
            "readonly=1: expected readonly=on or readonly=off"
        );
        let fs = "tag=a,path=/a,security_model=mapped".parse::<FsConfig>();
        assert_eq!(
            fs.unwrap_err().to_string(),
            "security_model=mapped: expected security_model=none or security_model=passthrough"
        );
    }

    #[test]
    fn minimal_json_gets_defaults() {
        let config = minimal();
        assert_eq!(
            config,
            VmConfig {
                machine: MachineConfig {
                    vcpus: 1,
                    memory_mib: 256,
                    thp: false,
                },
                boot: BootConfig {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: "console=ttyS0 reboot=k panic=1".into(),
                    pvm_params: PvmParams::Auto,
                },
                serial: SerialConfig::Stdout,
                console: ConsoleConfig::Off,
                ports: vec![],
                rng: None,
                pmem: vec![],
                net: vec![],
                fs: vec![],
            }
        );
        assert!(!config.has_virtio_console());
        config.validate().unwrap();
    }

    #[test]
    fn fs_json_defaults_and_validation() {
        let config = VmConfig::from_json(
            r#"{"boot":{"kernel":"/k"},"fs":[{"tag":"kataShared","path":"/run/s"},{"tag":"b","path":"/b","security_model":"passthrough","readonly":true}]}"#,
        )
        .unwrap();
        assert_eq!(config.fs[0].security_model, SecurityModel::None);
        assert!(!config.fs[0].readonly);
        assert_eq!(config.fs[1].security_model, SecurityModel::Passthrough);
        assert!(config.fs[1].readonly);
        config.validate().unwrap();
        let err = err_of(r#"{"boot":{"kernel":"/k"},"fs":[{"tag":"a","path":"/a","cache":1}]}"#);
        assert!(err.contains("unknown field `cache`"), "{err}");

        let invalid = |fs: Vec<FsConfig>| {
            let mut config = config.clone();
            config.fs = fs;
            config.validate().unwrap_err().to_string()
        };
        let share = |tag: &str, path: &str| FsConfig {
            tag: tag.into(),
            path: path.into(),
            security_model: SecurityModel::None,
            readonly: false,
        };
        assert_eq!(
            invalid(vec![share("", "/a")]),
            "invalid fs tag=\"\": the tag is empty"
        );
        assert_eq!(
            invalid(vec![share(&"t".repeat(MAX_FS_TAG_LEN + 1), "/a")]),
            "invalid fs (256 bytes): a tag is at most 255 bytes"
        );
        share(&"t".repeat(MAX_FS_TAG_LEN), "/a");
        assert_eq!(
            invalid(vec![share("a", "/a"), share("a", "/b")]),
            "invalid fs tag=\"a\": the tag is given twice"
        );
        assert_eq!(
            invalid(vec![share("a", "rel/dir")]),
            "invalid fs path=rel/dir: the path must be absolute"
        );
        assert!(invalid(vec![share("a b", "/a")]).contains("cannot contain ' '"));
    }

    #[test]
    fn pmem_json_defaults_to_a_read_only_nvdimm() {
        let config = VmConfig::from_json(
            r#"{"boot":{"kernel":"/k"},"pmem":[{"file":"/a"},{"file":"/b","model":"virtio","readonly":false}]}"#,
        )
        .unwrap();
        assert_eq!(config.pmem[0].model, PmemModel::Nvdimm);
        assert!(config.pmem[0].readonly);
        assert_eq!(config.pmem[1].model, PmemModel::Virtio);
        assert!(!config.pmem[1].readonly);
        config.validate().unwrap();
        let err = err_of(r#"{"boot":{"kernel":"/k"},"pmem":[{"file":"/a","model":"dimm"}]}"#);
        assert!(err.contains("unknown variant `dimm`"), "{err}");
        let err = err_of(r#"{"boot":{"kernel":"/k"},"pmem":[{"file":"/a","size":1}]}"#);
        assert!(err.contains("unknown field `size`"), "{err}");
        let mut config = minimal();
        config.pmem.push("file=".parse().unwrap_or(PmemConfig {
            file: "".into(),
            model: PmemModel::Nvdimm,
            readonly: true,
        }));
        assert_eq!(
            validate_err(&config),
            "invalid pmem file=\"\": the path is empty"
        );
    }

    #[test]
    fn partial_machine_keeps_other_default() {
        let config =
            VmConfig::from_json(r#"{"machine":{"vcpus":4},"boot":{"kernel":"/k"}}"#).unwrap();
        assert_eq!(config.machine.vcpus, 4);
        assert_eq!(config.machine.memory_mib, DEFAULT_MEMORY_MIB);
        assert!(!config.machine.thp);
        let config =
            VmConfig::from_json(r#"{"machine":{"thp":true},"boot":{"kernel":"/k"}}"#).unwrap();
        assert!(config.machine.thp);
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
        let expected = sample();
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
            parse_err::<SerialConfig>("file="),
            "file= needs a path, e.g. file=/tmp/console.log"
        );
        assert_eq!(
            parse_err::<SerialConfig>("tty"),
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

    fn with(extra: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_json(&format!(r#"{{"boot":{{"kernel":"/k"}},{extra}}}"#))
    }

    #[test]
    fn rng_forms() {
        assert_eq!(minimal().rng, None);
        assert_eq!(
            with(r#""rng":{}"#).unwrap().rng,
            Some(RngConfig {
                source: "/dev/urandom".into()
            })
        );
        assert_eq!(
            with(r#""rng":{"source":"/dev/hwrng"}"#).unwrap().rng,
            Some(RngConfig {
                source: "/dev/hwrng".into()
            })
        );
        assert_eq!(with(r#""rng":null"#).unwrap().rng, None);
        let msg = with(r#""rng":{"src":"/x"}"#).unwrap_err().to_string();
        assert!(msg.contains("unknown field `src`"), "{msg}");
        let mut config = minimal();
        config.rng = Some(RngConfig {
            source: PathBuf::new(),
        });
        assert_eq!(
            validate_err(&config),
            "invalid rng.source \"\": the path is empty"
        );
    }

    #[test]
    fn rng_from_str() {
        assert_eq!(
            "source=/dev/hwrng".parse::<RngConfig>().unwrap().source,
            PathBuf::from("/dev/hwrng")
        );
        assert_eq!(
            parse_err::<RngConfig>("source="),
            "source= needs a path, e.g. source=/dev/urandom"
        );
        assert_eq!(parse_err::<RngConfig>("/dev/hwrng"), "expected source=PATH");
        assert_eq!(RngConfig::default().to_string(), "source=/dev/urandom");
    }

    #[test]
    fn console_forms() {
        let parse = |c: &str| with(&format!(r#""serial":"off","console":{c}"#)).map(|c| c.console);
        assert_eq!(minimal().console, ConsoleConfig::Off);
        assert_eq!(parse(r#""off""#).unwrap(), ConsoleConfig::Off);
        assert_eq!(parse(r#""stdout""#).unwrap(), ConsoleConfig::Stdout);
        assert_eq!(
            parse(r#"{"file":"/tmp/c"}"#).unwrap(),
            ConsoleConfig::File("/tmp/c".into())
        );
        assert_eq!(
            parse(r#"{"socket":"/tmp/c.sock"}"#).unwrap(),
            ConsoleConfig::Socket("/tmp/c.sock".into())
        );
        assert!(parse(r#""socket""#).is_err());
        assert!(parse(r#""pty""#).is_err());
        assert!(parse(r#"{"pipe":"/x"}"#).is_err());

        let config = with(r#""serial":"off","console":{"socket":"/s"}"#).unwrap();
        let value = serde_json::to_value(&config).unwrap();
        assert_eq!(value["console"]["socket"], "/s");
        assert!(config.has_virtio_console());
    }

    #[test]
    fn console_from_str() {
        for (s, c) in [
            ("stdout", ConsoleConfig::Stdout),
            ("off", ConsoleConfig::Off),
            ("file=/a=b", ConsoleConfig::File("/a=b".into())),
            (
                "socket=/run/c.sock",
                ConsoleConfig::Socket("/run/c.sock".into()),
            ),
        ] {
            assert_eq!(s.parse::<ConsoleConfig>().unwrap(), c);
            assert_eq!(c.to_string(), s);
        }
        assert_eq!(
            parse_err::<ConsoleConfig>("socket="),
            "socket= needs a path, e.g. socket=/run/vm/console.sock"
        );
        assert_eq!(
            parse_err::<ConsoleConfig>("file="),
            "file= needs a path, e.g. file=/tmp/hvc0.log"
        );
        assert_eq!(
            parse_err::<ConsoleConfig>("tty"),
            "expected stdout, off, file=PATH or socket=PATH"
        );
    }

    #[test]
    fn console_stdout_conflicts_with_serial_stdout() {
        let mut config = minimal();
        config.console = ConsoleConfig::Stdout;
        assert_eq!(
            validate_err(&config),
            "invalid console stdout: serial is stdout too and both cannot share it; \
             set serial to off or a file"
        );
        config.serial = SerialConfig::Off;
        config.validate().unwrap();
        config.serial = SerialConfig::File("/tmp/s".into());
        config.validate().unwrap();
    }

    #[test]
    fn console_paths_validated() {
        let mut config = minimal();
        config.console = ConsoleConfig::File(PathBuf::new());
        assert_eq!(
            validate_err(&config),
            "invalid console \"\": the path is empty"
        );
        config.console = ConsoleConfig::Socket(PathBuf::from("/".repeat(108)));
        assert!(
            validate_err(&config).contains("a unix socket path is at most 107 bytes"),
            "{}",
            validate_err(&config)
        );
        config.console = ConsoleConfig::Socket(PathBuf::from("/".repeat(107)));
        config.validate().unwrap();
    }

    fn port(name: &str, socket: &str) -> PortConfig {
        PortConfig {
            name: name.into(),
            socket: socket.into(),
        }
    }

    #[test]
    fn ports_json() {
        let config = with(
            r#""ports":[{"name":"agent.channel.0","socket":"/run/a.sock"},{"name":"b","socket":"/b"}]"#,
        )
        .unwrap();
        assert_eq!(
            config.ports,
            vec![port("agent.channel.0", "/run/a.sock"), port("b", "/b")]
        );
        assert!(config.has_virtio_console());
        config.validate().unwrap();
        let msg = with(r#""ports":[{"name":"a","socket":"/a","mode":1}]"#)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("unknown field `mode`"), "{msg}");
        let msg = with(r#""ports":[{"name":"a"}]"#).unwrap_err().to_string();
        assert!(msg.contains("missing field `socket`"), "{msg}");
    }

    #[test]
    fn port_from_str() {
        assert_eq!(
            "name=agent.channel.0,socket=/run/a.sock"
                .parse::<PortConfig>()
                .unwrap(),
            port("agent.channel.0", "/run/a.sock")
        );
        assert_eq!(
            "socket=/s=x,name=n".parse::<PortConfig>().unwrap(),
            port("n", "/s=x")
        );
        let err = |s: &str| s.parse::<PortConfig>().unwrap_err().to_string();
        assert_eq!(
            err("name=a"),
            "missing socket=PATH (expected name=NAME,socket=PATH)"
        );
        assert_eq!(
            err("socket=/a"),
            "missing name=NAME (expected name=NAME,socket=PATH)"
        );
        assert_eq!(err("name=a,name=b,socket=/s"), "name= given twice");
        assert_eq!(
            err("name=a,path=/s"),
            "unknown key \"path\": expected name=NAME,socket=PATH"
        );
        assert_eq!(
            err("agent"),
            "expected name=NAME,socket=PATH, found \"agent\" without '='"
        );
        let p = port("a.b", "/x/y");
        assert_eq!(p.to_string().parse::<PortConfig>().unwrap(), p);
    }

    #[test]
    fn ports_validated() {
        let check = |ports: Vec<PortConfig>| {
            let mut config = minimal();
            config.ports = ports;
            config.validate().map_err(|e| e.to_string())
        };
        check(vec![port("agent.channel.0", "/a"), port("x", "/b")]).unwrap();
        assert_eq!(
            check(vec![port("", "/a")]).unwrap_err(),
            "invalid ports name=\"\": the port name is empty"
        );
        assert_eq!(
            check(vec![port(&"n".repeat(128), "/a")]).unwrap_err(),
            "invalid ports (128 bytes): a port name is at most 127 bytes"
        );
        check(vec![port(&"n".repeat(127), "/a")]).unwrap();
        assert_eq!(
            check(vec![port("a/b", "/a")]).unwrap_err(),
            "invalid ports name=\"a/b\": a port name cannot contain '/': no '/', whitespace or \
             control characters (it names /dev/virtio-ports/<name>)"
        );
        for dots in [".", ".."] {
            assert_eq!(
                check(vec![port(dots, "/a")]).unwrap_err(),
                format!(
                    "invalid ports name={dots:?}: a port name cannot be \".\" or \"..\" \
                     (it names /dev/virtio-ports/<name>)"
                )
            );
        }
        check(vec![port("...", "/a")]).unwrap();
        for (name, shown) in [
            ("a\u{1b}[2Jb", "'\\u{1b}'"),
            ("a\u{7f}", "'\\u{7f}'"),
            ("a b", "' '"),
            ("a\tb", "'\\t'"),
            ("a\0b", "'\\0'"),
        ] {
            let err = check(vec![port(name, "/a")]).unwrap_err();
            assert!(err.contains(&format!("cannot contain {shown}")), "{err}");
        }
        assert_eq!(
            check(vec![port("a", "/a"), port("a", "/b")]).unwrap_err(),
            "invalid ports name=\"a\": two ports have this name"
        );
        assert_eq!(
            check(vec![port("a", "/s"), port("b", "/s")]).unwrap_err(),
            "invalid ports socket=/s: two ports use this socket"
        );
        assert_eq!(
            check(vec![port("a", "")]).unwrap_err(),
            "invalid ports name=\"a\": the socket path is empty"
        );
        assert!(check(vec![port("a", &"/".repeat(200))])
            .unwrap_err()
            .contains("at most 107 bytes"));
        let many = (0..=MAX_PORTS)
            .map(|i| port(&format!("p{i}"), &format!("/s{i}")))
            .collect();
        assert_eq!(
            check(many).unwrap_err(),
            "invalid ports: 31 named ports given, at most 30 are supported"
        );

        let mut config = minimal();
        config.console = ConsoleConfig::Socket("/s".into());
        config.ports = vec![port("a", "/s")];
        assert_eq!(
            validate_err(&config),
            "invalid ports socket=/s: console uses this socket too"
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

        // Neither a FIFO (open(2) would wait for a writer forever) nor a device.
        let fifo = dir.join("fifo.json");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c_path` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        assert_eq!(
            VmConfig::from_file(&fifo).unwrap_err().to_string(),
            format!(
                "config file {} is a FIFO, not a regular file",
                fifo.display()
            )
        );
        assert_eq!(
            VmConfig::from_file(Path::new("/dev/zero"))
                .unwrap_err()
                .to_string(),
            "config file /dev/zero is a device, not a regular file"
        );
        assert_eq!(
            VmConfig::from_file(&dir).unwrap_err().to_string(),
            format!(
                "config file {} is a directory, not a regular file",
                dir.display()
            )
        );
        let huge = dir.join("huge.json");
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(MAX_CONFIG_FILE_BYTES + 1)
            .unwrap();
        assert!(VmConfig::from_file(&huge)
            .unwrap_err()
            .to_string()
            .ends_with("is larger than 1048576 bytes"));

        let good = dir.join("good.json");
        std::fs::write(&good, r#"{"boot":{"kernel":"/k"}}"#).unwrap();
        assert_eq!(VmConfig::from_file(&good).unwrap(), minimal());

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
