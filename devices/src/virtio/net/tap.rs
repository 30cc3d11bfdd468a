//! A tap interface, one open descriptor per queue: opened (or created) by name through
//! /dev/net/tun, or adopted from descriptors chapeau inherited. Frames cross it with a 12-byte
//! virtio-net header in front (IFF_VNET_HDR + TUNSETVNETHDRSZ), so checksum and segmentation
//! offloads pass between the guest and the host stack untouched.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

/// The virtio-net header every frame carries (`struct virtio_net_hdr_v1`, with num_buffers).
pub const VNET_HDR_LEN: usize = 12;
/// `IFNAMSIZ` minus the terminating NUL.
pub const MAX_NAME_LEN: usize = 15;

const TUN_PATH: &str = "/dev/net/tun";

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;

/// TUNSETOFFLOAD flags: what the reader of the tap (the guest) accepts.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;
pub const TUN_F_USO4: u32 = 0x20;
pub const TUN_F_USO6: u32 = 0x40;

ioctl_iow_nr!(TUNSETIFF, b'T' as u32, 202, libc::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, b'T' as u32, 208, libc::c_uint);
ioctl_ior_nr!(TUNGETIFF, b'T' as u32, 210, libc::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, b'T' as u32, 216, libc::c_int);
ioctl_iow_nr!(TUNSETQUEUE, b'T' as u32, 217, libc::c_int);

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(#[source] io::Error),
    #[error("tap name {0:?} is too long: at most {MAX_NAME_LEN} bytes (IFNAMSIZ)")]
    NameTooLong(String),
    #[error("tap {name}: permission denied (creating or attaching a tap needs CAP_NET_ADMIN, or a tap whose owner is this user)")]
    Permission { name: String },
    #[error("tap {name} is busy: another process has it open, or it exists with other flags (single queue vs multiqueue, tun vs tap)")]
    Busy { name: String },
    #[error("tap {name}: {source}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("descriptor {fd} is not open")]
    FdNotOpen { fd: RawFd },
    #[error("descriptor {fd} is not a tap: {reason}")]
    NotATap { fd: RawFd, reason: String },
    #[error("tap {name}: {what} failed: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` with the flags member of its union, as the TUN ioctls use it.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// One queue of a tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if needed) tap `name` with `queues` queues, one descriptor each.
    pub fn open_named(name: &str, queues: u16) -> Result<Vec<Tap>, TapError> {
        if name.len() > MAX_NAME_LEN || name.is_empty() {
            return Err(TapError::NameTooLong(name.to_string()));
        }
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        (0..queues.max(1))
            .map(|_| {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(TUN_PATH)
                    .map_err(TapError::OpenTun)?;
                let mut req = IfReq {
                    flags,
                    ..Default::default()
                };
                req.name[..name.len()].copy_from_slice(name.as_bytes());
                // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is (with
                // the same size and layout), on a descriptor we own.
                let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
                if ret < 0 {
                    let err = io::Error::last_os_error();
                    let name = name.to_string();
                    return Err(match err.raw_os_error() {
                        Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission { name },
                        Some(libc::EBUSY) | Some(libc::EINVAL) => TapError::Busy { name },
                        _ => TapError::Attach { name, source: err },
                    });
                }
                let tap = Tap {
                    file,
                    name: name.to_string(),
                };
                tap.set_vnet_hdr_len()?;
                Ok(tap)
            })
            .collect()
    }

    /// Adopts an inherited descriptor after checking that it is an open tap with the flags
    /// we need; it becomes ours (closed when the device goes).
    pub fn adopt(fd: RawFd) -> Result<Tap, TapError> {
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::FdNotOpen { fd });
        }
        // SAFETY: the descriptor is open and was handed to us to own (the config names it);
        // nothing else in chapeau holds it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = IfReq::default();
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `req`. On a descriptor of any other
        // kind the ioctl fails without writing.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNGETIFF(), &mut req) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            let reason = match err.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EINVAL) => "not a tun/tap device".to_string(),
                Some(libc::EBADFD) => "a tun descriptor attached to no interface".to_string(),
                _ => err.to_string(),
            };
            // Not ours after all: hand it back open, as we found it.
            std::mem::forget(file);
            return Err(TapError::NotATap { fd, reason });
        }
        let missing = [
            (IFF_TAP, "IFF_TAP (it is a tun)"),
            (IFF_NO_PI, "IFF_NO_PI"),
            (IFF_VNET_HDR, "IFF_VNET_HDR"),
        ]
        .into_iter()
        .find(|(flag, _)| req.flags & flag == 0);
        if let Some((_, what)) = missing {
            std::mem::forget(file);
            return Err(TapError::NotATap {
                fd,
                reason: format!("opened without {what}"),
            });
        }
        let end = req.name.iter().position(|b| *b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        // SAFETY: F_SETFL on our descriptor; a non-blocking tap never stalls a queue thread.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let tap = Tap { file, name };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn ioctl_err(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        let len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { ioctl_with_ref(&self.file, TUNSETVNETHDRSZ(), &len) } < 0 {
            return Err(self.ioctl_err("TUNSETVNETHDRSZ"));
        }
        Ok(())
    }

    /// The offloads (TUN_F_*) the guest accepts, so the host may hand it unchecksummed and
    /// unsegmented frames.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), libc::c_ulong::from(flags)) } < 0 {
            return Err(self.ioctl_err("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// Which of `wanted`'s optional offload groups this host's tap supports: each group is
    /// tried on top of checksum offload and TSO, then everything is turned off again.
    pub fn probe_offloads(&self) -> u32 {
        let base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        if self.set_offload(base).is_err() {
            return 0;
        }
        let mut supported = base;
        for extra in [TUN_F_UFO, TUN_F_USO4 | TUN_F_USO6] {
            if self.set_offload(base | extra).is_ok() {
                supported |= extra;
            }
        }
        let _ = self.set_offload(0);
        supported
    }

    /// Attaches or detaches this queue (multiqueue taps): a detached queue gets no frames.
    pub fn set_queue_enabled(&self, enabled: bool) -> Result<(), TapError> {
        let mut req = IfReq {
            flags: if enabled {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            ..Default::default()
        };
        // SAFETY: TUNSETQUEUE reads one `struct ifreq`.
        if unsafe { ioctl_with_mut_ref(&self.file, TUNSETQUEUE(), &mut req) } < 0 {
            let err = io::Error::last_os_error();
            // Attaching an attached queue (or detaching a detached one) is not a failure.
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNSETQUEUE",
                source: err,
            });
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
