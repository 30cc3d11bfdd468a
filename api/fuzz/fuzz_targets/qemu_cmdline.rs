//! Arbitrary bytes as a QEMU command line (NUL-separated arguments): the parser answers with a
//! validated config or a QEMU-style error. Nothing may panic.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let args = data.split(|b| *b == 0).map(OsStr::from_bytes);
    if let Ok(invocation) = api::qemu::parse_qemu_args(args) {
        invocation
            .config
            .validate()
            .expect("the front end returns only valid configs");
    }
});
