//! `chapeau`: boot a Linux guest on KVM from flags or a JSON config.

// Rust's runtime start-up is skipped on purpose: see `vmm::cli::main`. (Not in `cargo test`'s
// build of this file, whose `main` is the test harness.)
#![cfg_attr(not(test), no_main)]

#[cfg(not(test))]
#[unsafe(no_mangle)]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    vmm::cli::main()
}
