//! The `chapeau` command line: flags for the common case, or `--config vm.json`.

use std::path::PathBuf;

use clap::builder::PossibleValue;
use clap::{Parser, ValueEnum};

use crate::config::{
    BootConfig, ConfigError, ConsoleConfig, FsConfig, MachineConfig, NetConfig, PmemConfig,
    PortConfig, PvmParams, RngConfig, SerialConfig, SettingNames, VmConfig, DEFAULT_CMDLINE,
    DEFAULT_MEMORY_MIB, DEFAULT_VCPUS,
};

const LONG_ABOUT: &str = "\
chapeau is a minimal KVM virtual machine monitor for Kata Containers. It boots a Linux guest \
kernel directly (ELF vmlinux or bzImage) with only the devices Kata needs, and confines each of \
its threads with its own seccomp filter.

Describe the VM with flags, or with --config FILE: a JSON file in the same schema the REST API \
accepts. The guest's serial console goes where --serial says; chapeau's own log goes to stderr.";

/// Flags that describe the VM; `--config` replaces all of them.
const VM_FLAGS: [&str; 14] = [
    "kernel",
    "initrd",
    "cmdline",
    "cpus",
    "memory",
    "serial",
    "pvm_params",
    "console",
    "ports",
    "rng",
    "pmem",
    "fs",
    "thp",
    "net",
];

/// What a bare `--rng` means.
const RNG_DEFAULT_ARG: &str = "source=/dev/urandom";

#[derive(Debug, Clone, PartialEq, Parser)]
#[command(name = "chapeau", version, about = "A minimal KVM VMM for Kata Containers", long_about = LONG_ABOUT)]
pub struct Cli {
    /// Guest kernel to boot, an ELF vmlinux or a bzImage. Required unless --config is given.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk loaded into guest memory for the kernel to unpack. By default there is none.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Guest kernel command line, shorter than 2048 bytes.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Number of vCPUs, from 1 to 254.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_VCPUS)]
    pub cpus: u8,

    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEMORY_MIB)]
    pub memory: u64,

    /// Back guest RAM with transparent huge pages (more RSS, fewer TLB misses).
    #[arg(long)]
    pub thp: bool,

    /// Where the guest's first serial port (COM1, ttyS0) goes: stdout, file=PATH, or off to
    /// discard it.
    #[arg(long, value_name = "stdout|file=PATH|off", default_value_t = SerialConfig::Stdout)]
    pub serial: SerialConfig,

    /// Where the virtio console (port 0, the guest's hvc0; boot with console=hvc0) goes: stdout,
    /// file=PATH, socket=PATH (a unix socket chapeau listens on, one client at a time), or off.
    /// stdout cannot be shared with --serial stdout.
    #[arg(long, value_name = "stdout|file=PATH|socket=PATH|off", default_value_t = ConsoleConfig::Off)]
    pub console: ConsoleConfig,

    /// Adds a named virtio-console port, /dev/virtio-ports/NAME in the guest, backed by a unix
    /// socket chapeau listens on (one client at a time; the guest sees the port open while a
    /// client is connected). Repeat for more ports.
    #[arg(long = "port", value_name = "name=NAME,socket=PATH")]
    pub ports: Vec<PortConfig>,

    /// Adds a virtio-rng device reading entropy from PATH (default /dev/urandom).
    #[arg(long, value_name = "source=PATH", num_args = 0..=1, default_missing_value = RNG_DEFAULT_ARG)]
    pub rng: Option<RngConfig>,

    /// Maps an image file into guest memory as a persistent-memory device (/dev/pmemN): an
    /// NVDIMM described by ACPI (default, Kata's rootfs: root=/dev/pmem0p1 rootflags=dax) or
    /// virtio-pmem. Read-only unless readonly=off; the size must be a multiple of 2 MiB.
    /// Repeat for more.
    #[arg(
        long = "pmem",
        value_name = "file=PATH[,model=nvdimm|virtio][,readonly=on|off]"
    )]
    pub pmem: Vec<PmemConfig>,

    /// Adds a virtio-net interface on a tap: opened (or created) by name, or inherited as one
    /// descriptor per queue pair (fd=4:5, how Kata passes them, with vhostfd= for
    /// /dev/vhost-net descriptors). vhost=auto uses vhost-net where /dev/vhost-net exists,
    /// else chapeau's own datapath. Repeat for more interfaces.
    #[arg(
        long = "net",
        value_name = "tap=NAME,mac=MAC[,queues=N][,vhost=auto|on|off] | fd=N[:M..],mac=MAC[,vhostfd=K[:L..]]"
    )]
    pub net: Vec<NetConfig>,
    /// Shares host directory DIR with the guest over virtio-9p; the guest mounts it with
    /// `mount -t 9p -o trans=virtio,version=9p2000.L TAG /mnt`. security_model=none (default)
    /// creates files as chapeau's user, passthrough applies the guest's uid/gid; readonly=on
    /// refuses every change. Repeat for more.
    #[arg(
        long = "fs",
        value_name = "tag=TAG,path=DIR[,security_model=none|passthrough][,readonly=on|off]"
    )]
    pub fs: Vec<FsConfig>,

    /// Appends the guest kernel parameters a PVM host needs (PVM emulates guest kernel mode and
    /// cannot run some instructions there); auto = when /sys/module/kvm_pvm exists.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = PvmParams::Auto)]
    pub pvm_params: PvmParams,

    /// Read the whole VM description from a JSON file instead of the flags above.
    #[arg(long, value_name = "FILE", conflicts_with_all = VM_FLAGS)]
    pub config: Option<PathBuf>,

    /// Serve the REST API (HTTP/1.1) on this unix socket. Without --kernel or --config, chapeau
    /// starts with no VM and waits for the API to configure and start one. A stale socket file
    /// is replaced; one that something listens on is an error.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// This VM's id, as `GET /` reports it.
    #[arg(long, value_name = "ID", default_value = "chapeau")]
    pub id: String,

    /// How much chapeau logs to stderr.
    #[arg(long, value_enum, value_name = "LEVEL", default_value_t = LogLevel::Warn)]
    pub log_level: LogLevel,

    /// What each thread's seccomp filter does with a syscall outside its policy. Only
    /// `enforce` confines chapeau; `off` and `log` are for debugging a policy, and say so.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompMode::Enforce)]
    pub seccomp: SeccompMode,
}

/// Names validation errors after the flags, since that is what the user typed.
const FLAG_NAMES: SettingNames = SettingNames {
    vcpus: "--cpus",
    memory: "--memory",
    kernel: "--kernel",
    initrd: "--initrd",
    cmdline: "--cmdline",
    serial: "--serial",
    serial_any: "--serial",
    console: "--console",
    port: "--port",
    rng: "--rng",
    pmem: "--pmem",
    net: "--net",
    fs: "--fs",
};

impl Cli {
    /// The VM to boot at start: `None` when only the API is to configure it (--api-sock
    /// without --kernel or --config).
    pub fn boot_config(&self) -> Result<Option<VmConfig>, ConfigError> {
        if self.api_sock.is_some() && self.config.is_none() && self.kernel.is_none() {
            return Ok(None);
        }
        self.vm_config().map(Some)
    }

    /// The validated VM configuration, from `--config` or from the flags.
    pub fn vm_config(&self) -> Result<VmConfig, ConfigError> {
        if let Some(path) = &self.config {
            return VmConfig::from_file(path);
        }
        let kernel = self.kernel.clone().ok_or(ConfigError::MissingKernel)?;
        let config = VmConfig {
            machine: MachineConfig {
                vcpus: self.cpus,
                memory_mib: self.memory,
                thp: self.thp,
            },
            boot: BootConfig {
                kernel,
                initrd: self.initrd.clone(),
                cmdline: self.cmdline.clone(),
                pvm_params: self.pvm_params,
            },
            serial: self.serial.clone(),
            console: self.console.clone(),
            ports: self.ports.clone(),
            rng: self.rng.clone(),
            pmem: self.pmem.clone(),
            net: self.net.clone(),
            fs: self.fs.clone(),
        };
        config.validate_named(&FLAG_NAMES)?;
        Ok(config)
    }
}

/// `--log-level`. The vmm maps it onto its logger; this crate stays free of `log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, ValueEnum)]
pub enum LogLevel {
    Error,
    #[default]
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// `--seccomp`. The vmm turns it into the filters' action; this crate knows no BPF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum SeccompMode {
    /// No filter is installed.
    Off,
    /// The filters let a forbidden syscall through and the kernel logs it (SECCOMP_RET_LOG:
    /// dmesg or the audit log).
    Log,
    /// A forbidden syscall ends chapeau (status 159), naming the thread and the syscall.
    #[default]
    Enforce,
}

// Implemented here rather than derived in `config` so the schema types do not depend on clap.
impl ValueEnum for PvmParams {
    fn value_variants<'a>() -> &'a [Self] {
        &[PvmParams::Auto, PvmParams::On, PvmParams::Off]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let help = match self {
            PvmParams::Auto => "append them when /sys/module/kvm_pvm exists",
            PvmParams::On => "always append them",
            PvmParams::Off => "never append them",
        };
        Some(PossibleValue::new(self.as_str()).help(help))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PmemModel, SecurityModel};
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("chapeau").chain(args.iter().copied()))
    }

    fn config_of(args: &[&str]) -> Result<VmConfig, ConfigError> {
        parse(args).unwrap().vm_config()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_build_config() {
        let config = config_of(&[
            "--kernel",
            "/guest/vmlinux",
            "--initrd",
            "/guest/initramfs.cpio.gz",
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "2",
            "--memory",
            "512",
            "--serial",
            "file=/tmp/console.log",
            "--pvm-params",
            "off",
        ])
        .unwrap();
        assert_eq!(config, crate::config::tests::sample());
    }

    #[test]
    fn flag_defaults_match_json_defaults() {
        let cli = parse(&["--kernel", "/k"]).unwrap();
        assert_eq!(cli.log_level, LogLevel::Warn);
        assert_eq!(
            cli.vm_config().unwrap(),
            VmConfig::from_json(r#"{"boot":{"kernel":"/k"}}"#).unwrap()
        );
    }

    #[test]
    fn missing_kernel_is_precise() {
        let err = config_of(&["--cpus", "2"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no guest kernel given: pass --kernel PATH or --config FILE (or --api-sock PATH to \
             configure it over the API)"
        );
    }

    #[test]
    fn config_conflicts_with_vm_flags() {
        for flag in [
            &["--kernel", "/k"][..],
            &["--initrd", "/i"],
            &["--cmdline", "quiet"],
            &["--cpus", "2"],
            &["--memory", "512"],
            &["--serial", "off"],
            &["--pvm-params", "on"],
            &["--console", "off"],
            &["--port", "name=a,socket=/a"],
            &["--rng"],
        ] {
            let mut args = vec!["--config", "vm.json"];
            args.extend_from_slice(flag);
            let err = parse(&args).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ArgumentConflict, "{flag:?}");
        }
        // --log-level is about chapeau, not the VM, so it combines with --config.
        let cli = parse(&["--config", "vm.json", "--log-level", "debug"]).unwrap();
        assert_eq!(cli.log_level.as_str(), "debug");
    }

    #[test]
    fn config_file_is_read() {
        let path =
            std::env::temp_dir().join(format!("chapeau-cli-test-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"machine":{"vcpus":2},"boot":{"kernel":"/k"},"serial":"off"}"#,
        )
        .unwrap();
        let config = config_of(&["--config", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        let config = config.unwrap();
        assert_eq!(config.machine.vcpus, 2);
        assert_eq!(config.serial, SerialConfig::Off);

        let err = config_of(&["--config", "/nonexistent/vm.json"]).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot read config file /nonexistent/vm.json: "));
    }

    #[test]
    fn serial_flag_forms() {
        let serial = |v: &str| parse(&["--kernel", "/k", "--serial", v]).map(|c| c.serial);
        assert_eq!(serial("stdout").unwrap(), SerialConfig::Stdout);
        assert_eq!(serial("off").unwrap(), SerialConfig::Off);
        assert_eq!(
            serial("file=/tmp/s.log").unwrap(),
            SerialConfig::File("/tmp/s.log".into())
        );
        let err = serial("file=").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert!(err.to_string().contains("file= needs a path"), "{err}");
        let err = serial("pty").unwrap_err();
        assert!(
            err.to_string()
                .contains("expected stdout, off or file=PATH"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_named_after_flags() {
        let msg = |args: &[&str]| config_of(args).unwrap_err().to_string();
        assert_eq!(
            msg(&["--kernel", "/k", "--cpus", "0"]),
            "invalid --cpus 0: a VM needs at least 1 vCPU"
        );
        assert_eq!(
            msg(&["--kernel", "/k", "--cpus", "255"]),
            "invalid --cpus 255: at most 254 vCPUs are supported"
        );
        assert_eq!(
            msg(&["--kernel", "/k", "--memory", "0"]),
            "invalid --memory 0: a VM needs at least 1 MiB of memory"
        );
        let long = "x".repeat(3000);
        assert!(msg(&["--kernel", "/k", "--cmdline", &long]).starts_with("invalid --cmdline"));
        // Out of u8's range is caught by clap itself.
        assert_eq!(
            parse(&["--kernel", "/k", "--cpus", "256"])
                .unwrap_err()
                .kind(),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn pvm_params_and_log_level_values() {
        let pvm = |v: &str| parse(&["--kernel", "/k", "--pvm-params", v]).map(|c| c.pvm_params);
        assert_eq!(pvm("auto").unwrap(), PvmParams::Auto);
        assert_eq!(pvm("on").unwrap(), PvmParams::On);
        assert_eq!(pvm("off").unwrap(), PvmParams::Off);
        assert_eq!(pvm("maybe").unwrap_err().kind(), ErrorKind::InvalidValue);

        for level in [
            LogLevel::Error,
            LogLevel::Warn,
            LogLevel::Info,
            LogLevel::Debug,
            LogLevel::Trace,
        ] {
            let cli = parse(&["--kernel", "/k", "--log-level", level.as_str()]).unwrap();
            assert_eq!(cli.log_level, level);
        }
        assert!(parse(&["--kernel", "/k", "--log-level", "loud"]).is_err());
    }

    #[test]
    fn seccomp_mode_values() {
        let mode = |args: &[&str]| parse(args).map(|c| c.seccomp);
        assert_eq!(mode(&["--api-sock", "/s"]).unwrap(), SeccompMode::Enforce);
        for (word, want) in [
            ("off", SeccompMode::Off),
            ("log", SeccompMode::Log),
            ("enforce", SeccompMode::Enforce),
        ] {
            assert_eq!(
                mode(&["--api-sock", "/s", "--seccomp", word]).unwrap(),
                want
            );
        }
        // It is not a VM flag: it goes with --config too.
        assert!(mode(&["--config", "/c", "--seccomp", "log"]).is_ok());
        assert_eq!(
            mode(&["--api-sock", "/s", "--seccomp", "trap"])
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn rng_flag_forms() {
        let rng = |args: &[&str]| {
            let mut all = vec!["--kernel", "/k"];
            all.extend_from_slice(args);
            parse(&all).map(|c| c.vm_config().unwrap().rng)
        };
        assert_eq!(rng(&[]).unwrap(), None);
        assert_eq!(rng(&["--rng"]).unwrap(), Some(RngConfig::default()));
        // A bare --rng does not swallow the next flag.
        assert_eq!(
            rng(&["--rng", "--cpus", "2"]).unwrap(),
            Some(RngConfig::default())
        );
        assert_eq!(
            rng(&["--rng", "source=/dev/hwrng"]).unwrap(),
            Some(RngConfig {
                source: "/dev/hwrng".into()
            })
        );
        assert_eq!(
            rng(&["--rng=source=/dev/hwrng"]).unwrap(),
            Some(RngConfig {
                source: "/dev/hwrng".into()
            })
        );
        let err = rng(&["--rng", "/dev/hwrng"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert!(err.to_string().contains("expected source=PATH"), "{err}");
    }

    #[test]
    fn net_flag_forms() {
        let config = config_of(&[
            "--kernel",
            "/k",
            "--net",
            "tap=tap0,mac=52:54:00:00:00:01,queues=2",
            "--net",
            "fd=4,mac=52:54:00:00:00:02,vhostfd=3",
        ])
        .unwrap();
        assert_eq!(config.net.len(), 2);
        assert_eq!(config.net[0].tap.as_deref(), Some("tap0"));
        assert_eq!(config.net[1].vhost_fds, vec![3]);
        let msg = config_of(&[
            "--kernel",
            "/k",
            "--net",
            "tap=tap0,mac=52:54:00:00:00:01",
            "--net",
            "tap=tap1,mac=52:54:00:00:00:01",
        ])
        .unwrap_err()
        .to_string();
        assert_eq!(
            msg,
            "invalid --net mac=52:54:00:00:00:01: two interfaces have this MAC address"
        );
        let err = parse(&["--kernel", "/k", "--net", "tap=t"]).unwrap_err();
        assert!(err.to_string().contains("--net"), "{err}");
        assert!(err.to_string().contains("missing mac=MAC"), "{err}");
        let err = parse(&[
            "--config",
            "vm.json",
            "--net",
            "tap=t,mac=52:54:00:00:00:01",
        ]);
        assert_eq!(err.unwrap_err().kind(), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn fs_flag_forms() {
        let config = config_of(&[
            "--kernel",
            "/k",
            "--fs",
            "tag=kataShared,path=/run/shared",
            "--fs",
            "readonly=on,security_model=passthrough,path=/data,tag=data",
        ])
        .unwrap();
        assert_eq!(
            config.fs,
            vec![
                FsConfig {
                    tag: "kataShared".into(),
                    path: "/run/shared".into(),
                    security_model: SecurityModel::None,
                    readonly: false,
                },
                FsConfig {
                    tag: "data".into(),
                    path: "/data".into(),
                    security_model: SecurityModel::Passthrough,
                    readonly: true,
                },
            ]
        );
        assert_eq!(
            config.fs[1].to_string(),
            "tag=data,path=/data,security_model=passthrough,readonly=on"
        );
        let err = |value: &str| {
            parse(&["--kernel", "/k", "--fs", value])
                .unwrap_err()
                .to_string()
        };
        assert!(err("path=/a").contains("missing tag=TAG"));
        assert!(err("tag=a").contains("missing path=DIR"));
        assert!(err("tag=a,path=/a,security_model=mapped").contains("expected security_model=none"));
        let dup = config_of(&[
            "--kernel",
            "/k",
            "--fs",
            "tag=a,path=/a",
            "--fs",
            "tag=a,path=/b",
        ])
        .unwrap_err()
        .to_string();
        assert_eq!(dup, "invalid --fs tag=\"a\": the tag is given twice");
        let conflict = parse(&["--config", "/vm.json", "--fs", "tag=a,path=/a"]).unwrap_err();
        assert!(
            conflict.to_string().contains("cannot be used with"),
            "{conflict}"
        );
    }

    #[test]
    fn pmem_flag_forms() {
        let config = config_of(&[
            "--kernel",
            "/k",
            "--pmem",
            "file=/img/kata.img",
            "--pmem",
            "readonly=off,model=virtio,file=/img/rw.img",
        ])
        .unwrap();
        assert_eq!(
            config.pmem,
            vec![
                PmemConfig {
                    file: "/img/kata.img".into(),
                    model: PmemModel::Nvdimm,
                    readonly: true,
                },
                PmemConfig {
                    file: "/img/rw.img".into(),
                    model: PmemModel::Virtio,
                    readonly: false,
                },
            ]
        );
        assert!(!config.machine.thp);
        assert!(config_of(&["--kernel", "/k", "--thp"]).unwrap().machine.thp);
        assert_eq!(
            config.pmem[1].to_string(),
            "file=/img/rw.img,model=virtio,readonly=off"
        );
        let err = |value: &str| {
            parse(&["--kernel", "/k", "--pmem", value])
                .unwrap_err()
                .to_string()
        };
        for (value, reason) in [
            ("model=virtio", "missing file=PATH"),
            ("file=", "file= needs a path"),
            (
                "file=/a,model=dimm",
                "model=dimm: expected model=nvdimm or model=virtio",
            ),
            (
                "file=/a,readonly=yes",
                "readonly=yes: expected readonly=on or readonly=off",
            ),
            ("file=/a,file=/b", "file= given twice"),
            ("file=/a,size=1G", "unknown key \"size\""),
            ("/a", "without '='"),
        ] {
            let msg = err(value);
            assert!(
                msg.contains("--pmem") && msg.contains(reason),
                "{value}: {msg}"
            );
        }
        let many: Vec<String> = (0..=crate::config::MAX_PMEM_DEVICES)
            .flat_map(|i| ["--pmem".to_string(), format!("file=/img/{i}")])
            .collect();
        let mut args = vec!["--kernel", "/k"];
        args.extend(many.iter().map(String::as_str));
        let msg = config_of(&args).unwrap_err().to_string();
        assert_eq!(
            msg,
            "invalid --pmem: 9 pmem images given, at most 8 are supported"
        );
    }

    #[test]
    fn console_and_port_flags() {
        let config = config_of(&[
            "--kernel",
            "/k",
            "--serial",
            "off",
            "--console",
            "stdout",
            "--port",
            "name=agent.channel.0,socket=/run/agent.sock",
            "--port",
            "socket=/run/b.sock,name=b",
        ])
        .unwrap();
        assert_eq!(config.console, ConsoleConfig::Stdout);
        assert_eq!(
            config.ports,
            vec![
                PortConfig {
                    name: "agent.channel.0".into(),
                    socket: "/run/agent.sock".into()
                },
                PortConfig {
                    name: "b".into(),
                    socket: "/run/b.sock".into()
                },
            ]
        );
        assert!(config.has_virtio_console());

        let console = |v: &str| parse(&["--kernel", "/k", "--console", v]).map(|c| c.console);
        assert_eq!(
            console("socket=/run/c.sock").unwrap(),
            ConsoleConfig::Socket("/run/c.sock".into())
        );
        assert_eq!(
            console("file=/tmp/c").unwrap(),
            ConsoleConfig::File("/tmp/c".into())
        );
        assert_eq!(console("off").unwrap(), ConsoleConfig::Off);
        let err = console("pty").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert!(
            err.to_string()
                .contains("expected stdout, off, file=PATH or socket=PATH"),
            "{err}"
        );
        let err = parse(&["--kernel", "/k", "--port", "name=a"]).unwrap_err();
        assert!(err.to_string().contains("missing socket=PATH"), "{err}");
    }

    #[test]
    fn console_stdout_needs_serial_elsewhere() {
        assert_eq!(
            config_of(&["--kernel", "/k", "--console", "stdout"])
                .unwrap_err()
                .to_string(),
            "invalid --console stdout: --serial is stdout too and both cannot share it; \
             set --serial to off or a file"
        );
        config_of(&[
            "--kernel",
            "/k",
            "--console",
            "stdout",
            "--serial",
            "file=/tmp/s",
        ])
        .unwrap();
    }

    #[test]
    fn port_errors_are_named_after_the_flag() {
        let msg = |args: &[&str]| config_of(args).unwrap_err().to_string();
        assert_eq!(
            msg(&[
                "--kernel",
                "/k",
                "--port",
                "name=a,socket=/a",
                "--port",
                "name=a,socket=/b"
            ]),
            "invalid --port name=\"a\": two ports have this name"
        );
        assert_eq!(
            msg(&[
                "--kernel",
                "/k",
                "--console",
                "socket=/a",
                "--port",
                "name=a,socket=/a"
            ]),
            "invalid --port socket=/a: --console uses this socket too"
        );
    }

    #[test]
    fn help_documents_every_flag_and_default() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Kata Containers"), "{help}");
        // Every flag clap knows, with its own text (tests/tests/cli.rs checks the binary's list).
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            assert!(
                arg.get_help().is_some() && help.contains(&format!("--{long}")),
                "--{long} undocumented in --help"
            );
        }
        for default in [
            "[default: \"console=ttyS0 reboot=k panic=1\"]",
            "[default: 1]",
            "[default: 256]",
            "[default: stdout]",
            "[default: auto]",
            "[default: warn]",
            "[default: off]",
            "[default: enforce]",
        ] {
            assert!(
                help.contains(default),
                "{default} missing from --help:\n{help}"
            );
        }
    }
}
