//! The CPUID each vCPU sees: KVM's supported set, with our topology and without a PMU.
//! (On PVM hosts KVM accepts but ignores this table; the kernel parameters in `pvm` do the
//! hiding there. We still set it: on ordinary KVM it is what the guest sees.)

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;
const LEAF_AMD_PMU_V2: u32 = 0x8000_0022;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// AMD core performance counter extensions.
const EXT_ECX_PERFCTR_CORE: u32 = 1 << 23;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// One socket of `count` single-threaded cores; vCPU `index` has APIC id `index`.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    pub index: u8,
    pub count: u8,
}

impl Topology {
    /// Bits of the APIC id that number the cores within the package.
    fn core_bits(&self) -> u32 {
        u32::from(self.count).next_power_of_two().trailing_zeros()
    }
}

/// Rewrites `cpuid` (as KVM_GET_SUPPORTED_CPUID returned it) for one vCPU.
pub fn filter_cpuid(cpuid: &mut CpuId, topology: Topology) {
    for entry in cpuid.as_mut_slice() {
        filter_entry(entry, topology);
    }
}

fn filter_entry(entry: &mut kvm_cpuid_entry2, topo: Topology) {
    let apic_id = u32::from(topo.index);
    let count = u32::from(topo.count);
    match entry.function {
        LEAF_FEATURES => {
            // EBX: initial APIC id [31:24], logical processors per package [23:16].
            entry.ebx = (entry.ebx & 0xffff) | (apic_id << 24) | (count << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
            entry.eax &= 0x3fff;
            if entry.eax & 0x1f != 0 {
                entry.eax |= (count - 1) << 26;
            }
        }
        LEAF_PMU | LEAF_AMD_PMU_V2 => {
            // `-cpu host,pmu=off`: no architectural performance monitoring.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            entry.edx = apic_id;
            entry.ecx = entry.index & 0xff;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx |= TOPOLOGY_LEVEL_SMT << 8;
                }
                1 => {
                    entry.eax = topo.core_bits();
                    entry.ebx = count;
                    entry.ecx |= TOPOLOGY_LEVEL_CORE << 8;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                }
            }
        }
        LEAF_EXT_FEATURES => entry.ecx &= !EXT_ECX_PERFCTR_CORE,
        LEAF_EXT_ADDRESS_SIZES => {
            // ECX[15:12]: APIC id bits for cores; ECX[7:0]: cores - 1.
            entry.ecx = (entry.ecx & !0xf0ff) | (topo.core_bits() << 12) | (count - 1);
        }
        LEAF_EXT_APIC_ID => {
            entry.eax = apic_id;
            // EBX[15:8]: threads per core - 1 (0); EBX[7:0]: core id.
            entry.ebx = apic_id & 0xff;
            entry.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0x0080_0000,
            edx: 0,
            ..Default::default()
        }
    }

    fn filtered(function: u32, index: u32, topo: Topology) -> kvm_cpuid_entry2 {
        let mut cpuid = CpuId::from_entries(&[entry(function, index)]).unwrap();
        filter_cpuid(&mut cpuid, topo);
        cpuid.as_slice()[0]
    }

    #[test]
    fn leaf1_has_apic_id_count_and_hypervisor_bit() {
        let e = filtered(LEAF_FEATURES, 0, Topology { index: 2, count: 4 });
        assert_eq!(e.ebx >> 24, 2);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        let single = filtered(LEAF_FEATURES, 0, Topology { index: 0, count: 1 });
        assert_eq!(single.edx & EDX_HTT, 0);
    }

    #[test]
    fn pmu_leaves_are_cleared() {
        for leaf in [LEAF_PMU, LEAF_AMD_PMU_V2] {
            let e = filtered(leaf, 0, Topology { index: 0, count: 1 });
            assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
        }
        let ext = filtered(LEAF_EXT_FEATURES, 0, Topology { index: 0, count: 1 });
        assert_eq!(ext.ecx & EXT_ECX_PERFCTR_CORE, 0);
    }

    #[test]
    fn topology_leaves_describe_one_socket_of_cores() {
        let topo = Topology { index: 3, count: 6 };
        let smt = filtered(LEAF_TOPOLOGY, 0, topo);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        let core = filtered(LEAF_TOPOLOGY, 1, topo);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 3));
        let amd = filtered(LEAF_EXT_ADDRESS_SIZES, 0, topo);
        assert_eq!(amd.ecx & 0xf0ff, (3 << 12) | 5);
        let ext = filtered(LEAF_EXT_APIC_ID, 0, topo);
        assert_eq!(ext.eax, 3);
    }

    #[test]
    fn other_leaves_pass_through() {
        let kvm_signature = filtered(0x4000_0000, 0, Topology { index: 1, count: 2 });
        assert_eq!(kvm_signature, entry(0x4000_0000, 0));
    }
}
