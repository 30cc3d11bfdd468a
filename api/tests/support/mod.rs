pub mod fake_vmm;
