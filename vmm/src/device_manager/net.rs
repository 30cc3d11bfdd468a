//! virtio-net interfaces: each on its taps (by name or inherited fds), with vhost-net where
//! chosen and present, else our userspace datapath on `netN-qM` threads.

use std::sync::Arc;

use api::{NetConfig, VhostMode};
use devices::virtio::net::backend::{self, TapSource, VhostChoice};
use devices::virtio::net::{Net, NetParams};
use devices::virtio::ThreadConfinement;

use super::DeviceError;

/// Interface `index` of the configuration. Opens its taps now, before the `vmm` thread's
/// seccomp filter forbids it.
pub fn net_device(
    index: usize,
    config: &NetConfig,
    confinement: &Arc<dyn ThreadConfinement>,
) -> Result<Net, DeviceError> {
    let taps = match &config.tap {
        Some(name) => TapSource::Named {
            name,
            queues: config.queues,
        },
        None => TapSource::Fds(&config.fds),
    };
    let choice = match config.vhost {
        VhostMode::Auto => VhostChoice::Auto,
        VhostMode::On => VhostChoice::On,
        VhostMode::Off => VhostChoice::Off,
    };
    let name = format!("net{index}");
    let net_error = |e: &dyn std::fmt::Display| DeviceError::Net(format!("{name}: {e}"));
    let (taps, vhost) =
        backend::open(&name, taps, choice, &config.vhost_fds).map_err(|e| net_error(&e))?;
    Net::new(NetParams {
        index,
        mac: config.mac.0,
        taps,
        vhost,
        confinement: confinement.clone(),
    })
    .map_err(|e| net_error(&e))
}
