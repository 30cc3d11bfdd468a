//! The VM and vCPU handles: what the runtime holds to create, run, pause and stop them.

pub mod vcpu;
pub mod vm;
