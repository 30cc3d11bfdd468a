//! The host files the VMM opens itself (kernel, initrd, pmem images, the serial output file),
//! opened by the rules in [`devices::host_files`]: inputs are regular files opened
//! non-blocking and checked with fstat; outputs never follow a symlink nor truncate a file
//! that is not ours.

pub use devices::host_files::{open_output, open_regular, Access, HostFileError};
