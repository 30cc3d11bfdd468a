//! Opens what a net device runs on: its tap queues (by name or inherited descriptors) and,
//! when vhost-net is chosen, one vhost-net backend per queue pair.

use std::os::fd::RawFd;

use super::tap::{Tap, TapError};
use super::vhost::{self, KernelVhostNet, VhostError, VhostNetBackend};

/// The user's choice of datapath (the device side of the API's vhost mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhostChoice {
    /// vhost-net when descriptors are given or /dev/vhost-net exists, else userspace.
    Auto,
    On,
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum NetBackendError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Vhost(#[from] VhostError),
    #[error("vhost=on but this host has no {} (load the vhost_net module, or use vhost=auto or vhost=off)", vhost::VHOST_NET_PATH)]
    NoVhostNet,
}

/// A device's tap queues and its vhost-net backends (none for the userspace datapath).
pub type Backends = (Vec<Tap>, Vec<Box<dyn VhostNetBackend>>);

/// Where the taps come from.
pub enum TapSource<'a> {
    Named { name: &'a str, queues: u16 },
    Fds(&'a [RawFd]),
}

/// Opens the taps and the vhost backends `choice` asks for. `device` names the interface
/// in the log line that says which datapath it got.
pub fn open(
    device: &str,
    taps: TapSource,
    choice: VhostChoice,
    vhost_fds: &[RawFd],
) -> Result<Backends, NetBackendError> {
    let taps = match taps {
        TapSource::Named { name, queues } => Tap::open_named(name, queues)?,
        TapSource::Fds(fds) => fds
            .iter()
            .map(|fd| Tap::adopt(*fd))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let boxed = |b: KernelVhostNet| Box::new(b) as Box<dyn VhostNetBackend>;
    let backends: Vec<Box<dyn VhostNetBackend>> = if !vhost_fds.is_empty() {
        vhost_fds
            .iter()
            .map(|fd| KernelVhostNet::adopt(*fd).map(boxed))
            .collect::<Result<_, _>>()?
    } else {
        match choice {
            VhostChoice::Off => Vec::new(),
            VhostChoice::On if !vhost::available() => return Err(NetBackendError::NoVhostNet),
            VhostChoice::On => (0..taps.len())
                .map(|_| KernelVhostNet::open().map(boxed))
                .collect::<Result<_, _>>()?,
            VhostChoice::Auto if !vhost::available() => {
                log::info!(
                    "{device}: no {}, using the userspace datapath",
                    vhost::VHOST_NET_PATH
                );
                Vec::new()
            }
            VhostChoice::Auto => match (0..taps.len())
                .map(|_| KernelVhostNet::open().map(boxed))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(backends) => backends,
                Err(e) => {
                    log::warn!("{device}: {e}; using the userspace datapath");
                    Vec::new()
                }
            },
        }
    };
    Ok((taps, backends))
}
