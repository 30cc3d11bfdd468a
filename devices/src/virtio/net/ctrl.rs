//! The control queue (virtio 1.2, 5.1.6.5) as Linux's driver uses it: rx mode (promiscuous,
//! all-multicast), the MAC filter table and the MAC address, the number of queue pairs, and
//! the guest's receive offloads. Each request is `{class, command}`, data, and one byte the
//! device writes back (OK or ERR).

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net as vn;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::tap::Tap;
use super::{tap_offloads, Shared, VIRTIO_RING_F_INDIRECT_DESC};
use crate::virtio::chain::{pop_chain, rearm};

/// Entries one MAC table may hold; more make the device accept everything of that kind, as if
/// promiscuous for it (what QEMU does past its 64).
pub const MAC_TABLE_ENTRIES: usize = 64;
/// The longest request data we read (a MAC table of 2 × 64 entries is under 800 bytes; Linux
/// sends at most its address lists, which we cap).
const MAX_REQUEST: usize = 4096;

/// Which frames the guest wants, by destination address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilter {
    pub mac: [u8; 6],
    pub promisc: bool,
    pub allmulti: bool,
    /// Extra unicast addresses; `None` when the table overflowed (accept all unicast).
    pub unicast: Option<Vec<[u8; 6]>>,
    /// Multicast addresses; `None` when the table overflowed (accept all multicast).
    pub multicast: Option<Vec<[u8; 6]>>,
}

impl RxFilter {
    /// The state after reset: Linux starts promiscuous-free but expects multicast to flow
    /// until it sends its table (virtio 1.2: "the device SHOULD accept multicast" before).
    pub fn new(mac: [u8; 6]) -> Self {
        RxFilter {
            mac,
            promisc: true,
            allmulti: true,
            unicast: Some(Vec::new()),
            multicast: Some(Vec::new()),
        }
    }

    /// Whether a frame for `dest` reaches the guest.
    pub fn accepts(&self, dest: &[u8; 6]) -> bool {
        if self.promisc || *dest == self.mac {
            return true;
        }
        if dest[0] & 1 != 0 {
            if *dest == [0xff; 6] || self.allmulti {
                return true;
            }
            return self.multicast.as_ref().is_none_or(|m| m.contains(dest));
        }
        self.unicast.as_ref().is_none_or(|u| u.contains(dest))
    }
}

/// What the control queue needs besides the queue itself.
pub(crate) struct CtrlContext<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub shared: &'a Shared,
    pub taps: &'a [Tap],
    pub acked_features: u64,
    /// Queue pairs the driver may enable (1 without MQ).
    pub max_pairs: usize,
}

/// Serves every pending request; returns whether any completed (the caller interrupts).
pub(crate) fn process(queue: &mut Queue, ctx: &CtrlContext) -> bool {
    let mut used = false;
    // A queue's worth per wake: the driver waits for each answer, so there is rarely more.
    let mut budget = queue.size();
    let indirect = ctx.acked_features & VIRTIO_RING_F_INDIRECT_DESC != 0;
    loop {
        let _ = queue.disable_notification(ctx.mem);
        while let Some(chain) = pop_chain(queue, ctx.mem, indirect) {
            let head = chain.head_index();
            let len = handle(chain, ctx);
            if queue.add_used(ctx.mem, head, len).is_err() {
                return used;
            }
            used = true;
            budget = budget.saturating_sub(1);
            if budget == 0 {
                return used;
            }
        }
        // EVENT_IDX: publish where we are, or the driver would not kick for the next one.
        if !rearm(queue, ctx.mem) {
            return used;
        }
    }
}

/// Handles one request; returns the bytes written (1 with an ack, 0 for a malformed chain).
fn handle(chain: DescriptorChain<&GuestMemoryMmap>, ctx: &CtrlContext) -> u32 {
    let mem = ctx.mem;
    let Ok(mut reader) = chain.clone().reader(mem) else {
        return 0;
    };
    let Ok(mut writer) = chain.writer(mem) else {
        return 0;
    };
    let Ok(header) = reader.read_obj::<[u8; 2]>() else {
        return 0;
    };
    let avail = reader.available_bytes().min(MAX_REQUEST);
    let mut data = vec![0u8; avail];
    if std::io::Read::read_exact(&mut reader, &mut data).is_err() || writer.available_bytes() < 1 {
        return 0;
    }
    let ok = apply(header[0], header[1], &data, ctx);
    let ack = if ok {
        vn::VIRTIO_NET_OK
    } else {
        vn::VIRTIO_NET_ERR
    } as u8;
    match writer.write_obj(ack) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

fn update_filter(ctx: &CtrlContext, change: impl FnOnce(&mut RxFilter)) {
    let mut filter = ctx.shared.filter.lock().unwrap_or_else(|p| p.into_inner());
    change(&mut filter);
    ctx.shared.filter_gen.fetch_add(1, Ordering::AcqRel);
}

/// Parses one `struct virtio_net_ctrl_mac` (le32 entries, then 6 bytes each) at the start of
/// `data`; returns the table (None past MAC_TABLE_ENTRIES) and the rest of `data`.
#[allow(clippy::type_complexity)]
fn mac_table(data: &[u8]) -> Option<(Option<Vec<[u8; 6]>>, &[u8])> {
    let entries = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let bytes = entries.checked_mul(6)?;
    let rest = data.get(4..)?;
    let table = rest.get(..bytes)?;
    let list = (entries <= MAC_TABLE_ENTRIES).then(|| {
        table
            .chunks_exact(6)
            .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
            .collect()
    });
    Some((list, &rest[bytes..]))
}

fn apply(class: u8, command: u8, data: &[u8], ctx: &CtrlContext) -> bool {
    let has = |f: u32| ctx.acked_features & (1 << f) != 0;
    match (u32::from(class), u32::from(command)) {
        (
            vn::VIRTIO_NET_CTRL_RX,
            cmd @ (vn::VIRTIO_NET_CTRL_RX_PROMISC | vn::VIRTIO_NET_CTRL_RX_ALLMULTI),
        ) if has(vn::VIRTIO_NET_F_CTRL_RX) => {
            let [on] = data else { return false };
            let on = *on != 0;
            update_filter(ctx, |f| {
                if cmd == vn::VIRTIO_NET_CTRL_RX_PROMISC {
                    f.promisc = on;
                } else {
                    f.allmulti = on;
                }
            });
            true
        }
        (vn::VIRTIO_NET_CTRL_MAC, vn::VIRTIO_NET_CTRL_MAC_TABLE_SET)
            if has(vn::VIRTIO_NET_F_CTRL_RX) =>
        {
            let Some((unicast, rest)) = mac_table(data) else {
                return false;
            };
            let Some((multicast, rest)) = mac_table(rest) else {
                return false;
            };
            if !rest.is_empty() {
                return false;
            }
            update_filter(ctx, |f| {
                f.unicast = unicast;
                f.multicast = multicast;
            });
            true
        }
        (vn::VIRTIO_NET_CTRL_MAC, vn::VIRTIO_NET_CTRL_MAC_ADDR_SET)
            if has(vn::VIRTIO_NET_F_CTRL_MAC_ADDR) =>
        {
            let Ok(mac) = <[u8; 6]>::try_from(data) else {
                return false;
            };
            if mac[0] & 1 != 0 {
                return false;
            }
            *ctx.shared.mac.lock().unwrap_or_else(|p| p.into_inner()) = mac;
            update_filter(ctx, |f| f.mac = mac);
            true
        }
        (vn::VIRTIO_NET_CTRL_MQ, vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET)
            if has(vn::VIRTIO_NET_F_MQ) =>
        {
            let Ok(pairs) = <[u8; 2]>::try_from(data) else {
                return false;
            };
            let pairs = usize::from(u16::from_le_bytes(pairs));
            if pairs == 0 || pairs > ctx.max_pairs {
                return false;
            }
            // Frames for pairs the guest does not use would wait in queues nobody serves.
            ctx.taps.iter().enumerate().all(|(q, tap)| {
                tap.set_queue_enabled(q < pairs)
                    .inspect_err(|e| log::warn!("virtio-net: {e}"))
                    .is_ok()
            })
        }
        (vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS, vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET)
            if has(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) =>
        {
            let Ok(bytes) = <[u8; 8]>::try_from(data) else {
                return false;
            };
            let offloads = u64::from_le_bytes(bytes);
            // Only offloads negotiated at feature time may be turned on.
            if offloads & !ctx.acked_features != 0 {
                return false;
            }
            let flags = tap_offloads(offloads);
            ctx.taps.iter().all(|tap| tap.set_offload(flags).is_ok())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_rules() {
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let mut f = RxFilter::new(mac);
        f.promisc = false;
        f.allmulti = false;
        assert!(f.accepts(&mac));
        assert!(f.accepts(&[0xff; 6]));
        assert!(!f.accepts(&[0x52, 0x54, 0, 0, 0, 2]));
        assert!(!f.accepts(&[0x33, 0x33, 0, 0, 0, 1]));
        f.multicast = Some(vec![[0x33, 0x33, 0, 0, 0, 1]]);
        assert!(f.accepts(&[0x33, 0x33, 0, 0, 0, 1]));
        f.multicast = None;
        assert!(f.accepts(&[0x33, 0x33, 0, 0, 0, 2]));
        f.unicast = Some(vec![[0x52, 0x54, 0, 0, 0, 2]]);
        assert!(f.accepts(&[0x52, 0x54, 0, 0, 0, 2]));
        f.promisc = true;
        assert!(f.accepts(&[0x52, 0x54, 0, 0, 0, 3]));
    }

    #[test]
    fn mac_tables() {
        let mut data = 1u32.to_le_bytes().to_vec();
        data.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        data.extend_from_slice(&0u32.to_le_bytes());
        let (uni, rest) = mac_table(&data).unwrap();
        assert_eq!(uni, Some(vec![[2, 0, 0, 0, 0, 1]]));
        let (multi, rest) = mac_table(rest).unwrap();
        assert_eq!(multi, Some(vec![]));
        assert!(rest.is_empty());
        // Short, absurd and overflowing tables.
        assert!(mac_table(&[1, 0]).is_none());
        assert!(mac_table(&u32::MAX.to_le_bytes()).is_none());
        let mut big = 65u32.to_le_bytes().to_vec();
        big.extend(std::iter::repeat_n(0u8, 65 * 6));
        assert_eq!(mac_table(&big).unwrap().0, None);
    }
}
