//! Compiles resources/seccomp/x86_64.json into BPF at build time, so the binary carries its
//! filters and never parses a policy at run time. Each program gets a binary-search dispatch on
//! the syscall number in place of seccompiler's linear chain, and loses the jumps and returns
//! that makes redundant (src/seccomp_dispatch.rs), which halves the time the kernel takes to
//! install it (it pays per instruction, and emulates the program for every syscall number).
//!
//! Output format (read by src/seccomp.rs): for each thread category, sorted by name:
//! name length (u32 LE), name, instruction count (u32 LE), then per instruction
//! code (u16 LE), jt (u8), jf (u8), k (u32 LE).

use std::collections::BTreeMap;
use std::path::PathBuf;

#[path = "src/seccomp_dispatch.rs"]
mod seccomp_dispatch;

fn main() {
    let policy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/seccomp/x86_64.json");
    println!("cargo:rerun-if-changed={}", policy.display());
    let file = std::fs::File::open(&policy).unwrap_or_else(|e| panic!("{}: {e}", policy.display()));
    let filters = seccompiler::compile_from_json(file, seccompiler::TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("{}: {e}", policy.display()));
    let mut out = Vec::new();
    for (name, program) in filters.into_iter().collect::<BTreeMap<_, _>>() {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        let program = seccomp_dispatch::dispatch(&program)
            .unwrap_or_else(|e| panic!("{}: filter `{name}`: {e}", policy.display()));
        out.extend_from_slice(&(program.len() as u32).to_le_bytes());
        for insn in program {
            out.extend_from_slice(&insn.code.to_le_bytes());
            out.push(insn.jt);
            out.push(insn.jf);
            out.extend_from_slice(&insn.k.to_le_bytes());
        }
    }
    let dest = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("seccomp_filters.bin");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
}
