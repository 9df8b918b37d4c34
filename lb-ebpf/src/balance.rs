//! Backend choice: VIP lookup, the connection table, then the VIP's Maglev ring.
use lb_common::{
    flow_hash, BackendInfo, FlowKey, FlowState, VipInfo, VipKey, BACKEND_USABLE, FLOW_CLOSED_FIN,
    FLOW_CLOSED_RST, MAGLEV_LANES, NO_BACKEND, SETTING_NO_EVERY_PORT_VIPS, TCP_ACK, TCP_SYN,
};

use crate::maps::{BACKENDS, FLOWS, MAGLEV, SETTINGS, VIPS};

/// The VIP a flow is addressed to: exact port first, then the every-port VIP
/// (unless the agent said there is none).
#[inline(always)]
pub fn lookup_vip(key: &FlowKey) -> Option<VipInfo> {
    let mut vk = VipKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: VipInfo is plain data; a concurrent agent update can at worst give
    // a stale copy, which is what RCU readers see anyway.
    if let Some(v) = unsafe { VIPS.get(vk) } {
        return Some(*v);
    }
    if let Some(s) = SETTINGS.get(0) {
        if s.flags & SETTING_NO_EVERY_PORT_VIPS != 0 {
            return None;
        }
    }
    vk.port = 0;
    unsafe { VIPS.get(vk) }.copied()
}

/// Whether `addr` is the address of any VIP (the agent keeps a port-0,
/// protocol-0 marker per VIP address).
#[inline(always)]
pub fn is_vip_address(addr: &[u8; 16], family: u8) -> bool {
    let vk = VipKey {
        addr: *addr,
        port: 0,
        proto: 0,
        family,
    };
    VIPS.get_ptr(vk).is_some()
}

pub struct Choice {
    pub backend_id: u32,
    pub backend: BackendInfo,
    /// The flow's connection-table entry, or `None` for a flow not yet recorded.
    pub flow: Option<*mut FlowState>,
    /// The flow hash (remembered in the connection table, computed otherwise).
    pub hash: u32,
}

/// Picks the flow's backend. An entry in the connection table whose backend is
/// still usable wins, so established flows survive Maglev changes; otherwise the
/// VIP's Maglev ring decides (and the caller records the flow). A SYN without
/// ACK on an entry whose connection closed is a new connection reusing the
/// 5-tuple: it is balanced and recorded afresh, like any new flow, while the
/// closed connection's late packets still follow the entry.
#[inline(always)]
pub fn choose_backend(key: &FlowKey, vip: &VipInfo, tcp_flags: u8) -> Option<Choice> {
    if let Some(state) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a valid entry pointer; FlowState is plain data.
        let (id, closed) = unsafe {
            (
                (*state).backend_id,
                (*state).state & (FLOW_CLOSED_FIN | FLOW_CLOSED_RST) != 0,
            )
        };
        let reopened = closed && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if let Some(b) = BACKENDS.get(id) {
            if b.flags & BACKEND_USABLE != 0 && !reopened {
                return Some(Choice {
                    backend_id: id,
                    backend: *b,
                    flow: Some(state),
                    // SAFETY: as above.
                    hash: unsafe { (*state).hash },
                });
            }
        }
    }
    // Each VIP's ring has a size of its own, read from the entry already
    // loaded: the same one division the single global size took.
    let size = vip.ring_size;
    if size == 0 {
        return None;
    }
    let hash = flow_hash(key);
    let slot = vip.ring_base.wrapping_add(hash % size);
    let chunk = MAGLEV.get(slot / MAGLEV_LANES)?;
    let id = chunk[(slot % MAGLEV_LANES) as usize];
    if id == NO_BACKEND {
        return None;
    }
    let backend = *BACKENDS.get(id)?;
    if backend.flags & BACKEND_USABLE == 0 {
        return None;
    }
    Some(Choice {
        backend_id: id,
        backend,
        flow: None,
        hash,
    })
}
