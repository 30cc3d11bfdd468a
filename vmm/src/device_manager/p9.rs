//! virtio-9p shares: one device per shared directory, its workers confined to the export
//! (Landlock) and to the `9p` seccomp policy.

use std::sync::Arc;

use api::{FsConfig, SecurityModel};
use devices::virtio::p9::server::ServerOptions;
use devices::virtio::p9::{Ownership, P9};
use devices::virtio::ThreadConfinement;

use super::DeviceError;

/// The device sharing `fs.path` as `fs.tag`.
pub fn p9_device(
    fs: &FsConfig,
    confinement: &Arc<dyn ThreadConfinement>,
) -> Result<P9, DeviceError> {
    let options = ServerOptions {
        ownership: match fs.security_model {
            SecurityModel::None => Ownership::Vmm,
            SecurityModel::Passthrough => Ownership::Guest,
        },
        readonly: fs.readonly,
    };
    P9::new(&fs.tag, &fs.path, options, confinement.clone())
        .map_err(|e| DeviceError::P9(format!("{} ({}): {e}", fs.tag, fs.path.display())))
}
