//! PVM hosts: KVM's software vendor for hosts without VT-x/AMD-V. Guest kernel mode is emulated
//! there, the emulator cannot execute some instructions, and KVM_SET_CPUID2 does not reach the
//! guest, so the only way to keep the guest kernel away from those instructions is its command
//! line. These are the parameters the test guest's README measured (`pvm-cmdline`).

use std::path::Path;

const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Required: each avoids an instruction the emulator cannot run (XSAVE/XRSTOR, CMPXCHG16B,
/// RDTSCP, RDPID, POPCNT, CLAC/STAC, CLWB, INVPCID) or, with `pvm_syscall`, lets a patched guest
/// take `syscall` through its page-fault handler. `erms,fsrm` are speed-ups in the same list
/// because only the last `clearcpuid=` counts: string copies use 8-byte `rep movsq`.
const CLEARCPUID: [&str; 11] = [
    "cx16", "rdtscp", "rdpid", "popcnt", "smap", "clwb", "fsgsbase", "pcid", "invpcid", "erms",
    "fsrm",
];
/// `rcupdate.rcu_cpu_stall_suppress=1` is required too: an emulated kernel easily goes 21 s
/// without an RCU quiescent state under host load, and the stall report asks the other vCPUs
/// for backtraces by NMI IPI, whose paravirtual hypercall (VMCALL) kvm-pvm re-executes forever
/// (seen: 4,000 re-executions a second, the guest stopped for good).
const REQUIRED: [&str; 3] = [
    "noxsave",
    "pvm_syscall",
    "rcupdate.rcu_cpu_stall_suppress=1",
];
/// Speed-ups: fewer emulated instructions (no LOCK-prefix rewriting, no lockup detector, no TSC
/// watchdog).
const SPEEDUPS: [&str; 3] = ["noreplace-smp", "nowatchdog", "tsc=reliable"];

pub fn is_pvm_host() -> bool {
    Path::new(PVM_MODULE).exists()
}

/// Splits `cmdline` at its first `--` word: the kernel's parameters, and the arguments the
/// kernel passes to init (from `--` on, verbatim).
fn split_init_args(cmdline: &str) -> (&str, Option<&str>) {
    match cmdline.split_whitespace().find(|w| *w == "--") {
        Some(dashes) => {
            // `dashes` is a slice of `cmdline`: its offset is where the init arguments start.
            let at = dashes.as_ptr() as usize - cmdline.as_ptr() as usize;
            (&cmdline[..at], Some(&cmdline[at..]))
        }
        None => (cmdline, None),
    }
}

/// Adds the PVM parameters to the kernel's part of `cmdline` (before any `--`, after which
/// words go to init), merging with any `clearcpuid=` the user gave (the kernel honours only
/// one) and skipping parameters already present.
pub fn with_pvm_params(cmdline: &str) -> String {
    let (kernel_params, init_args) = split_init_args(cmdline);
    let mut words: Vec<String> = Vec::new();
    let mut clear: Vec<String> = Vec::new();
    for word in kernel_params.split_whitespace() {
        match word.strip_prefix("clearcpuid=") {
            Some(list) => clear.extend(list.split(',').filter(|s| !s.is_empty()).map(String::from)),
            None => words.push(word.to_string()),
        }
    }
    for feature in CLEARCPUID {
        if !clear.iter().any(|c| c == feature) {
            clear.push(feature.to_string());
        }
    }
    for param in REQUIRED.iter().chain(SPEEDUPS.iter()) {
        if !words.iter().any(|w| w == param) {
            words.push(param.to_string());
        }
    }
    words.push(format!("clearcpuid={}", clear.join(",")));
    words.extend(init_args.map(String::from));
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_the_measured_set() {
        let line = with_pvm_params("console=ttyS0 reboot=k panic=1");
        assert!(line.starts_with("console=ttyS0 reboot=k panic=1 noxsave pvm_syscall"));
        assert!(line.contains("tsc=reliable"));
        assert!(line.contains(" rcupdate.rcu_cpu_stall_suppress=1 "));
        assert!(line.ends_with(
            "clearcpuid=cx16,rdtscp,rdpid,popcnt,smap,clwb,fsgsbase,pcid,invpcid,erms,fsrm"
        ));
    }

    #[test]
    fn init_arguments_stay_last_and_untouched() {
        let line = with_pvm_params("console=ttyS0 -- initarg clearcpuid=x  noxsave");
        let (kernel, init) = line.split_once(" -- ").unwrap();
        assert_eq!(init, "initarg clearcpuid=x  noxsave");
        assert!(
            kernel.starts_with("console=ttyS0 noxsave pvm_syscall"),
            "{line}"
        );
        assert!(kernel.ends_with(
            "clearcpuid=cx16,rdtscp,rdpid,popcnt,smap,clwb,fsgsbase,pcid,invpcid,erms,fsrm"
        ));
        // `--` as the very first word: everything is for init.
        assert!(with_pvm_params("-- a").ends_with("fsrm -- a"));
        // A word that merely starts with dashes is a kernel parameter.
        assert!(with_pvm_params("--x").starts_with("--x noxsave"));
    }

    #[test]
    fn merges_a_user_clearcpuid_and_skips_duplicates() {
        let line = with_pvm_params("clearcpuid=avx,cx16 noxsave quiet");
        assert_eq!(line.matches("clearcpuid=").count(), 1);
        assert_eq!(line.matches("noxsave").count(), 1);
        assert!(line.contains("clearcpuid=avx,cx16,rdtscp"));
        assert!(line.contains("quiet"));
    }
}
