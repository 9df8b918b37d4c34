//! Backend choice: VIP lookup, the connection table, then the VIP's Maglev ring.
use lb_common::{
    flow_hash, vip_filter_slot, BackendInfo, FlowKey, FlowState, VipInfo, VipKey, BACKEND_USABLE,
    FLOW_CLOSED_FIN, FLOW_CLOSED_RST, MAGLEV_LANES, NO_BACKEND, SETTING_NO_EVERY_PORT_VIPS,
    TCP_ACK, TCP_SYN,
};

use crate::maps::{BACKENDS, MAGLEV, SETTINGS, VIPS, VIP_BY_ID, VIP_FILTER};

/// Whether the flow's destination may be a VIP address: its `VIP_FILTER`
/// slot is set (an array read, no hashing). A clear slot means it is not.
#[inline(always)]
pub fn may_be_vip(key: &FlowKey) -> bool {
    match VIP_FILTER.get(vip_filter_slot(key.dst_words())) {
        Some(n) => *n != 0,
        None => true,
    }
}

/// Whether the VIP a connection-table entry was recorded for (`vip_id`) is
/// still the VIP the flow is addressed to: `VIP_BY_ID` holds each live VIP's
/// key by id (the agent clears an id's entry when its VIP goes). Lets an
/// established flow skip the VIP table.
#[inline(always)]
pub fn vip_is_live(key: &FlowKey, vip_id: u32) -> bool {
    let Some(v) = VIP_BY_ID.get(vip_id) else {
        return false;
    };
    let (a, b) = (v.addr_words(), key.dst_words());
    a[0] == b[0]
        && a[1] == b[1]
        && a[2] == b[2]
        && a[3] == b[3]
        && v.proto == key.proto
        && v.family == key.family
        && (v.port == key.dport || v.port == 0)
}

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
    /// The backend's entry in `BACKENDS` (read in place, not copied).
    pub backend: &'static BackendInfo,
    /// The flow's connection-table entry, or `None` for a flow not yet recorded.
    pub flow: Option<*mut FlowState>,
    /// The flow hash (remembered in the connection table, computed otherwise).
    pub hash: u32,
    /// The VIP the entry was recorded for (0 for a flow not yet recorded).
    pub vip_id: u32,
}

/// The backend of a flow the connection table knows, when that backend is
/// still usable, so established flows survive Maglev changes. A SYN without
/// ACK on an entry whose connection closed is a new connection reusing the
/// 5-tuple: `None`, so it is balanced and recorded afresh like any new flow,
/// while the closed connection's late packets still follow the entry.
/// The entry is returned too, if there is one (with `None`: one set aside,
/// which the new choice replaces).
#[inline(always)]
pub fn known_flow(key: &FlowKey, tcp_flags: u8) -> (Option<Choice>, Option<*mut FlowState>) {
    let Some(state) = crate::flows::find(key) else {
        return (None, None);
    };
    (follow(state, tcp_flags), Some(state))
}

#[inline(always)]
fn follow(state: *mut FlowState, tcp_flags: u8) -> Option<Choice> {
    // SAFETY: a valid entry pointer; FlowState is plain data.
    let (id, closed, hash, vip_id) = unsafe {
        (
            (*state).backend_id,
            (*state).state & (FLOW_CLOSED_FIN | FLOW_CLOSED_RST) != 0,
            (*state).hash,
            (*state).vip_id,
        )
    };
    if closed && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return None;
    }
    let b = BACKENDS.get(id)?;
    if b.flags & BACKEND_USABLE == 0 {
        return None;
    }
    Some(Choice {
        backend_id: id,
        backend: b,
        flow: Some(state),
        hash,
        vip_id,
    })
}

/// The backend the VIP's Maglev ring gives a flow the connection table does
/// not know (or whose entry `known_flow` set aside); the caller records it.
#[inline(always)]
pub fn maglev_choice(key: &FlowKey, vip: &VipInfo) -> Option<Choice> {
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
    let backend = BACKENDS.get(id)?;
    if backend.flags & BACKEND_USABLE == 0 {
        return None;
    }
    Some(Choice {
        backend_id: id,
        backend,
        flow: None,
        hash,
        vip_id: vip.vip_id,
    })
}
