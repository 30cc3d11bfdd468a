//! MSI-X: the capability, the vector table and the pending-bit array.
//!
//! Each vector owns a GSI and an irqfd the VMM registered with KVM; the VMM also programs the
//! GSI's MSI route (through [`MsiRouting`], so this crate stays free of KVM) when the guest
//! makes the vector deliverable. Firing a vector is then one eventfd write. A vector that is
//! masked (by its own mask bit, the function mask, or MSI-X being off) sets its pending bit
//! instead; making it deliverable again fires the pending interrupt.

use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

pub const MSIX_CAP_ID: u8 = 0x11;
/// Message control bits.
const MSG_CTL_ENABLE: u16 = 1 << 15;
const MSG_CTL_FUNCTION_MASK: u16 = 1 << 14;
/// Size of one table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
const VECTOR_CTL_MASKED: u32 = 1;
/// At most this many vectors per function (the spec allows 2048; our devices need few).
pub const MAX_VECTORS: u16 = 256;

/// Programs KVM's GSI routing for MSI. Implemented by the VMM.
pub trait MsiRouting: Send + Sync {
    /// Routes `gsi` to the MSI message (`addr`, `data`).
    fn set_route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()>;
    /// Removes the route of `gsi`.
    fn clear_route(&self, gsi: u32) -> std::io::Result<()>;
}

/// One vector's delivery path: its GSI and the irqfd KVM listens on for it.
pub struct MsixVector {
    pub gsi: u32,
    pub irqfd: EventFd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctl: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Vectors come out of reset masked.
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            ctl: VECTOR_CTL_MASKED,
        }
    }
}

impl Entry {
    fn message(&self) -> (u64, u32) {
        (
            u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            self.data,
        )
    }
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    /// The message each vector's GSI is routed to now, if any.
    routed: Vec<Option<(u64, u32)>>,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<MsixVector>,
    routing: Arc<dyn MsiRouting>,
}

impl State {
    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.entries[v].ctl & VECTOR_CTL_MASKED == 0
    }

    /// Makes sure vector `v`'s route matches its table entry.
    fn sync_route(&mut self, v: usize) {
        let message = self.entries[v].message();
        if self.routed[v] == Some(message) {
            return;
        }
        match self
            .routing
            .set_route(self.vectors[v].gsi, message.0, message.1)
        {
            Ok(()) => self.routed[v] = Some(message),
            Err(e) => log::error!(
                "MSI-X: cannot route vector {v} (GSI {}): {e}",
                self.vectors[v].gsi
            ),
        }
    }

    /// Vector `v` may have become deliverable: route it and fire what is pending.
    fn update(&mut self, v: usize) {
        if !self.deliverable(v) {
            return;
        }
        self.sync_route(v);
        if std::mem::take(&mut self.pending[v]) {
            self.fire(v);
        }
    }

    fn fire(&self, v: usize) {
        if let Err(e) = self.vectors[v].irqfd.write(1) {
            log::error!("MSI-X: cannot signal vector {v}: {e}");
        }
    }
}

/// The MSI-X state of one function. Cloning shares it: the transport (vCPU threads) programs
/// it, the device side (any thread) fires vectors through a clone.
#[derive(Clone)]
pub struct Msix {
    state: Arc<Mutex<State>>,
}

impl Msix {
    pub fn new(vectors: Vec<MsixVector>, routing: Arc<dyn MsiRouting>) -> Self {
        let n = vectors.len();
        Self {
            state: Arc::new(Mutex::new(State {
                entries: vec![Entry::default(); n],
                pending: vec![false; n],
                routed: vec![None; n],
                enabled: false,
                function_masked: false,
                vectors,
                routing,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here panics with the lock held; a poisoned state is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn num_vectors(&self) -> u16 {
        self.lock().vectors.len() as u16
    }

    pub fn table_size(&self) -> u64 {
        u64::from(self.num_vectors()) * MSIX_ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        u64::from(self.num_vectors()).div_ceil(64) * 8
    }

    /// The capability body (after ID and next pointer): message control, table offset/BIR,
    /// PBA offset/BIR. The table and PBA live in BAR `bir`.
    pub fn capability_body(&self, bir: u8, table_offset: u32, pba_offset: u32) -> [u8; 10] {
        let ctl = self.num_vectors().saturating_sub(1);
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&ctl.to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bir)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bir)).to_le_bytes());
        body
    }

    /// Bits of the capability's first dword the guest may write (enable and function mask).
    pub const CAP_WRITABLE: u32 = ((MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK) as u32) << 16;

    /// The guest wrote message control (the upper half of the capability's first dword).
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        s.enabled = control & MSG_CTL_ENABLE != 0;
        s.function_masked = control & MSG_CTL_FUNCTION_MASK != 0;
        for v in 0..s.vectors.len() {
            s.update(v);
        }
    }

    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// A read of the table at `offset`; only aligned dword and qword accesses are defined.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let s = self.lock();
        if !(data.len() == 4 || data.len() == 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            let Some(entry) = s.entries.get((at / MSIX_ENTRY_SIZE) as usize) else {
                return;
            };
            let value = match at % MSIX_ENTRY_SIZE {
                0 => entry.addr_lo,
                4 => entry.addr_hi,
                8 => entry.data,
                _ => entry.ctl,
            };
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        if !(data.len() == 4 || data.len() == 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            let v = (at / MSIX_ENTRY_SIZE) as usize;
            if v >= s.entries.len() {
                return;
            }
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let entry = &mut s.entries[v];
            match at % MSIX_ENTRY_SIZE {
                0 => entry.addr_lo = value,
                4 => entry.addr_hi = value,
                8 => entry.data = value,
                // Only the mask bit is defined.
                _ => entry.ctl = value & VECTOR_CTL_MASKED,
            }
            // Route updates while deliverable (Linux rewrites the message of an unmasked
            // vector to change its affinity), and fire what was pending on unmask.
            s.update(v);
        }
    }

    /// The pending-bit array is read-only.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let bit0 = (offset + i as u64) * 8;
            *b = (0..8u64).fold(0u8, |acc, bit| {
                let pending = s
                    .pending
                    .get((bit0 + bit) as usize)
                    .copied()
                    .unwrap_or(false);
                acc | (u8::from(pending) << bit)
            });
        }
    }

    /// Signals vector `v`, or marks it pending if it is masked. Out-of-range vectors are
    /// ignored (the driver chose no vector).
    pub fn trigger(&self, v: u16) {
        let mut s = self.lock();
        let v = usize::from(v);
        if v >= s.vectors.len() {
            return;
        }
        // Routes are synced only where the table changes (vCPU threads, whose filter allows
        // KVM_SET_GSI_ROUTING); the device side (vmm thread) only writes the irqfd.
        if s.deliverable(v) {
            s.fire(v);
        } else {
            s.pending[v] = true;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records route changes instead of talking to KVM.
    #[derive(Default)]
    pub struct FakeRouting {
        pub routes: Mutex<Vec<(u32, u64, u32)>>,
    }

    impl MsiRouting for FakeRouting {
        fn set_route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()> {
            self.routes.lock().unwrap().push((gsi, addr, data));
            Ok(())
        }
        fn clear_route(&self, _gsi: u32) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub fn vectors(n: u32) -> Vec<MsixVector> {
        (0..n)
            .map(|i| MsixVector {
                gsi: 24 + i,
                irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            })
            .collect()
    }

    fn fired(msix: &Msix, v: usize) -> bool {
        msix.lock().vectors[v].irqfd.read().is_ok()
    }

    fn w32(msix: &Msix, offset: u64, v: u32) {
        msix.write_table(offset, &v.to_le_bytes());
    }

    fn pba(msix: &Msix) -> u8 {
        let mut b = [0];
        msix.read_pba(0, &mut b);
        b[0]
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let routing = Arc::new(FakeRouting::default());
        let msix = Msix::new(vectors(3), routing.clone());
        assert_eq!(msix.table_size(), 48);
        assert_eq!(msix.pba_size(), 8);
        // Out of reset: disabled, every vector masked.
        let mut b = [0; 4];
        msix.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        msix.trigger(1);
        assert!(!fired(&msix, 1));
        assert_eq!(pba(&msix), 0b010);

        // Program vector 1 (qword address write), enable with the function masked.
        msix.write_table(16, &0xfee0_1000u64.to_le_bytes());
        w32(&msix, 24, 0x4041);
        msix.set_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
        w32(&msix, 28, 0);
        assert!(!fired(&msix, 1), "function mask holds it");
        assert!(routing.routes.lock().unwrap().is_empty());
        msix.set_control(MSG_CTL_ENABLE);
        assert!(fired(&msix, 1), "pending vector fires once deliverable");
        assert_eq!(pba(&msix), 0);
        assert_eq!(
            *routing.routes.lock().unwrap(),
            vec![(25, 0xfee0_1000, 0x4041)]
        );

        msix.trigger(1);
        assert!(fired(&msix, 1));
        // Per-vector mask.
        w32(&msix, 28, 1);
        msix.trigger(1);
        assert!(!fired(&msix, 1));
        assert_eq!(pba(&msix), 0b010);
        w32(&msix, 28, 0);
        assert!(fired(&msix, 1));
        // A new message on a live vector is routed again; an unchanged one is not.
        w32(&msix, 24, 0x4042);
        w32(&msix, 28, 0);
        assert_eq!(routing.routes.lock().unwrap().len(), 2);
        // Disabled: pending again.
        msix.set_control(0);
        msix.trigger(1);
        assert!(!fired(&msix, 1));
        // Out of range vectors and odd accesses are ignored.
        msix.trigger(7);
        msix.trigger(0xffff);
        msix.write_table(2, &[1, 2]);
        msix.write_table(48, &[0; 4]);
        msix.read_table(3, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn capability_body_describes_table_and_pba() {
        let msix = Msix::new(vectors(2), Arc::new(FakeRouting::default()));
        let body = msix.capability_body(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 1, "table size - 1");
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x5000);
    }
}
