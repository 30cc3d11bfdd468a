//! Arbitrary bytes as what a QMP client sends, fed in two reads: every reply is one JSON line.
//! Nothing may panic.
#![no_main]

use api::qemu::qmp::{QmpBackend, QmpSession};
use api::{RequestError, VmState, VmmRequest, VmmResponse};
use libfuzzer_sys::fuzz_target;

struct Vmm(VmState);

impl QmpBackend for Vmm {
    fn request(&mut self, _: VmmRequest) -> Result<VmmResponse, RequestError> {
        Ok(VmmResponse::Empty)
    }
    fn vcpu_thread_ids(&self) -> Vec<i32> {
        vec![100, 101]
    }
    fn status(&self) -> VmState {
        self.0
    }
}

fuzz_target!(|data: &[u8]| {
    let mut session = QmpSession::new();
    let mut vmm = Vmm(VmState::Running);
    let split = data
        .first()
        .map_or(0, |b| usize::from(*b) % (data.len() + 1));
    let (first, second) = data.split_at(split);
    for input in [first, second] {
        for step in session.feed(input, &mut vmm) {
            assert!(step.reply.ends_with("\r\n"));
            check_reply_shape(&step.reply);
        }
    }
});

fn check_reply_shape(reply: &str) {
    assert!(reply.starts_with('{') && !reply.trim_end().contains('\n'));
}
