//! The QEMU front end's command line: Kata's real one, every option in both spellings, and the
//! errors QEMU would print.

use std::path::PathBuf;

use api::qemu::{parse_qemu_args, QemuInvocation, QmpEndpoint};
use api::{
    BootConfig, ConsoleConfig, MacAddr, MachineConfig, NetConfig, PmemConfig, PmemModel,
    PortConfig, PvmParams, RngConfig, SerialConfig, VhostMode, VmConfig,
};
use api::{FsConfig, SecurityModel};

const KATA_CMDLINE: &str = include_str!("data/kata-qemu-cmdline.txt");
const SANDBOX: &str = "23223acca4d1945d21cae8cdbd9059a8adb5e9b3a766e01ce7e8c194dcf0049d";

/// The reference line as Kata's argv: one argument per `-option value`, the -append value
/// being everything up to the next option.
fn kata_argv() -> Vec<String> {
    let text = KATA_CMDLINE.trim();
    let (_, rest) = text.split_once(' ').unwrap();
    let mut argv: Vec<String> = Vec::new();
    let mut words = rest.split(' ').peekable();
    while let Some(word) = words.next() {
        argv.push(word.to_string());
        if word == "-append" {
            let mut value = Vec::new();
            while let Some(next) = words.next_if(|w| *w != "-pidfile") {
                value.push(next);
            }
            argv.push(value.join(" "));
        }
    }
    argv
}

fn parse(args: &[&str]) -> Result<QemuInvocation, String> {
    parse_qemu_args(args).map_err(|e| e.to_string())
}

fn run(vm: &str) -> String {
    format!("/run/vc/vm/{SANDBOX}/{vm}")
}

#[test]
fn kata_reference_command_line() {
    let argv = kata_argv();
    let append = &argv[argv.iter().position(|a| a == "-append").unwrap() + 1];
    assert!(append.starts_with("tsc=reliable ") && append.ends_with("systemd-networkd.socket"));
    let got = parse_qemu_args(&argv).unwrap();
    let expected = VmConfig {
        machine: MachineConfig {
            vcpus: 1,
            memory_mib: 2048,
            thp: false,
        },
        boot: BootConfig {
            kernel: "/usr/share/kata-containers/vmlinuz-4.19.28.42-48.1.container".into(),
            initrd: None,
            cmdline: append.clone(),
            pvm_params: PvmParams::Auto,
        },
        serial: SerialConfig::Off,
        console: ConsoleConfig::Socket(run("console.sock").into()),
        ports: vec![PortConfig {
            name: "agent.channel.0".into(),
            socket: run("kata.sock").into(),
        }],
        rng: Some(RngConfig {
            source: "/dev/urandom".into(),
        }),
        pmem: vec![PmemConfig {
            file: "/usr/share/kata-containers/kata-containers-imageclearlinux_1.8.0-alpha2_agente40d7749dc.img".into(),
            model: PmemModel::Nvdimm,
            readonly: true,
        }],
        net: vec![NetConfig {
            id: Some("network-0".into()),
            tap: None,
            fds: vec![4],
            mac: "2e:b0:15:b4:d0:6f".parse::<MacAddr>().unwrap(),
            queues: 1,
            vhost: VhostMode::On,
            vhost_fds: vec![3],
        }],
        fs: vec![FsConfig {
            tag: "kataShared".into(),
            path: format!("/run/kata-containers/shared/sandboxes/{SANDBOX}").into(),
            security_model: SecurityModel::None,
            readonly: false,
        }],
    };
    assert_eq!(got.config, expected);
    assert_eq!(got.qmp, Some(QmpEndpoint::Path(run("qmp.sock").into())));
    assert!(got.daemonize);
    assert_eq!(got.pidfile, Some(PathBuf::from(run("pid"))));
    assert_eq!(got.name, Some(format!("sandbox-{SANDBOX}")));
    assert_eq!(
        got.uuid.as_deref(),
        Some("e7573de4-f4af-4a82-9b69-dbb72e24cb0a")
    );
    assert_eq!(
        got.notes,
        vec![
            "-m 2048M,slots=10,maxmem=8906M: memory hotplug is not provided, the VM has 2048 MiB",
            "-device pci-bridge,bus=pci.0,id=pci-bridge-0,chassis_nr=1,shpc=on,addr=2,romfile=: \
             not provided (pci-bridge is not used by Kata's pmem rootfs and 9p paths)",
            "disable-modern=true: served as modern virtio (the guest drivers negotiate either)",
            "-device virtio-scsi-pci,id=scsi0,disable-modern=true,romfile=: not provided \
             (virtio-scsi-pci is not used by Kata's pmem rootfs and 9p paths)",
        ]
    );
}

/// A minimal line to which each test adds its options.
fn with(extra: &[&str]) -> Result<QemuInvocation, String> {
    let mut args = vec!["-kernel", "/k", "-nodefaults"];
    args.extend_from_slice(extra);
    parse(&args)
}

fn err(extra: &[&str]) -> String {
    with(extra).unwrap_err()
}

/// The newer spelling of Kata's line (QEMU 6+ era Kata): `=on/=off`, `server=on,wait=off`,
/// `nvdimm unarmed=on`, `readonly=on`, `-qmp unix:fd=N`, `losttickpolicy`, q35.
#[test]
fn newer_spelling() {
    let got = parse(&[
        "-name", "sandbox-x", "-uuid", "e7573de4-f4af-4a82-9b69-dbb72e24cb0a",
        "-machine", "q35,accel=kvm,kernel_irqchip=on,nvdimm=on",
        "-cpu", "host,pmu=off",
        "-qmp", "unix:fd=3,server=on,wait=off",
        "-m", "2048M,slots=10,maxmem=8906M",
        "-device", "virtio-serial-pci,disable-modern=false,id=serial0",
        "-device", "virtconsole,chardev=charconsole0,id=console0",
        "-chardev", "socket,id=charconsole0,path=/c.sock,server=on,wait=off",
        "-object", "memory-backend-file,id=mem0,mem-path=/img,size=268435456,readonly=on",
        "-device", "nvdimm,id=nv0,memdev=mem0,unarmed=on",
        "-object", "rng-builtin,id=rng0",
        "-device", "virtio-rng-pci,rng=rng0",
        "-device", "virtserialport,chardev=charch0,id=channel0,name=agent.channel.0",
        "-chardev", "socket,id=charch0,path=/k.sock,server=on,wait=off",
        "-device", "virtio-9p-pci,disable-modern=false,fsdev=extra-9p-kataShared,mount_tag=kataShared",
        "-fsdev", "local,id=extra-9p-kataShared,path=/shared,security_model=none,multidevs=remap,readonly=on",
        "-netdev", "tap,id=network-0,vhost=on,vhostfds=3:4,fds=5:6",
        "-device", "driver=virtio-net-pci,netdev=network-0,mac=2e:b0:15:b4:d0:6f,disable-modern=false,mq=on,vectors=6",
        "-global", "kvm-pit.lost_tick_policy=discard",
        "-vga", "none", "-no-user-config", "-nodefaults", "-nographic", "--no-reboot",
        "-daemonize", "-D", "/log", "-d", "guest_errors",
        "-object", "memory-backend-ram,id=dimm1,size=2048M",
        "-numa", "node,memdev=dimm1",
        "-kernel", "/k", "-initrd", "/i", "-append", "console=hvc0",
        "-pidfile", "/pid", "-smp", "2,cores=1,threads=1,sockets=4,maxcpus=4",
    ])
    .unwrap();
    assert_eq!(got.qmp, Some(QmpEndpoint::Fd(3)));
    assert_eq!(got.config.machine.vcpus, 2);
    assert_eq!(got.config.machine.memory_mib, 2048);
    assert_eq!(got.config.boot.initrd, Some("/i".into()));
    assert_eq!(got.config.boot.cmdline, "console=hvc0");
    assert_eq!(got.config.console, ConsoleConfig::Socket("/c.sock".into()));
    assert_eq!(got.config.ports[0].socket, PathBuf::from("/k.sock"));
    assert!(got.config.pmem[0].readonly);
    assert_eq!(
        got.config.rng.as_ref().unwrap().source,
        PathBuf::from("/dev/urandom")
    );
    let net = &got.config.net[0];
    assert_eq!(
        (net.vhost_fds.clone(), net.fds.clone()),
        (vec![3, 4], vec![5, 6])
    );
    assert_eq!(net.queues, 2);
    assert!(got.config.fs[0].readonly);
    assert!(got.notes.iter().any(|n| n.contains("machine q35")));
    assert!(got.notes.iter().any(|n| n.contains("CPU hotplug")));
    assert!(!got.notes.iter().any(|n| n.contains("disable-modern")));
}

#[test]
fn machine_both_spellings() {
    for m in [
        "pc,accel=kvm,kernel_irqchip,nvdimm",
        "pc,accel=kvm,kernel_irqchip=on,nvdimm=on",
        "q35,accel=kvm,kernel-irqchip=on",
        "pc-i440fx-5.2",
    ] {
        with(&["-machine", m]).unwrap();
        with(&["-M", m]).unwrap();
    }
    with(&["-enable-kvm"]).unwrap();
    assert_eq!(
        err(&["-machine", "microvm"]),
        "qemu-system-x86_64: -machine microvm: unsupported machine type: chapeau provides pc and q35"
    );
    assert_eq!(
        err(&["-machine", "pc,accel=tcg"]),
        "qemu-system-x86_64: -machine pc,accel=tcg: accel=tcg: chapeau runs on KVM only"
    );
    assert!(err(&["-machine", "pc,kernel_irqchip=split"])
        .contains("kernel_irqchip=split is not supported"));
    assert_eq!(
        err(&["-machine", "pc,nvdimm=maybe"]),
        "qemu-system-x86_64: -machine pc,nvdimm=maybe: Parameter 'nvdimm' expects 'on' or 'off'"
    );
    assert_eq!(
        err(&["-machine", "pc,foo=1"]),
        "qemu-system-x86_64: -machine pc,foo=1: Invalid parameter 'foo'"
    );
}

#[test]
fn cpu_both_spellings() {
    for cpu in ["host", "host,", "host,pmu=off", "host,pmu=off,"] {
        assert!(with(&["-cpu", cpu]).unwrap().notes.is_empty(), "{cpu}");
    }
    assert_eq!(
        with(&["-cpu", "host,pmu=on"]).unwrap().notes,
        vec!["-cpu pmu=on: served with the PMU hidden"]
    );
    assert_eq!(
        err(&["-cpu", "qemu64"]),
        "qemu-system-x86_64: -cpu qemu64: unable to find CPU model 'qemu64': chapeau provides -cpu host"
    );
    assert_eq!(
        err(&["-cpu", "host,vmx=on"]),
        "qemu-system-x86_64: -cpu host,vmx=on: Property 'host-x86_64-cpu.vmx' not found"
    );
}

#[test]
fn smp_and_memory() {
    let vcpus = |s: &str| with(&["-smp", s]).map(|i| i.config.machine.vcpus);
    assert_eq!(vcpus("4"), Ok(4));
    assert_eq!(vcpus("1,cores=1,threads=1,sockets=1,maxcpus=1"), Ok(1));
    assert_eq!(vcpus("cpus=3"), Ok(3));
    assert_eq!(vcpus("sockets=2,cores=2"), Ok(4));
    assert_eq!(
        vcpus("x").unwrap_err(),
        "qemu-system-x86_64: -smp x: Parameter 'cpus' expects a number"
    );
    assert_eq!(
        vcpus("255").unwrap_err(),
        "qemu-system-x86_64: -smp 255: Invalid SMP CPUs 255. chapeau supports 1 to 254"
    );
    assert!(vcpus("2,sockets=1,cores=1,threads=1,maxcpus=4")
        .unwrap_err()
        .contains("Invalid CPU topology"));
    assert!(vcpus("4,maxcpus=2")
        .unwrap_err()
        .contains("maxcpus must be equal"));

    let mib = |m: &str| with(&["-m", m]).map(|i| i.config.machine.memory_mib);
    assert_eq!(with(&[]).unwrap().config.machine.memory_mib, 128);
    assert_eq!(mib("2048M"), Ok(2048));
    assert_eq!(mib("512"), Ok(512));
    assert_eq!(mib("2G"), Ok(2048));
    assert_eq!(mib("size=1G"), Ok(1024));
    assert_eq!(mib("1536k"), Ok(2));
    assert_eq!(mib("2048M,slots=10,maxmem=8906M"), Ok(2048));
    assert!(mib("2X")
        .unwrap_err()
        .starts_with("qemu-system-x86_64: -m 2X: Parameter 'size' expects a non-negative number"));
    assert!(mib("0").is_err());
    assert!(mib("99999999999T").is_err());
    assert!(mib("4G,maxmem=1G")
        .unwrap_err()
        .contains("must be at least the initial memory size"));
    assert_eq!(
        err(&["-m", "1G,slot=1"]),
        "qemu-system-x86_64: -m 1G,slot=1: Invalid parameter 'slot'"
    );
}

#[test]
fn kernel_initrd_append() {
    let got = parse(&[
        "-kernel", "/vmlinux", "-initrd", "/initrd", "-append", "a=b c",
    ])
    .unwrap();
    assert_eq!(got.config.boot.kernel, PathBuf::from("/vmlinux"));
    assert_eq!(got.config.boot.initrd, Some("/initrd".into()));
    assert_eq!(got.config.boot.cmdline, "a=b c");
    assert_eq!(got.config.boot.pvm_params, PvmParams::Auto);
    assert_eq!(with(&[]).unwrap().config.boot.cmdline, "");
    assert_eq!(
        parse(&["-m", "1G"]).unwrap_err(),
        "qemu-system-x86_64: no -kernel given: chapeau boots a Linux kernel directly"
    );
    assert_eq!(
        parse(&["-kernel"]).unwrap_err(),
        "qemu-system-x86_64: -kernel: requires an argument"
    );
}

fn console_line(chardev: &str) -> Result<QemuInvocation, String> {
    with(&[
        "-device",
        "virtio-serial-pci,disable-modern=true,id=serial0,romfile=",
        "-device",
        "virtconsole,chardev=charconsole0,id=console0",
        "-chardev",
        chardev,
        "-device",
        "virtserialport,chardev=charch0,id=channel0,name=agent.channel.0",
        "-chardev",
        "socket,id=charch0,path=/k.sock,server,nowait",
    ])
}

#[test]
fn console_and_ports_both_spellings() {
    for chardev in [
        "socket,id=charconsole0,path=/c.sock,server,nowait",
        "socket,id=charconsole0,path=/c.sock,server=on,wait=off",
    ] {
        let got = console_line(chardev).unwrap();
        assert_eq!(got.config.console, ConsoleConfig::Socket("/c.sock".into()));
        assert_eq!(got.config.ports.len(), 1);
    }
    let got = console_line("file,id=charconsole0,path=/log").unwrap();
    assert_eq!(got.config.console, ConsoleConfig::File("/log".into()));
    assert!(console_line("socket,id=charconsole0,path=/c.sock")
        .unwrap_err()
        .ends_with("chapeau listens on chardev sockets: add server=on"));
    assert!(
        console_line("socket,id=charconsole0,path=/c.sock,server,wait")
            .unwrap_err()
            .contains("wait=on is not supported")
    );
    assert_eq!(
        console_line("pty,id=charconsole0").unwrap_err(),
        "qemu-system-x86_64: -chardev pty,id=charconsole0: 'pty' is not a valid char driver name"
    );
    assert_eq!(
        console_line("socket,id=other,path=/c,server,nowait").unwrap_err(),
        "qemu-system-x86_64: -device virtconsole,chardev=charconsole0,id=console0: \
         Property 'virtconsole.chardev' can't find value 'charconsole0'"
    );
    assert_eq!(
        console_line("socket,id=charch0,path=/c,server,nowait").unwrap_err(),
        "qemu-system-x86_64: -chardev socket,id=charch0,path=/k.sock,server,nowait: \
         Duplicate ID 'charch0' for chardev"
    );
    assert!(err(&[
        "-device",
        "virtconsole,chardev=c",
        "-chardev",
        "socket,id=c,path=/c,server,nowait"
    ])
    .contains("No 'virtio-serial-bus' bus found"));
    assert!(err(&[
        "-device",
        "virtio-serial-pci",
        "-device",
        "virtserialport,chardev=c",
        "-chardev",
        "socket,id=c,path=/c,server,nowait",
    ])
    .ends_with("Parameter 'name' is missing"));
    let unused = with(&["-chardev", "socket,id=lonely,path=/l,server,nowait"]).unwrap();
    assert_eq!(
        unused.notes,
        vec!["backend lonely has no device: not provided"]
    );
}

#[test]
fn nvdimm_and_virtio_pmem() {
    let pmem = |machine: &str, object: &str, device: &str| {
        with(&["-machine", machine, "-object", object, "-device", device]).map(|i| i.config.pmem)
    };
    let older = pmem(
        "pc,nvdimm",
        "memory-backend-file,id=mem0,mem-path=/img,size=134217728",
        "nvdimm,id=nv0,memdev=mem0",
    )
    .unwrap();
    assert_eq!(
        older,
        vec![PmemConfig {
            file: "/img".into(),
            model: PmemModel::Nvdimm,
            readonly: true
        }]
    );
    let newer = pmem(
        "pc,nvdimm=on",
        "memory-backend-file,id=mem0,mem-path=/img,size=128M,share=on,readonly=on",
        "nvdimm,id=nv0,memdev=mem0,unarmed=on",
    )
    .unwrap();
    assert_eq!(newer, older);
    let writable = pmem(
        "pc",
        "memory-backend-file,id=mem0,mem-path=/img,size=128M,share=on",
        "virtio-pmem-pci,id=p0,memdev=mem0",
    )
    .unwrap();
    assert_eq!(writable[0].model, PmemModel::Virtio);
    assert!(!writable[0].readonly);
    assert_eq!(
        pmem(
            "pc",
            "memory-backend-file,id=mem0,mem-path=/img,size=1M",
            "nvdimm,memdev=mem0"
        )
        .unwrap_err(),
        "qemu-system-x86_64: nvdimm is not enabled: missing 'nvdimm' in '-M'"
    );
    assert!(pmem(
        "pc,nvdimm",
        "memory-backend-file,id=mem0,size=1M",
        "nvdimm,memdev=mem0"
    )
    .unwrap_err()
    .ends_with("Parameter 'mem-path' is missing"));
    assert!(pmem(
        "pc,nvdimm",
        "memory-backend-ram,id=mem0,size=1M",
        "nvdimm,memdev=mem0"
    )
    .unwrap_err()
    .contains("chapeau maps pmem from a file"));
    assert_eq!(
        pmem("pc,nvdimm", "memory-backend-epc,id=mem0", "nvdimm,memdev=mem0").unwrap_err(),
        "qemu-system-x86_64: -object memory-backend-epc,id=mem0: invalid object type: memory-backend-epc"
    );
    assert_eq!(
        pmem("pc,nvdimm", "memory-backend-file,id=mem0,mem-path=/i,size=1M", "nvdimm,memdev=mem0,unarmed=2")
            .unwrap_err(),
        "qemu-system-x86_64: -device nvdimm,memdev=mem0,unarmed=2: Parameter 'unarmed' expects 'on' or 'off'"
    );
}

#[test]
fn rng() {
    let rng = |extra: &[&str]| with(extra).map(|i| i.config.rng);
    let random = rng(&[
        "-object",
        "rng-random,id=rng0,filename=/dev/hwrng",
        "-device",
        "virtio-rng,rng=rng0,romfile=",
    ])
    .unwrap();
    assert_eq!(
        random,
        Some(RngConfig {
            source: "/dev/hwrng".into()
        })
    );
    let builtin = rng(&[
        "-object",
        "rng-builtin,id=r",
        "-device",
        "virtio-rng-pci,rng=r",
    ])
    .unwrap();
    assert_eq!(builtin, Some(RngConfig::default()));
    assert_eq!(
        rng(&["-device", "virtio-rng-pci"]).unwrap(),
        Some(RngConfig::default())
    );
    assert_eq!(
        rng(&["-device", "virtio-rng,rng=nope"]).unwrap_err(),
        "qemu-system-x86_64: -device virtio-rng,rng=nope: Property 'virtio-rng.rng' can't find value 'nope'"
    );
    assert_eq!(
        rng(&["-device", "virtio-rng,bogus=1"]).unwrap_err(),
        "qemu-system-x86_64: -device virtio-rng,bogus=1: Property 'virtio-rng.bogus' not found"
    );
}

#[test]
fn nine_p_shares() {
    let share = |fsdev: &str| {
        with(&[
            "-device",
            "virtio-9p-pci,fsdev=f,mount_tag=tag",
            "-fsdev",
            fsdev,
        ])
        .map(|i| i.config.fs)
    };
    assert_eq!(
        share("local,id=f,path=/d,security_model=passthrough").unwrap(),
        vec![FsConfig {
            tag: "tag".into(),
            path: "/d".into(),
            security_model: SecurityModel::Passthrough,
            readonly: false
        }]
    );
    assert!(share("local,id=f,path=/d,security_model=none,readonly").unwrap()[0].readonly);
    assert!(share("local,id=f,path=/d,security_model=mapped-xattr")
        .unwrap_err()
        .contains("security_model=mapped-xattr is not supported"));
    assert!(share("local,id=f,path=/d")
        .unwrap_err()
        .ends_with("Parameter 'security_model' is missing"));
    assert!(share("proxy,id=f")
        .unwrap_err()
        .contains("fsdriver proxy not found"));
    assert!(with(&[
        "-device",
        "virtio-9p-pci,fsdev=f",
        "-fsdev",
        "local,id=f,path=/d,security_model=none"
    ])
    .unwrap_err()
    .ends_with("Parameter 'mount_tag' is missing"));
}

#[test]
fn netdev_both_spellings() {
    let net = |netdev: &str, device: &str| {
        with(&["-netdev", netdev, "-device", device]).map(|i| i.config.net)
    };
    let older = net(
        "tap,id=n,vhost=on,vhostfds=3:4,fds=5:6",
        "driver=virtio-net-pci,netdev=n,mac=2e:b0:15:b4:d0:6f,disable-modern=true,mq=on,vectors=6,romfile=",
    )
    .unwrap();
    assert_eq!(older[0].fds, vec![5, 6]);
    assert_eq!(older[0].vhost_fds, vec![3, 4]);
    assert_eq!(older[0].queues, 2);
    assert_eq!(older[0].vhost, VhostMode::On);
    let single = net("tap,id=n,fd=3,vhost=off", "virtio-net-pci,netdev=n").unwrap();
    assert_eq!(single[0].fds, vec![3]);
    assert_eq!(single[0].vhost, VhostMode::Off);
    assert_eq!(single[0].mac.to_string(), "52:54:00:12:34:56");
    let named = net(
        "tap,id=n,ifname=tap0,script=no,downscript=no",
        "virtio-net-pci,netdev=n",
    )
    .unwrap();
    assert_eq!(named[0].tap.as_deref(), Some("tap0"));
    assert_eq!(named[0].vhost, VhostMode::Auto);
    assert!(net(
        "tap,id=n,ifname=tap0,script=/etc/qemu-ifup",
        "virtio-net-pci,netdev=n"
    )
    .unwrap_err()
    .contains("chapeau runs no network scripts"));
    assert!(net("user,id=n", "virtio-net-pci,netdev=n")
        .unwrap_err()
        .contains("Parameter 'type' does not accept value 'user'"));
    assert_eq!(
        net("tap,id=n,fd=3", "virtio-net-pci,netdev=n,mac=zz").unwrap_err(),
        "qemu-system-x86_64: -device virtio-net-pci,netdev=n,mac=zz: Property 'virtio-net-pci.mac' doesn't take value 'zz'"
    );
    assert!(net("tap,id=n,fds=a", "virtio-net-pci,netdev=n")
        .unwrap_err()
        .contains("fds=a"));
    // The config's own checks still apply, worded QEMU-style.
    assert!(net("tap,id=n,fd=1", "virtio-net-pci,netdev=n")
        .unwrap_err()
        .starts_with("qemu-system-x86_64: invalid net"));
    assert!(net("tap,id=n,fd=3", "virtio-net-pci,netdev=m")
        .unwrap_err()
        .contains("can't find value 'm'"));
}

#[test]
fn numa_node() {
    with(&[
        "-m",
        "1G",
        "-object",
        "memory-backend-ram,id=r,size=1G",
        "-numa",
        "node,memdev=r",
    ])
    .unwrap();
    let hugepages = with(&[
        "-m",
        "1G",
        "-object",
        "memory-backend-file,id=r,size=1G,mem-path=/dev/hugepages,share=on,prealloc=on",
        "-numa",
        "node,memdev=r",
    ])
    .unwrap();
    assert!(hugepages.notes[0].contains("served as anonymous memory"));
    assert_eq!(
        err(&["-m", "1G", "-object", "memory-backend-ram,id=r,size=2G", "-numa", "node,memdev=r"]),
        "qemu-system-x86_64: total memory for NUMA nodes (0x80000000) should equal RAM size (0x40000000)"
    );
    assert!(err(&["-numa", "node,memdev=x"]).contains("no memory backend"));
    assert!(err(&["-numa", "dist,src=0,dst=1"]).contains("chapeau accepts -numa node"));
}

#[test]
fn not_provided_devices_and_no_ops() {
    let got = with(&[
        "-device",
        "pci-bridge,bus=pci.0,id=pci-bridge-0,chassis_nr=1,shpc=on,addr=2,romfile=",
        "-device",
        "virtio-scsi-pci,id=scsi0,disable-modern=true,romfile=",
        "-global",
        "kvm-pit.lost_tick_policy=discard",
        "-global",
        "kvm-pit.losttickpolicy=discard",
        "-vga",
        "none",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "--no-reboot",
        "-D",
        "/tmp/log",
        "-d",
        "guest_errors",
    ])
    .unwrap();
    assert_eq!(got.notes.len(), 3, "{:#?}", got.notes);
    assert!(got.notes[0].contains("pci-bridge is not used"));
    assert!(got.notes[2].contains("virtio-scsi-pci is not used"));
    assert_eq!(got.config, with(&[]).unwrap().config);
    assert!(err(&["-global", "kvm-pit.lost_tick_policy=delay"])
        .contains("lost_tick_policy=delay is not supported"));
    assert!(err(&["-global", "virtio-net-pci.x=1"]).contains("not supported"));
    assert_eq!(
        err(&["-vga", "std"]),
        "qemu-system-x86_64: -vga std: chapeau provides no display: only -vga none"
    );
}

#[test]
fn serial_follows_nodefaults_and_nographic() {
    let serial = |args: &[&str]| {
        let mut all = vec!["-kernel", "/k"];
        all.extend_from_slice(args);
        parse(&all).map(|i| i.config.serial)
    };
    assert_eq!(serial(&[]), Ok(SerialConfig::Off));
    assert_eq!(serial(&["-nographic"]), Ok(SerialConfig::Stdout));
    assert_eq!(
        serial(&["-nographic", "-nodefaults"]),
        Ok(SerialConfig::Off)
    );
    assert_eq!(
        serial(&["-nographic", "-daemonize"]),
        Err("qemu-system-x86_64: -nographic cannot be used with -daemonize".into())
    );
}

#[test]
fn process_options() {
    let got = with(&[
        "-name",
        "guest=vm1,debug-threads=on",
        "-pidfile",
        "/p",
        "-daemonize",
    ])
    .unwrap();
    assert_eq!(got.name.as_deref(), Some("vm1"));
    assert_eq!(got.pidfile, Some("/p".into()));
    assert!(got.daemonize);
    let plain = with(&[]).unwrap();
    assert_eq!(
        (plain.name, plain.uuid, plain.qmp, plain.daemonize),
        (None, None, None, false)
    );
    assert_eq!(
        err(&["-uuid", "nope"]),
        "qemu-system-x86_64: -uuid nope: Fail to parse UUID string. Wrong format."
    );
}

#[test]
fn qmp_both_spellings() {
    let qmp = |q: &str| with(&["-qmp", q]).map(|i| i.qmp);
    for spelling in [
        "unix:/q.sock,server,nowait",
        "unix:/q.sock,server=on,wait=off",
        "unix:/q.sock,server",
    ] {
        assert_eq!(qmp(spelling), Ok(Some(QmpEndpoint::Path("/q.sock".into()))));
    }
    assert_eq!(
        qmp("unix:fd=7,server=on,wait=off"),
        Ok(Some(QmpEndpoint::Fd(7)))
    );
    assert!(qmp("unix:fd=1,server")
        .unwrap_err()
        .contains("fd=1 is not an inherited descriptor"));
    assert!(qmp("tcp:localhost:4444,server")
        .unwrap_err()
        .contains("unix socket only"));
    assert!(qmp("unix:/q.sock").unwrap_err().contains("add server=on"));
    assert!(qmp("unix:/q.sock,server,wait")
        .unwrap_err()
        .contains("wait=on is not supported"));
    assert!(err(&["-qmp", "unix:/a,server", "-qmp", "unix:/b,server"]).contains("only one -qmp"));
}

#[test]
fn unknown_options_and_devices() {
    assert_eq!(err(&["-foo"]), "qemu-system-x86_64: -foo: invalid option");
    assert_eq!(err(&["--foo"]), "qemu-system-x86_64: --foo: invalid option");
    assert_eq!(
        err(&["-"]),
        "qemu-system-x86_64: -: disk images are not supported (chapeau boots -kernel)"
    );
    assert_eq!(
        err(&["disk.img"]),
        "qemu-system-x86_64: disk.img: disk images are not supported (chapeau boots -kernel)"
    );
    assert_eq!(
        err(&["-device", "bogus"]),
        "qemu-system-x86_64: -device bogus: 'bogus' is not a valid device model name"
    );
    assert_eq!(
        err(&["-device", "id=x"]),
        "qemu-system-x86_64: -device id=x: Parameter 'driver' is missing"
    );
    assert_eq!(
        err(&["-object", "rng-random,filename=/x"]),
        "qemu-system-x86_64: -object rng-random,filename=/x: Parameter 'id' is missing"
    );
    assert_eq!(
        err(&["-smp"]),
        "qemu-system-x86_64: -smp: requires an argument"
    );
}

#[test]
fn non_utf8_argument_is_an_error() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"/k\xff");
    let args = [std::ffi::OsStr::new("-kernel"), bad];
    assert!(parse_qemu_args(args)
        .unwrap_err()
        .to_string()
        .contains("not valid UTF-8"));
}
