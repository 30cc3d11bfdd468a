//! Gives a program compiled by seccompiler a binary-search dispatch on the syscall number, for
//! build.rs (and compiled into the crate only for its tests).
//!
//! seccompiler emits one block per syscall, checked one after the other: a syscall outside the
//! policy walks every block before reaching the default action. Installing a filter costs about
//! 1 µs per instruction on our hosts, half of it in the kernel's seccomp_cache_prepare, which
//! emulates the program for every syscall number to find the always-allowed ones, walking that
//! whole chain for each number outside the policy. A tree of `JGE` tests right after the
//! syscall-number load makes every such walk logarithmic, and keeps the kernel's cache (it
//! emulates `JGE` and `JA`).
//!
//! The rewrite is checked, not assumed: the path a syscall number outside the policy takes from
//! the load must consist only of `JEQ nr` checks (one per syscall, each starting its block) and
//! `JA` skips, and no other instruction may jump onto that path. Then for a syscall number equal
//! to a block's, the original program reaches that block's `JEQ` with A still the number and
//! never comes back to the path, so jumping there directly is equivalent; and each block's
//! mismatch skip can go straight to the default action, since the tree only sends a number to a
//! block that holds it or to none that does. Anything else fails the build. Last, jumps onto a
//! `JA` are threaded through it, jumps to a return share the last identical one in reach, and
//! what nothing reaches any more is dropped: the kernel translates and compiles every
//! instruction at install time, and this halves seccompiler's count, tree included.

use std::fmt;

use seccompiler::sock_filter;

const LD_W_ABS: u16 = 0x20;
const JMP: u16 = 0x05;
const JA: u16 = JMP;
const JEQ_K: u16 = JMP | 0x10;
const JGE_K: u16 = JMP | 0x30;
const RET: u16 = 0x06;
const RET_K: u16 = RET;
/// Offset of `nr` in struct seccomp_data.
const NR_OFFSET: u32 = 0;
/// BPF_MAXINSNS: the kernel refuses longer programs.
const MAX_LEN: usize = 4096;
/// Conditional jumps reach at most this many instructions ahead.
const MAX_SHORT_JUMP: usize = u8::MAX as usize;

#[derive(Debug, PartialEq, Eq)]
pub enum DispatchError {
    NoSyscallLoad,
    PrefixJumpsPastLoad { at: usize },
    JumpOutOfProgram { at: usize },
    UnexpectedOnMismatchPath { at: usize, code: u16 },
    SharedMismatchPath { at: usize },
    DuplicateSyscall { nr: u32 },
    NoSkipAfterCheck { at: usize },
    TooLong { len: usize },
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSyscallLoad => write!(f, "no load of the syscall number"),
            Self::PrefixJumpsPastLoad { at } => {
                write!(f, "instruction {at} jumps past the syscall-number load")
            }
            Self::JumpOutOfProgram { at } => write!(f, "instruction {at} jumps out of the program"),
            Self::UnexpectedOnMismatchPath { at, code } => write!(
                f,
                "instruction {at} (opcode {code:#x}) is on the path of a syscall outside the \
                 policy, where only JEQ and JA are expected: seccompiler's layout changed"
            ),
            Self::SharedMismatchPath { at } => write!(
                f,
                "instruction {at}, on the path of a syscall outside the policy, is also reached \
                 from elsewhere"
            ),
            Self::DuplicateSyscall { nr } => write!(f, "syscall {nr} is checked twice"),
            Self::NoSkipAfterCheck { at } => write!(
                f,
                "the check at instruction {at} does not skip its block with a JA when it fails"
            ),
            Self::TooLong { len } => {
                write!(
                    f,
                    "the dispatched program has {len} instructions, over {MAX_LEN}"
                )
            }
        }
    }
}

impl std::error::Error for DispatchError {}

/// Where `program[at]` may go next (a conditional jump whose branches agree counts once).
fn successors(program: &[sock_filter], at: usize) -> Result<Vec<usize>, DispatchError> {
    let insn = &program[at];
    let next = at + 1;
    let targets = if insn.code & 0x07 == RET {
        vec![]
    } else if insn.code == JA {
        vec![next.saturating_add(insn.k as usize)]
    } else if insn.code & 0x07 == JMP {
        let (taken, not_taken) = (next + usize::from(insn.jt), next + usize::from(insn.jf));
        if taken == not_taken {
            vec![taken]
        } else {
            vec![taken, not_taken]
        }
    } else {
        vec![next]
    };
    if targets.iter().any(|&t| t >= program.len()) {
        return Err(DispatchError::JumpOutOfProgram { at });
    }
    Ok(targets)
}

/// What a tree test sends a syscall number to.
#[derive(Clone, Copy)]
enum Child {
    Node(usize),
    /// A block's `JEQ`, by its index in the original program.
    Block(usize),
}

/// `JGE k`: numbers >= k go right, the others left.
struct Node {
    k: u32,
    right: Child,
    left: Child,
}

/// Pushes the nodes of the balanced tree over `blocks` (sorted by number) in the order they
/// are laid out: each node, then its right subtree, then its left.
fn build_tree(blocks: &[(u32, usize)], nodes: &mut Vec<Node>) -> Child {
    if let [(_, block)] = blocks {
        return Child::Block(*block);
    }
    let mid = blocks.len() / 2;
    let at = nodes.len();
    nodes.push(Node {
        k: blocks[mid].0,
        right: Child::Block(0),
        left: Child::Block(0),
    });
    let right = build_tree(&blocks[mid..], nodes);
    let left = build_tree(&blocks[..mid], nodes);
    nodes[at].right = right;
    nodes[at].left = left;
    Child::Node(at)
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// `program` with a binary search on the syscall number inserted right after its load.
pub fn dispatch(program: &[sock_filter]) -> Result<Vec<sock_filter>, DispatchError> {
    let load = program
        .iter()
        .position(|insn| insn.code == LD_W_ABS && insn.k == NR_OFFSET)
        .ok_or(DispatchError::NoSyscallLoad)?;
    let mut predecessors = vec![0usize; program.len()];
    for at in 0..program.len() {
        for target in successors(program, at)? {
            if at < load && target > load {
                return Err(DispatchError::PrefixJumpsPastLoad { at });
            }
            predecessors[target] += 1;
        }
    }

    // The path of a number that no check matches.
    let mut blocks = Vec::new();
    let mut at = load + 1;
    let default = loop {
        let insn = &program[at];
        if insn.code == RET_K {
            break at;
        }
        if predecessors[at] != 1 {
            return Err(DispatchError::SharedMismatchPath { at });
        }
        match insn.code {
            JEQ_K => {
                blocks.push((insn.k, at));
                at += 1 + usize::from(insn.jf);
            }
            JA => at += 1 + insn.k as usize,
            code => return Err(DispatchError::UnexpectedOnMismatchPath { at, code }),
        }
    };
    blocks.sort_unstable();
    if let Some(pair) = blocks.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(DispatchError::DuplicateSyscall { nr: pair[0].0 });
    }

    let mut out = program.to_vec();
    for &(_, check) in &blocks {
        let skip = check + 1 + usize::from(program[check].jf);
        match program[skip].code {
            // The skip is on the path, so only this check reaches it.
            JA => out[skip].k = (default - skip - 1) as u32,
            RET_K if skip == default => {}
            _ => return Err(DispatchError::NoSkipAfterCheck { at: check }),
        }
    }
    if blocks.len() < 2 {
        return tighten(out);
    }

    let mut nodes = Vec::new();
    build_tree(&blocks, &mut nodes);
    // A branch too far for a conditional jump goes through a JA right after its node; adding
    // one only lengthens jumps, so repeat until every short jump fits.
    let start = load + 1;
    let mut far = vec![[false; 2]; nodes.len()];
    let (position, len) = loop {
        let mut position = Vec::with_capacity(nodes.len());
        let mut len = 0;
        for far in &far {
            position.push(start + len);
            len += 1 + far.iter().filter(|&&f| f).count();
        }
        let target = |child: Child| match child {
            Child::Node(node) => position[node],
            Child::Block(block) => block + len,
        };
        let mut changed = false;
        for (at, node) in nodes.iter().enumerate() {
            for (side, child) in [node.right, node.left].into_iter().enumerate() {
                if !far[at][side] && target(child) - (position[at] + 1) > MAX_SHORT_JUMP {
                    far[at][side] = true;
                    changed = true;
                }
            }
        }
        if !changed {
            break (position, len);
        }
    };
    let target = |child: Child| match child {
        Child::Node(node) => position[node],
        Child::Block(block) => block + len,
    };

    let mut tree = Vec::with_capacity(len);
    for (at, node) in nodes.iter().enumerate() {
        let next = position[at] + 1;
        let mut far_jumps = Vec::new();
        let mut short = [0u8; 2];
        for (side, child) in [node.right, node.left].into_iter().enumerate() {
            let to = if far[at][side] {
                far_jumps.push(target(child));
                next + far_jumps.len() - 1
            } else {
                target(child)
            };
            // Checked by the loop above (a far jump's JA is at most 2 ahead).
            short[side] = (to - next) as u8;
        }
        tree.push(jump(JGE_K, node.k, short[0], short[1]));
        for (i, to) in far_jumps.into_iter().enumerate() {
            tree.push(jump(JA, (to - (next + i) - 1) as u32, 0, 0));
        }
    }
    out.splice(start..start, tree);
    let out = tighten(out)?;
    if out.len() > MAX_LEN {
        return Err(DispatchError::TooLong { len: out.len() });
    }
    Ok(out)
}

/// Jumps that land on a `JA` go where it goes, jumps to a return go to the last identical one
/// they reach (conditional jumps reach 255 ahead), and the instructions nothing reaches any
/// more (the skips the dispatch bypasses, each block's mismatch path, the returns now shared)
/// are dropped. All keep what every input returns.
fn tighten(mut program: Vec<sock_filter>) -> Result<Vec<sock_filter>, DispatchError> {
    loop {
        // Backwards, so that the JA a jump lands on already goes to its final place.
        for at in (0..program.len()).rev() {
            let insn = program[at].clone();
            // The offset a jump of `offset`, reaching `reach` ahead, had better take.
            let better = |offset: usize, reach: usize| {
                let mut to = at + 1 + offset;
                if program[to].code == JA {
                    to += 1 + program[to].k as usize;
                }
                let last = program
                    .len()
                    .min(at.saturating_add(reach).saturating_add(2))
                    - 1;
                if program[to].code == RET_K {
                    let (code, k) = (program[to].code, program[to].k);
                    let same = |&r: &usize| program[r].code == code && program[r].k == k;
                    if let Some(r) = (at + 1..=last).rev().find(same) {
                        to = r;
                    }
                }
                if to <= last {
                    to - at - 1
                } else {
                    offset
                }
            };
            if insn.code == JA {
                program[at].k = better(insn.k as usize, usize::MAX) as u32;
            } else if insn.code & 0x07 == JMP {
                let short = |offset: u8| better(usize::from(offset), MAX_SHORT_JUMP) as u8;
                let (jt, jf) = (short(insn.jt), short(insn.jf));
                program[at].jt = jt;
                program[at].jf = jf;
            }
        }

        // Jumps only go forward, so one pass finds everything reachable.
        let mut reachable = vec![false; program.len()];
        reachable[0] = true;
        for at in 0..program.len() {
            if reachable[at] {
                for target in successors(&program, at)? {
                    reachable[target] = true;
                }
            }
        }
        if reachable.iter().all(|&r| r) {
            return Ok(program);
        }
        let mut position = Vec::with_capacity(program.len());
        let mut kept = 0;
        for &r in &reachable {
            position.push(kept);
            kept += usize::from(r);
        }
        let moved = |at: usize, offset: usize| position[at + 1 + offset] - position[at] - 1;
        program = program
            .iter()
            .enumerate()
            .filter(|&(at, _)| reachable[at])
            .map(|(at, insn)| {
                let mut insn = insn.clone();
                if insn.code == JA {
                    insn.k = moved(at, insn.k as usize) as u32;
                } else if insn.code & 0x07 == JMP {
                    // Offsets only shrink.
                    insn.jt = moved(at, usize::from(insn.jt)) as u8;
                    insn.jf = moved(at, usize::from(insn.jf)) as u8;
                }
                insn
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::{BTreeMap, BTreeSet};

    const JGT_K: u16 = JMP | 0x20;
    const JSET_K: u16 = JMP | 0x40;
    const ALU_AND_K: u16 = 0x54;
    const ARCH_OFFSET: usize = 4;
    const ARGS_OFFSET: usize = 16;
    const DATA_LEN: usize = 64;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;

    /// The action a program returns for a struct seccomp_data, and how many instructions it
    /// executed, interpreting only the opcodes seccompiler and the dispatch emit.
    fn run(program: &[sock_filter], data: &[u8; DATA_LEN]) -> (u32, usize) {
        let (mut a, mut pc, mut steps) = (0u32, 0usize, 0usize);
        loop {
            let insn = program
                .get(pc)
                .unwrap_or_else(|| panic!("ran past the end at {pc}"));
            let k = insn.k;
            steps += 1;
            pc += 1;
            let taken = match insn.code {
                LD_W_ABS => {
                    let at = k as usize;
                    assert!(at.is_multiple_of(4) && at < DATA_LEN, "load of {at}");
                    a = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                    continue;
                }
                ALU_AND_K => {
                    a &= k;
                    continue;
                }
                JA => {
                    pc += k as usize;
                    continue;
                }
                RET_K => return (k, steps),
                JEQ_K => a == k,
                JGT_K => a > k,
                JGE_K => a >= k,
                JSET_K => a & k != 0,
                code => panic!("opcode {code:#x} at {}", pc - 1),
            };
            pc += usize::from(if taken { insn.jt } else { insn.jf });
        }
    }

    fn data(arch: u32, nr: u32, args: &[u32; 12]) -> [u8; DATA_LEN] {
        let mut data = [0u8; DATA_LEN];
        data[..4].copy_from_slice(&nr.to_le_bytes());
        data[ARCH_OFFSET..ARCH_OFFSET + 4].copy_from_slice(&arch.to_le_bytes());
        for (slot, word) in args.iter().enumerate() {
            let at = ARGS_OFFSET + 4 * slot;
            data[at..at + 4].copy_from_slice(&word.to_le_bytes());
        }
        data
    }

    fn policy() -> BTreeMap<String, Vec<sock_filter>> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../resources/seccomp/x86_64.json"
        );
        let file = std::fs::File::open(path).unwrap();
        seccompiler::compile_from_json(file, seccompiler::TargetArch::x86_64)
            .unwrap()
            .into_iter()
            .collect()
    }

    /// Per argument word (6 arguments, low then high half), the values worth trying: every
    /// constant compared with or masked into it, ±1, 0 and all ones.
    fn argument_values(program: &[sock_filter]) -> Vec<Vec<u32>> {
        let mut values = vec![BTreeSet::from([0, u32::MAX]); 12];
        let mut slot = None;
        for insn in program {
            match insn.code {
                LD_W_ABS => {
                    slot = (insn.k as usize)
                        .checked_sub(ARGS_OFFSET)
                        .map(|offset| offset / 4)
                }
                JA | RET_K => {}
                _ => {
                    if let Some(slot) = slot {
                        let k = insn.k;
                        values[slot].extend([k.wrapping_sub(1), k, k.wrapping_add(1)]);
                    }
                }
            }
        }
        values
            .into_iter()
            .map(|set| set.into_iter().collect())
            .collect()
    }

    /// The syscall numbers a program checks.
    fn checked_numbers(program: &[sock_filter]) -> BTreeSet<u32> {
        let load = program
            .iter()
            .position(|insn| insn.code == LD_W_ABS && insn.k == NR_OFFSET)
            .unwrap();
        let mut numbers = BTreeSet::new();
        let mut at = load + 1;
        while program[at].code != RET_K {
            if program[at].code == JEQ_K {
                numbers.insert(program[at].k);
                at += 1 + usize::from(program[at].jf);
            } else {
                at += 1 + program[at].k as usize;
            }
        }
        numbers
    }

    #[test]
    fn dispatched_programs_return_what_the_originals_return() {
        let mut cases = 0usize;
        for (name, original) in policy() {
            let dispatched = dispatch(&original).unwrap();
            let values = argument_values(&original);
            let checked = checked_numbers(&original);
            // Argument words the policy looks at, for trying them in pairs.
            let compared: Vec<usize> = (0..12).filter(|&s| values[s].len() > 2).collect();
            let mut numbers: Vec<u32> = (0..=1023).collect();
            numbers.extend([
                0x4000_0000,
                0x4000_0001,
                0x4000_0000 + 59,
                u32::MAX - 1,
                u32::MAX,
            ]);
            for arch in [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386, 0x1234_5678] {
                for &nr in &numbers {
                    let mut check = |args: &[u32; 12]| {
                        let input = data(arch, nr, args);
                        assert_eq!(
                            run(&original, &input).0,
                            run(&dispatched, &input).0,
                            "{name}: arch {arch:#x} nr {nr} args {args:x?}"
                        );
                        cases += 1;
                    };
                    check(&[0; 12]);
                    check(&[u32::MAX; 12]);
                    if arch != AUDIT_ARCH_X86_64 || !checked.contains(&nr) {
                        continue;
                    }
                    // Each word alone over its values, the others 0 or all ones.
                    for base in [0, u32::MAX] {
                        for slot in 0..12 {
                            for &value in &values[slot] {
                                let mut args = [base; 12];
                                args[slot] = value;
                                check(&args);
                            }
                        }
                    }
                    // Every pair of compared words over their values (rules compare at most
                    // two arguments).
                    for (i, &first) in compared.iter().enumerate() {
                        for &second in &compared[i + 1..] {
                            for &x in &values[first] {
                                for &y in &values[second] {
                                    let mut args = [0; 12];
                                    args[first] = x;
                                    args[second] = y;
                                    check(&args);
                                }
                            }
                        }
                    }
                }
            }
        }
        eprintln!("{cases} cases");
        assert!(cases > 100_000, "{cases} cases");
    }

    #[test]
    fn a_syscall_outside_the_policy_walks_a_logarithmic_path() {
        for (name, original) in policy() {
            let dispatched = dispatch(&original).unwrap();
            let checked = checked_numbers(&original);
            let depth = usize::BITS - (checked.len() - 1).leading_zeros();
            // Arch check, load, a JGE and maybe a JA per level, the block's check, its skip,
            // the default.
            let bound = 3 + 1 + 2 * depth as usize + 3;
            let (mut linear, mut tree) = (0, 0);
            for nr in (0..1024).filter(|nr| !checked.contains(nr)) {
                let input = data(AUDIT_ARCH_X86_64, nr, &[0; 12]);
                let steps = run(&dispatched, &input).1;
                assert!(steps <= bound, "{name}: nr {nr}: {steps} steps > {bound}");
                linear = linear.max(run(&original, &input).1);
                tree = tree.max(steps);
            }
            eprintln!(
                "{name}: {} syscalls, {} -> {} instructions, longest walk outside the policy {linear} -> {tree}",
                checked.len(),
                original.len(),
                dispatched.len()
            );
            assert!(linear >= checked.len(), "{name}: {linear}");
            assert!(tree * 3 < linear, "{name}: {tree} vs {linear}");
        }
    }

    /// What the kernel's seccomp_cache_prepare concludes for `nr`: whether the program allows
    /// it whatever the arguments (it gives up at the first argument load).
    fn cached_as_allowed(program: &[sock_filter], nr: u32) -> bool {
        let input = data(AUDIT_ARCH_X86_64, nr, &[0; 12]);
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let insn = &program[pc];
            pc += 1;
            match insn.code {
                LD_W_ABS if insn.k as usize >= ARGS_OFFSET => return false,
                LD_W_ABS => {
                    a = u32::from_le_bytes(input[insn.k as usize..][..4].try_into().unwrap())
                }
                ALU_AND_K => a &= insn.k,
                JA => pc += insn.k as usize,
                RET_K => return insn.k == libc::SECCOMP_RET_ALLOW,
                code => {
                    let taken = match code {
                        JEQ_K => a == insn.k,
                        JGT_K => a > insn.k,
                        JGE_K => a >= insn.k,
                        JSET_K => a & insn.k != 0,
                        _ => panic!("opcode {code:#x}"),
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
            }
        }
    }

    #[test]
    fn the_kernel_still_caches_the_same_syscalls_as_always_allowed() {
        for (name, original) in policy() {
            let dispatched = dispatch(&original).unwrap();
            let cached = |program: &[sock_filter]| -> Vec<u32> {
                (0..1024)
                    .filter(|&nr| cached_as_allowed(program, nr))
                    .collect()
            };
            let before = cached(&original);
            assert!(!before.is_empty(), "{name}");
            assert_eq!(before, cached(&dispatched), "{name}");
        }
    }

    fn ld(k: u32) -> sock_filter {
        jump(LD_W_ABS, k, 0, 0)
    }

    fn ret(k: u32) -> sock_filter {
        jump(RET_K, k, 0, 0)
    }

    #[test]
    fn a_layout_it_does_not_know_fails() {
        let cases: [(&str, &[sock_filter], DispatchError); 5] = [
            (
                "an argument load on the path of an unchecked number",
                &[ld(0), jump(JEQ_K, 1, 0, 1), ret(1), ld(16), ret(0)],
                DispatchError::UnexpectedOnMismatchPath {
                    at: 3,
                    code: LD_W_ABS,
                },
            ),
            (
                "a block that jumps into the next block's check",
                &[
                    ld(0),
                    jump(JEQ_K, 1, 0, 1),
                    jump(JA, 0, 0, 0),
                    jump(JEQ_K, 2, 0, 1),
                    ret(1),
                    ret(0),
                ],
                DispatchError::SharedMismatchPath { at: 3 },
            ),
            (
                "a prefix that jumps over the load",
                &[ld(4), jump(JEQ_K, 5, 1, 0), ld(0), ret(0)],
                DispatchError::PrefixJumpsPastLoad { at: 1 },
            ),
            (
                "the same syscall checked twice",
                &[
                    ld(0),
                    jump(JEQ_K, 1, 1, 0),
                    jump(JA, 1, 0, 0),
                    ret(1),
                    jump(JEQ_K, 1, 1, 0),
                    ret(0),
                    ret(1),
                ],
                DispatchError::DuplicateSyscall { nr: 1 },
            ),
            (
                "no syscall number",
                &[ld(4), ret(0)],
                DispatchError::NoSyscallLoad,
            ),
        ];
        for (what, program, error) in cases {
            assert_eq!(dispatch(program), Err(error), "{what}");
        }
    }
}
