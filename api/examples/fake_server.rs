//! The REST API over a fake VMM (no guest), for schemathesis and manual tries:
//! `cargo run -p api --example fake_server -- /tmp/chapeau-api.sock`.
//! Removes the socket file at exit (SIGINT/SIGTERM end it through the default handler, so run
//! it under a wrapper that removes the file, as tests/schemathesis.sh does).

#[path = "../tests/support/fake_vmm.rs"]
mod fake_vmm;

use std::os::unix::net::UnixListener;

use vmm_sys_util::eventfd::EventFd;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: fake_server SOCKET");
        std::process::exit(2);
    };
    let listener = match UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {path}: {e}");
            std::process::exit(1);
        }
    };
    let stop = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let mut vmm = fake_vmm::FakeVmm::new();
    let result = api::rest::serve(listener, stop, |request| vmm.handle(request));
    let _ = std::fs::remove_file(&path);
    if let Err(e) = result {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
