//! The QEMU command line Kata's QEMU driver emits, translated into chapeau's one [`VmConfig`].
//! Both spellings Kata has used are accepted (`server,nowait` and `server=on,wait=off`, bare
//! flags and `=on`); options that change nothing for chapeau are accepted and ignored; devices
//! chapeau does not provide but Kata's paths do not need are accepted and reported in
//! [`QemuInvocation::notes`]; anything else is a [`QemuError`] worded the way QEMU words it.
//!
//! Devices refer to backends defined anywhere on the line (`-device virtconsole,chardev=c`
//! before `-chardev socket,id=c`), so every option is collected first and resolved after.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::path::PathBuf;

use super::opts::Opts;
use crate::config::{
    BootConfig, ConsoleConfig, FsConfig, MacAddr, MachineConfig, NetConfig, PmemConfig, PmemModel,
    PortConfig, RngConfig, SecurityModel, SerialConfig, VhostMode, VmConfig, MAX_VCPUS,
};

/// What QEMU calls itself in its errors; Kata shows the text to the user as is.
pub const QEMU_PROGRAM: &str = "qemu-system-x86_64";
/// QEMU's RAM size when `-m` is not given.
const QEMU_DEFAULT_MEMORY_MIB: u64 = 128;
const MIB: u64 = 1 << 20;

/// A command line chapeau cannot serve. Displayed the way QEMU prints it
/// (`qemu-system-x86_64: -foo: invalid option`); the binary prints it and exits 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{QEMU_PROGRAM}: {0}")]
pub struct QemuError(pub String);

impl QemuError {
    /// An error about one option and its argument: `-device bogus: <message>`.
    fn at(option: &str, arg: &str, message: impl fmt::Display) -> QemuError {
        QemuError(format!("-{option} {arg}: {message}"))
    }
}

/// Where QMP listens: `-qmp unix:PATH,server,nowait` or an inherited listening socket
/// (`-qmp unix:fd=N,...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEndpoint {
    Path(PathBuf),
    Fd(i32),
}

/// Everything a QEMU command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuInvocation {
    /// The VM, validated.
    pub config: VmConfig,
    pub qmp: Option<QmpEndpoint>,
    pub daemonize: bool,
    pub pidfile: Option<PathBuf>,
    /// `-D FILE`: where chapeau's log goes (stderr otherwise, which `-daemonize` closes).
    pub log_file: Option<PathBuf>,
    /// `-name`: the guest's name (Kata's `sandbox-<id>`).
    pub name: Option<String>,
    pub uuid: Option<String>,
    /// What was accepted but is not provided or is served differently; one line each, for the
    /// log.
    pub notes: Vec<String>,
}

/// Options chapeau knows, and whether each takes an argument.
const OPTIONS: &[(&str, bool)] = &[
    ("name", true),
    ("uuid", true),
    ("machine", true),
    ("M", true),
    ("enable-kvm", false),
    ("cpu", true),
    ("smp", true),
    ("m", true),
    ("kernel", true),
    ("initrd", true),
    ("append", true),
    ("object", true),
    ("numa", true),
    ("device", true),
    ("chardev", true),
    ("fsdev", true),
    ("netdev", true),
    ("global", true),
    ("qmp", true),
    ("daemonize", false),
    ("pidfile", true),
    ("vga", true),
    ("nodefaults", false),
    ("nographic", false),
    ("no-user-config", false),
    ("no-reboot", false),
    ("D", true),
    ("d", true),
];

/// Parses QEMU's arguments (without `argv[0]`).
pub fn parse_qemu_args<I, S>(args: I) -> Result<QemuInvocation, QemuError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut line = Line::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = utf8(arg.as_ref())?;
        let Some(flag) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
            return Err(QemuError(format!(
                "{arg}: disk images are not supported (chapeau boots -kernel)"
            )));
        };
        // QEMU accepts `--opt` for every `-opt`.
        let flag = flag.strip_prefix('-').unwrap_or(flag);
        let Some(&(name, takes_arg)) = OPTIONS.iter().find(|(name, _)| *name == flag) else {
            return Err(QemuError(format!("{arg}: invalid option")));
        };
        let value = if takes_arg {
            let value = args
                .next()
                .ok_or_else(|| QemuError(format!("{arg}: requires an argument")))?;
            Some(utf8(value.as_ref())?.to_string())
        } else {
            None
        };
        line.add(name, value.unwrap_or_default())?;
    }
    line.resolve()
}

fn utf8(arg: &OsStr) -> Result<&str, QemuError> {
    arg.to_str()
        .ok_or_else(|| QemuError(format!("{}: not valid UTF-8", arg.to_string_lossy())))
}

/// One `-option argument` kept for resolution, with its text for errors.
struct Given {
    option: &'static str,
    arg: String,
    opts: Opts,
}

impl Given {
    fn new(option: &'static str, arg: String, implied: &str) -> Given {
        let opts = Opts::parse(&arg, Some(implied));
        Given { option, arg, opts }
    }

    fn error(&self, message: impl fmt::Display) -> QemuError {
        QemuError::at(self.option, &self.arg, message)
    }

    /// A value QEMU requires.
    fn required(&mut self, key: &str) -> Result<String, QemuError> {
        self.opts
            .take(key)
            .ok_or_else(|| self.error(format_args!("Parameter '{key}' is missing")))
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>, QemuError> {
        let result = self.opts.take_bool(key);
        result.map_err(|e| self.error(e))
    }

    fn number<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, QemuError> {
        let result = self.opts.take_number(key);
        result.map_err(|e| self.error(e))
    }

    /// Refuses keys nobody took, as QEMU does for a device's properties (`owner` is the
    /// device model) or an option's parameters.
    fn finish(&self, owner: Option<&str>) -> Result<(), QemuError> {
        match (self.opts.leftover(), owner) {
            (None, _) => Ok(()),
            (Some(key), Some(owner)) => {
                Err(self.error(format_args!("Property '{owner}.{key}' not found")))
            }
            (Some(key), None) => Err(self.error(format_args!("Invalid parameter '{key}'"))),
        }
    }

    /// The `id=` every backend needs.
    fn id(&mut self) -> Result<String, QemuError> {
        self.required("id")
    }
}

/// Options in the order given; `-device` and backends are resolved once all are known.
#[derive(Default)]
struct Line {
    machine: Vec<Given>,
    cpu: Option<String>,
    smp: Option<Given>,
    memory: Option<Given>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
    objects: Vec<Given>,
    numa: Vec<Given>,
    devices: Vec<Given>,
    chardevs: Vec<Given>,
    fsdevs: Vec<Given>,
    netdevs: Vec<Given>,
    qmp: Option<String>,
    daemonize: bool,
    pidfile: Option<PathBuf>,
    log_file: Option<PathBuf>,
    name: Option<Given>,
    uuid: Option<String>,
    nodefaults: bool,
    nographic: bool,
}

impl Line {
    fn add(&mut self, option: &'static str, arg: String) -> Result<(), QemuError> {
        match option {
            "machine" | "M" => self.machine.push(Given::new("machine", arg, "type")),
            "enable-kvm" | "no-user-config" | "no-reboot" | "d" => {}
            "D" => self.log_file = Some(arg.into()),
            "cpu" => self.cpu = Some(arg),
            "smp" => self.smp = Some(Given::new(option, arg, "cpus")),
            "m" => self.memory = Some(Given::new(option, arg, "size")),
            "kernel" => self.kernel = Some(arg.into()),
            "initrd" => self.initrd = Some(arg.into()),
            "append" => self.append = Some(arg),
            "object" => self.objects.push(Given::new(option, arg, "qom-type")),
            "numa" => self.numa.push(Given::new(option, arg, "type")),
            "device" => self.devices.push(Given::new(option, arg, "driver")),
            "chardev" => self.chardevs.push(Given::new(option, arg, "backend")),
            "fsdev" => self.fsdevs.push(Given::new(option, arg, "fsdriver")),
            "netdev" => self.netdevs.push(Given::new(option, arg, "type")),
            "global" => check_global(&arg)?,
            "qmp" => {
                if self.qmp.is_some() {
                    return Err(QemuError::at(option, &arg, "only one -qmp is supported"));
                }
                self.qmp = Some(arg);
            }
            "daemonize" => self.daemonize = true,
            "pidfile" => self.pidfile = Some(arg.into()),
            "name" => self.name = Some(Given::new(option, arg, "guest")),
            "uuid" => self.uuid = Some(check_uuid(&arg)?),
            "vga" if arg == "none" => {}
            "vga" => {
                return Err(QemuError::at(
                    option,
                    &arg,
                    "chapeau provides no display: only -vga none",
                ))
            }
            "nodefaults" => self.nodefaults = true,
            "nographic" => self.nographic = true,
            _ => return Err(QemuError(format!("-{option}: invalid option"))),
        }
        Ok(())
    }

    fn resolve(mut self) -> Result<QemuInvocation, QemuError> {
        let mut notes = Vec::new();
        let machine = resolve_machine(&mut self.machine, &mut notes)?;
        if let Some(cpu) = &self.cpu {
            resolve_cpu(cpu, &mut notes)?;
        }
        let vcpus = self
            .smp
            .as_mut()
            .map(|smp| resolve_smp(smp, &mut notes))
            .transpose()?
            .unwrap_or(1);
        let memory_mib = self
            .memory
            .as_mut()
            .map(|m| resolve_memory(m, &mut notes))
            .transpose()?
            .unwrap_or(QEMU_DEFAULT_MEMORY_MIB);
        let backends = Backends::collect(&mut self, &mut notes)?;
        resolve_numa(&mut self.numa, &backends, memory_mib, &mut notes)?;
        let mut devices = Devices::new(backends);
        for device in &mut self.devices {
            devices.add(device, &mut notes)?;
        }
        if devices.nvdimms > 0 && !machine.nvdimm {
            return Err(QemuError(
                "nvdimm is not enabled: missing 'nvdimm' in '-M'".into(),
            ));
        }
        devices.check(&mut notes)?;

        let kernel = self.kernel.ok_or_else(|| {
            QemuError("no -kernel given: chapeau boots a Linux kernel directly".into())
        })?;
        if self.daemonize && self.nographic && !self.nodefaults {
            return Err(QemuError(
                "-nographic cannot be used with -daemonize".into(),
            ));
        }
        // `-nodefaults` removes QEMU's default COM1; `-nographic` puts it on stdio.
        let serial = if self.nographic && !self.nodefaults {
            SerialConfig::Stdout
        } else {
            SerialConfig::Off
        };
        let config = VmConfig {
            machine: MachineConfig {
                vcpus,
                memory_mib,
                thp: false,
            },
            boot: BootConfig {
                kernel,
                initrd: self.initrd,
                // QEMU passes an empty command line without -append.
                cmdline: self.append.unwrap_or_default(),
                pvm_params: Default::default(),
            },
            serial,
            console: devices.console.unwrap_or(ConsoleConfig::Off),
            ports: devices.ports,
            rng: devices.rng,
            pmem: devices.pmem,
            net: devices.net,
            fs: devices.fs,
        };
        config.validate().map_err(|e| QemuError(e.to_string()))?;
        let qmp = self.qmp.as_deref().map(resolve_qmp).transpose()?;
        let name = self
            .name
            .as_mut()
            .map(|name| {
                let guest = name.required("guest")?;
                name.opts.ignore(&["process", "debug-threads"]);
                name.finish(None)?;
                Ok(guest)
            })
            .transpose()?;
        Ok(QemuInvocation {
            config,
            qmp,
            daemonize: self.daemonize,
            pidfile: self.pidfile,
            log_file: self.log_file,
            name,
            uuid: self.uuid,
            notes,
        })
    }
}

/// `-global`: only the PIT tick policy Kata sets, which is what chapeau's PIT does.
fn check_global(arg: &str) -> Result<(), QemuError> {
    match arg.split_once('=') {
        Some(("kvm-pit.lost_tick_policy" | "kvm-pit.losttickpolicy", "discard")) => Ok(()),
        Some(("kvm-pit.lost_tick_policy" | "kvm-pit.losttickpolicy", other)) => Err(QemuError::at(
            "global",
            arg,
            format_args!(
                "lost_tick_policy={other} is not supported: chapeau's PIT discards lost ticks"
            ),
        )),
        _ => Err(QemuError::at(
            "global",
            arg,
            "not supported: chapeau accepts only kvm-pit.lost_tick_policy=discard",
        )),
    }
}

fn check_uuid(arg: &str) -> Result<String, QemuError> {
    let groups: Vec<&str> = arg.split('-').collect();
    let lengths_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
    if lengths_ok
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
    {
        Ok(arg.to_string())
    } else {
        Err(QemuError::at(
            "uuid",
            arg,
            "Fail to parse UUID string. Wrong format.",
        ))
    }
}

/// What `-machine` says that matters: whether NVDIMMs are enabled.
struct Machine {
    nvdimm: bool,
}

fn resolve_machine(given: &mut [Given], notes: &mut Vec<String>) -> Result<Machine, QemuError> {
    let mut machine = Machine { nvdimm: false };
    for m in given {
        if let Some(kind) = m.opts.take("type") {
            let known = kind == "pc"
                || kind == "q35"
                || kind.starts_with("pc-i440fx-")
                || kind.starts_with("pc-q35-");
            if !known {
                return Err(m.error("unsupported machine type: chapeau provides pc and q35"));
            }
            if kind.contains("q35") {
                notes.push(format!(
                    "machine {kind}: served as chapeau's one machine (PCI root bus, no PCIe ports)"
                ));
            }
        }
        if let Some(accel) = m.opts.take("accel") {
            if accel != "kvm" {
                return Err(m.error(format_args!("accel={accel}: chapeau runs on KVM only")));
            }
        }
        if let Some(irqchip) = m.opts.take_either(&["kernel_irqchip", "kernel-irqchip"]) {
            if irqchip != "on" && irqchip != "true" {
                return Err(m.error(format_args!(
                    "kernel_irqchip={irqchip} is not supported: chapeau uses the in-kernel irqchip"
                )));
            }
        }
        if let Some(nvdimm) = m.bool("nvdimm")? {
            machine.nvdimm = nvdimm;
        }
        // Settings QEMU's pc machine has that change nothing here.
        m.opts.ignore(&[
            "usb",
            "vmport",
            "smm",
            "dump-guest-core",
            "mem-merge",
            "graphics",
        ]);
        m.finish(None)?;
    }
    Ok(machine)
}

/// `-cpu host[,pmu=off]`: chapeau always gives the host's CPUID with the PMU hidden.
fn resolve_cpu(arg: &str, notes: &mut Vec<String>) -> Result<(), QemuError> {
    let mut given = Given::new("cpu", arg.to_string(), "model");
    let model = given.opts.take("model").unwrap_or_default();
    if model != "host" {
        return Err(given.error(format_args!(
            "unable to find CPU model '{model}': chapeau provides -cpu host"
        )));
    }
    if given.bool("pmu")? == Some(true) {
        notes.push("-cpu pmu=on: served with the PMU hidden".into());
    }
    given.finish(Some("host-x86_64-cpu"))
}

/// `-smp N,cores=,threads=,sockets=,dies=,maxcpus=`: chapeau's vCPU count.
fn resolve_smp(smp: &mut Given, notes: &mut Vec<String>) -> Result<u8, QemuError> {
    let cpus: Option<u32> = smp.number("cpus")?;
    let sockets: Option<u32> = smp.number("sockets")?;
    let dies: Option<u32> = smp.number("dies")?;
    let cores: Option<u32> = smp.number("cores")?;
    let threads: Option<u32> = smp.number("threads")?;
    let maxcpus: Option<u32> = smp.number("maxcpus")?;
    smp.finish(None)?;
    let topology = [sockets, dies, cores, threads]
        .iter()
        .try_fold(1u32, |product, n| product.checked_mul(n.unwrap_or(1)))
        .unwrap_or(u32::MAX);
    let cpus = cpus.unwrap_or(topology);
    let maxcpus = maxcpus.unwrap_or(cpus);
    if sockets.is_some() && cores.is_some() && threads.is_some() && topology != maxcpus {
        return Err(smp.error(format_args!(
            "Invalid CPU topology: product of the hierarchy must match maxcpus: sockets ({}) * \
             dies ({}) * cores ({}) * threads ({}) != maxcpus ({maxcpus})",
            sockets.unwrap_or(1),
            dies.unwrap_or(1),
            cores.unwrap_or(1),
            threads.unwrap_or(1)
        )));
    }
    if maxcpus < cpus {
        return Err(smp.error(format_args!(
            "maxcpus must be equal to or greater than smp: {cpus} > {maxcpus}"
        )));
    }
    let vcpus = u8::try_from(cpus)
        .ok()
        .filter(|n| *n <= MAX_VCPUS && *n > 0)
        .ok_or_else(|| {
            smp.error(format_args!(
                "Invalid SMP CPUs {cpus}. chapeau supports 1 to {MAX_VCPUS}"
            ))
        })?;
    if maxcpus > cpus {
        notes.push(format!(
            "-smp maxcpus={maxcpus}: CPU hotplug is not provided, the VM has {cpus} vCPUs"
        ));
    }
    Ok(vcpus)
}

/// A QEMU size: a number with an optional k/M/G/T suffix; `default_unit` applies without one
/// (MiB for `-m`, bytes elsewhere).
fn parse_size(text: &str, default_unit: u64) -> Option<u64> {
    let (digits, unit) = match text.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return None,
            };
            (&text[..i], 1u64 << shift)
        }
        _ => (text, default_unit),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

const SIZE_ERROR: &str = "expects a non-negative number below 2^64; optional suffix k, M, G, T, \
P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively";

/// `-m SIZE[,slots=N,maxmem=SIZE]`: guest RAM in MiB (rounded up).
fn resolve_memory(m: &mut Given, notes: &mut Vec<String>) -> Result<u64, QemuError> {
    let size = m.required("size")?;
    let bytes = parse_size(&size, MIB)
        .filter(|b| *b > 0)
        .ok_or_else(|| m.error(format_args!("Parameter 'size' {SIZE_ERROR}")))?;
    let slots: Option<u32> = m.number("slots")?;
    let maxmem = m
        .opts
        .take("maxmem")
        .map(|text| {
            parse_size(&text, 1)
                .ok_or_else(|| m.error(format_args!("Parameter 'maxmem' {SIZE_ERROR}")))
        })
        .transpose()?;
    m.finish(None)?;
    if let Some(maxmem) = maxmem {
        if maxmem < bytes {
            return Err(m.error(format_args!(
                "invalid value of -m option maxmem: maximum memory size (0x{maxmem:x}) must be at \
                 least the initial memory size (0x{bytes:x})"
            )));
        }
    }
    if slots.unwrap_or(0) > 0 || maxmem.is_some_and(|max| max > bytes) {
        notes.push(format!(
            "-m {}: memory hotplug is not provided, the VM has {} MiB",
            m.arg,
            bytes.div_ceil(MIB)
        ));
    }
    Ok(bytes.div_ceil(MIB))
}

/// `-qmp unix:PATH,server,nowait` (or `server=on,wait=off`, or `unix:fd=N`).
fn resolve_qmp(arg: &str) -> Result<QmpEndpoint, QemuError> {
    let mut given = Given::new("qmp", arg.to_string(), "spec");
    let spec = given.opts.take("spec").unwrap_or_default();
    // `unix:fd=N` splits at its '=' into the key `unix:fd`.
    let endpoint = match (spec.strip_prefix("unix:"), given.opts.take("unix:fd")) {
        (_, Some(fd)) => {
            QmpEndpoint::Fd(fd.parse::<i32>().ok().filter(|fd| *fd > 2).ok_or_else(|| {
                given.error(format_args!("fd={fd} is not an inherited descriptor"))
            })?)
        }
        (Some(path), None) if !path.is_empty() => QmpEndpoint::Path(path.into()),
        _ => {
            return Err(
                given.error("chapeau serves QMP on a unix socket only: unix:PATH or unix:fd=N")
            )
        }
    };
    if given.bool("server")? != Some(true) {
        return Err(given.error("chapeau listens for QMP clients: add server=on"));
    }
    if given.bool("wait")? == Some(true) {
        return Err(given.error("wait=on is not supported: chapeau starts the VM without waiting"));
    }
    given.finish(None)?;
    Ok(endpoint)
}

/// The backends devices refer to, by id.
#[derive(Default)]
struct Backends {
    memory: HashMap<String, MemoryBackend>,
    rng: HashMap<String, PathBuf>,
    chardevs: HashMap<String, Chardev>,
    fsdevs: HashMap<String, (PathBuf, SecurityModel, bool)>,
    netdevs: HashMap<String, NetConfig>,
}

struct MemoryBackend {
    /// `mem-path` of a memory-backend-file.
    file: Option<PathBuf>,
    size: u64,
    /// Guest writes reach the file (`share=on` without `readonly=on`).
    writable: bool,
}

#[derive(Clone)]
enum Chardev {
    Socket(PathBuf),
    File(PathBuf),
}

fn insert_unique<T>(
    map: &mut HashMap<String, T>,
    given: &Given,
    kind: &str,
    id: String,
    value: T,
) -> Result<(), QemuError> {
    if map.contains_key(&id) {
        return Err(given.error(format_args!("Duplicate ID '{id}' for {kind}")));
    }
    map.insert(id, value);
    Ok(())
}

impl Backends {
    fn collect(line: &mut Line, notes: &mut Vec<String>) -> Result<Backends, QemuError> {
        let mut backends = Backends::default();
        for object in &mut line.objects {
            backends.add_object(object)?;
        }
        for chardev in &mut line.chardevs {
            let backend = chardev.opts.take("backend").unwrap_or_default();
            let id = chardev.id()?;
            let value = match backend.as_str() {
                "socket" => {
                    let path = chardev.required("path")?;
                    if chardev.bool("server")? != Some(true) {
                        return Err(
                            chardev.error("chapeau listens on chardev sockets: add server=on")
                        );
                    }
                    if chardev.bool("wait")? == Some(true) {
                        return Err(chardev.error(
                            "wait=on is not supported: chapeau starts the VM without waiting",
                        ));
                    }
                    chardev.opts.ignore(&["nodelay"]);
                    Chardev::Socket(path.into())
                }
                "file" => Chardev::File(chardev.required("path")?.into()),
                other => {
                    return Err(
                        chardev.error(format_args!("'{other}' is not a valid char driver name"))
                    )
                }
            };
            chardev.finish(None)?;
            insert_unique(&mut backends.chardevs, chardev, "chardev", id, value)?;
        }
        for fsdev in &mut line.fsdevs {
            let driver = fsdev.opts.take("fsdriver").unwrap_or_default();
            if driver != "local" {
                return Err(fsdev.error(format_args!(
                    "fsdev: fsdriver {driver} not found: chapeau provides local"
                )));
            }
            let id = fsdev.id()?;
            let path = fsdev.required("path")?;
            let model = match fsdev.required("security_model")?.as_str() {
                "none" => SecurityModel::None,
                "passthrough" => SecurityModel::Passthrough,
                other => {
                    return Err(fsdev.error(format_args!(
                        "security_model={other} is not supported: none or passthrough"
                    )))
                }
            };
            let readonly = fsdev.bool("readonly")?.unwrap_or(false);
            fsdev
                .opts
                .ignore(&["multidevs", "writeout", "fmode", "dmode"]);
            fsdev.finish(None)?;
            insert_unique(
                &mut backends.fsdevs,
                fsdev,
                "fsdev",
                id,
                (path.into(), model, readonly),
            )?;
        }
        for netdev in &mut line.netdevs {
            let (id, net) = resolve_netdev(netdev, notes)?;
            insert_unique(&mut backends.netdevs, netdev, "netdev", id, net)?;
        }
        Ok(backends)
    }

    fn add_object(&mut self, object: &mut Given) -> Result<(), QemuError> {
        let kind = object.opts.take("qom-type").unwrap_or_default();
        let id = object.id()?;
        match kind.as_str() {
            "memory-backend-file" | "memory-backend-ram" => {
                let file = if kind == "memory-backend-file" {
                    Some(PathBuf::from(object.required("mem-path")?))
                } else {
                    None
                };
                let size = object.required("size")?;
                let size = parse_size(&size, 1)
                    .filter(|s| *s > 0)
                    .ok_or_else(|| object.error(format_args!("Parameter 'size' {SIZE_ERROR}")))?;
                let share = object.bool("share")?.unwrap_or(false);
                let readonly = object.bool("readonly")?.unwrap_or(false);
                object.opts.ignore(&[
                    "prealloc",
                    "discard-data",
                    "align",
                    "pmem",
                    "dump",
                    "merge",
                    "host-nodes",
                    "policy",
                    "x-use-canonical-path-for-ramblock-id",
                ]);
                let backend = MemoryBackend {
                    file,
                    size,
                    writable: share && !readonly,
                };
                object.finish(None)?;
                insert_unique(&mut self.memory, object, "object", id, backend)
            }
            "rng-random" | "rng-builtin" => {
                let source = if kind == "rng-random" {
                    object.opts.take("filename")
                } else {
                    None
                };
                object.finish(None)?;
                let source = source.map_or_else(|| RngConfig::default().source, PathBuf::from);
                insert_unique(&mut self.rng, object, "object", id, source)
            }
            other => Err(object.error(format_args!("invalid object type: {other}"))),
        }
    }
}

/// `-netdev tap,id=,fds=A:B,vhostfds=C:D,vhost=on|off` (or `fd=`, `vhostfd=`, `ifname=`).
fn resolve_netdev(
    netdev: &mut Given,
    notes: &mut Vec<String>,
) -> Result<(String, NetConfig), QemuError> {
    let kind = netdev.opts.take("type").unwrap_or_default();
    if kind != "tap" {
        return Err(netdev.error(format_args!(
            "Parameter 'type' does not accept value '{kind}': chapeau provides tap"
        )));
    }
    let id = netdev.id()?;
    let fds_list = |netdev: &mut Given, keys: &[&str]| -> Result<Vec<i32>, QemuError> {
        let Some(list) = netdev.opts.take_either(keys) else {
            return Ok(Vec::new());
        };
        list.split(':')
            .map(|fd| {
                fd.parse::<i32>().map_err(|_| {
                    netdev.error(format_args!(
                        "{}={list}: expected descriptor numbers",
                        keys[0]
                    ))
                })
            })
            .collect()
    };
    let fds = fds_list(netdev, &["fds", "fd"])?;
    let vhost_fds = fds_list(netdev, &["vhostfds", "vhostfd"])?;
    let tap = netdev.opts.take("ifname");
    for script in ["script", "downscript"] {
        if let Some(value) = netdev.opts.take(script) {
            if !value.is_empty() && value != "no" {
                return Err(netdev.error(format_args!(
                    "{script}={value}: chapeau runs no network scripts, use {script}=no"
                )));
            }
        }
    }
    let vhost = match (netdev.bool("vhost")?, vhost_fds.is_empty()) {
        (Some(false), _) => VhostMode::Off,
        (Some(true), _) | (None, false) => VhostMode::On,
        // Without vhost=, the datapath is chapeau's choice; the guest sees the same device.
        (None, true) => VhostMode::Auto,
    };
    let queues: Option<u16> = netdev.number("queues")?;
    netdev.opts.ignore(&["vhostforce", "vnet_hdr", "sndbuf"]);
    netdev.finish(None)?;
    if tap.is_some() && fds.is_empty() {
        notes.push(format!("-netdev {}: the tap is opened by name", netdev.arg));
    }
    let queues = queues.unwrap_or_else(|| u16::try_from(fds.len().max(1)).unwrap_or(u16::MAX));
    let net = NetConfig {
        id: Some(id.clone()),
        tap,
        fds,
        // Filled in by the virtio-net-pci device that uses this netdev.
        mac: MacAddr([0; 6]),
        queues,
        vhost,
        vhost_fds,
    };
    Ok((id, net))
}

/// `-numa node,memdev=ID`: one node whose RAM is a memory backend of `-m`'s size.
fn resolve_numa(
    numa: &mut [Given],
    backends: &Backends,
    memory_mib: u64,
    notes: &mut Vec<String>,
) -> Result<(), QemuError> {
    if numa.len() > 1 {
        return Err(numa[1].error("chapeau provides one NUMA node"));
    }
    let Some(node) = numa.first_mut() else {
        return Ok(());
    };
    let kind = node.opts.take("type").unwrap_or_default();
    if kind != "node" {
        return Err(node.error(format_args!(
            "Invalid parameter value for 'type': {kind}: chapeau accepts -numa node"
        )));
    }
    node.opts.ignore(&["nodeid", "cpus", "initiator"]);
    if let Some(memdev) = node.opts.take("memdev") {
        let backend = backends.memory.get(&memdev).ok_or_else(|| {
            node.error(format_args!(
                "memdev={memdev}: no memory backend with this id"
            ))
        })?;
        let ram = memory_mib.saturating_mul(MIB);
        if backend.size != ram {
            return Err(QemuError(format!(
                "total memory for NUMA nodes (0x{:x}) should equal RAM size (0x{ram:x})",
                backend.size
            )));
        }
        if let Some(file) = &backend.file {
            notes.push(format!(
                "-numa memdev={memdev} (mem-path={}): guest RAM is served as anonymous memory",
                file.display()
            ));
        }
    }
    node.finish(None)
}

/// Devices as they are added, and which backends they took.
struct Devices {
    backends: Backends,
    /// Backend ids already attached to a device.
    used: Vec<String>,
    serial_bus: bool,
    console: Option<ConsoleConfig>,
    ports: Vec<PortConfig>,
    rng: Option<RngConfig>,
    pmem: Vec<PmemConfig>,
    nvdimms: usize,
    net: Vec<NetConfig>,
    fs: Vec<FsConfig>,
    legacy_noted: bool,
}

/// Properties every PCI device has that change nothing for chapeau.
const PCI_PROPERTIES: &[&str] = &[
    "id",
    "bus",
    "addr",
    "romfile",
    "rombar",
    "multifunction",
    "disable-legacy",
    "iommu_platform",
    "ats",
    "vectors",
];

impl Devices {
    fn new(backends: Backends) -> Devices {
        Devices {
            backends,
            used: Vec::new(),
            serial_bus: false,
            console: None,
            ports: Vec::new(),
            rng: None,
            pmem: Vec::new(),
            nvdimms: 0,
            net: Vec::new(),
            fs: Vec::new(),
            legacy_noted: false,
        }
    }

    /// Takes `key=ID` and marks the backend used; QEMU refuses a backend two devices share.
    fn take_ref(
        &mut self,
        device: &mut Given,
        driver: &str,
        key: &str,
    ) -> Result<String, QemuError> {
        let id = device.required(key)?;
        if self.used.contains(&id) {
            return Err(device.error(format_args!(
                "Property '{driver}.{key}' can't take value '{id}', it's in use"
            )));
        }
        self.used.push(id.clone());
        Ok(id)
    }

    fn not_found(device: &Given, driver: &str, key: &str, id: &str) -> QemuError {
        device.error(format_args!(
            "Property '{driver}.{key}' can't find value '{id}'"
        ))
    }

    fn add(&mut self, device: &mut Given, notes: &mut Vec<String>) -> Result<(), QemuError> {
        let driver = device.required("driver")?;
        if device.bool("disable-modern")? == Some(true) && !self.legacy_noted {
            self.legacy_noted = true;
            notes.push(
                "disable-modern=true: served as modern virtio (the guest drivers negotiate either)"
                    .into(),
            );
        }
        match driver.as_str() {
            "virtio-serial-pci" | "virtio-serial" => {
                device.opts.ignore(&["max_ports"]);
                self.serial_bus = true;
            }
            "virtconsole" | "virtserialport" => self.add_port(device, &driver)?,
            "nvdimm" | "virtio-pmem-pci" => self.add_pmem(device, &driver)?,
            "virtio-rng" | "virtio-rng-pci" => {
                if self.rng.is_some() {
                    return Err(device.error("chapeau provides one virtio-rng device"));
                }
                let source = match device.opts.take("rng") {
                    Some(id) => self
                        .backends
                        .rng
                        .get(&id)
                        .cloned()
                        .ok_or_else(|| Self::not_found(device, &driver, "rng", &id))?,
                    None => RngConfig::default().source,
                };
                device.opts.ignore(&["max-bytes", "period"]);
                self.rng = Some(RngConfig { source });
            }
            "virtio-9p-pci" => {
                let id = self.take_ref(device, &driver, "fsdev")?;
                let (path, security_model, readonly) = self
                    .backends
                    .fsdevs
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| Self::not_found(device, &driver, "fsdev", &id))?;
                let tag = device.required("mount_tag")?;
                self.fs.push(FsConfig {
                    tag,
                    path,
                    security_model,
                    readonly,
                });
            }
            "virtio-net-pci" => {
                let id = self.take_ref(device, &driver, "netdev")?;
                let mut net = self
                    .backends
                    .netdevs
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| Self::not_found(device, &driver, "netdev", &id))?;
                net.mac = match device.opts.take("mac") {
                    Some(mac) => mac.parse::<MacAddr>().map_err(|_| {
                        device.error(format_args!(
                            "Property '{driver}.mac' doesn't take value '{mac}'"
                        ))
                    })?,
                    // QEMU's default: 52:54:00:12:34:56 for the first NIC, then counting up.
                    None => MacAddr([
                        0x52,
                        0x54,
                        0,
                        0x12,
                        0x34,
                        0x56u8.wrapping_add(self.net.len() as u8),
                    ]),
                };
                // mq=on only tells the guest multiqueue exists; the queue count is the netdev's.
                let _ = device.bool("mq")?;
                device
                    .opts
                    .ignore(&["host_mtu", "mrg_rxbuf", "csum", "guest_csum"]);
                self.net.push(net);
            }
            "pci-bridge" | "virtio-scsi-pci" => {
                notes.push(format!(
                    "-device {}: not provided ({driver} is not used by Kata's pmem rootfs and \
                     9p paths)",
                    device.arg
                ));
                // Nothing is built from it: its properties cannot matter.
                device.opts = Opts::parse("", None);
            }
            other => {
                return Err(device.error(format_args!("'{other}' is not a valid device model name")))
            }
        }
        device.opts.ignore(PCI_PROPERTIES);
        device.finish(Some(&driver))
    }

    fn add_port(&mut self, device: &mut Given, driver: &str) -> Result<(), QemuError> {
        let id = self.take_ref(device, driver, "chardev")?;
        let chardev = self
            .backends
            .chardevs
            .get(&id)
            .cloned()
            .ok_or_else(|| Self::not_found(device, driver, "chardev", &id))?;
        device.opts.ignore(&["nr"]);
        if driver == "virtconsole" {
            if self.console.is_some() {
                return Err(device.error("chapeau provides one virtconsole (hvc0)"));
            }
            device.opts.ignore(&["name"]);
            self.console = Some(match chardev {
                Chardev::Socket(path) => ConsoleConfig::Socket(path),
                Chardev::File(path) => ConsoleConfig::File(path),
            });
            return Ok(());
        }
        let name = device.required("name")?;
        let Chardev::Socket(socket) = chardev else {
            return Err(device.error(format_args!(
                "chardev {id}: chapeau serves named ports on unix sockets (-chardev socket)"
            )));
        };
        self.ports.push(PortConfig { name, socket });
        Ok(())
    }

    fn add_pmem(&mut self, device: &mut Given, driver: &str) -> Result<(), QemuError> {
        let id = self.take_ref(device, driver, "memdev")?;
        let backend = self
            .backends
            .memory
            .get(&id)
            .ok_or_else(|| Self::not_found(device, driver, "memdev", &id))?;
        let file = backend.file.clone().ok_or_else(|| {
            device.error(format_args!(
                "memdev={id}: chapeau maps pmem from a file (memory-backend-file)"
            ))
        })?;
        let writable = backend.writable;
        let model = if driver == "nvdimm" {
            self.nvdimms += 1;
            device.opts.ignore(&["slot", "node", "label-size", "uuid"]);
            PmemModel::Nvdimm
        } else {
            PmemModel::Virtio
        };
        let unarmed = device.bool("unarmed")?.unwrap_or(false);
        // Without share=on QEMU maps the image privately: guest writes never reach the file,
        // which is what read-only gives.
        self.pmem.push(PmemConfig {
            file,
            model,
            readonly: unarmed || !writable,
        });
        Ok(())
    }

    /// Checks what only the whole line shows; backends no device uses are reported.
    fn check(&self, notes: &mut Vec<String>) -> Result<(), QemuError> {
        if (self.console.is_some() || !self.ports.is_empty()) && !self.serial_bus {
            return Err(QemuError(
                "No 'virtio-serial-bus' bus found for device 'virtconsole' or 'virtserialport'"
                    .into(),
            ));
        }
        let mut unused: Vec<&String> = self
            .backends
            .chardevs
            .keys()
            .chain(self.backends.netdevs.keys())
            .chain(self.backends.fsdevs.keys())
            .filter(|id| !self.used.contains(id))
            .collect();
        unused.sort();
        for id in unused {
            notes.push(format!("backend {id} has no device: not provided"));
        }
        Ok(())
    }
}
