//! Connection and traffic tracers: per-flow times, TCP flags and per-leg
//! counters, close detection, and sampled flow events to the agent.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use lb_common::{
    FlowEvent, FlowKey, FlowState, Settings, EVENTS_DROPPED, EVENTS_SENT, EVENT_CLOSE_FIN,
    EVENT_CLOSE_RST, EVENT_OPEN, FLOW_CLOSED_FIN, FLOW_CLOSED_RST, SETTING_TRACE_FLOWS, TCP_FIN,
    TCP_RST,
};

use crate::{
    counters,
    maps::{CLOCK_CACHE, EVENT_STATS, FLOWS, FLOW_EVENTS},
};

/// One forwarded packet of a VIP flow, as the tracers see it.
pub struct Packet<'a> {
    pub key: &'a FlowKey,
    pub vip_id: u32,
    pub backend_id: u32,
    pub hash: u32,
    pub tcp_flags: u8,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[inline(always)]
fn event(p: &Packet, settings: &Settings, kind: u32, now: u64) {
    let sample = settings.event_sample;
    if sample == 0 || !p.hash.is_multiple_of(sample) {
        return;
    }
    let ev = FlowEvent {
        key: *p.key,
        backend_id: p.backend_id,
        vip_id: p.vip_id,
        kind,
        tcp_flags: p.tcp_flags as u32,
        ts_ns: now,
    };
    let slot = if FLOW_EVENTS.output::<FlowEvent>(&ev, 0).is_ok() {
        EVENTS_SENT
    } else {
        EVENTS_DROPPED
    };
    if let Some(c) = EVENT_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value.
        unsafe { *c += 1 };
    }
}

/// `CLOCK_MONOTONIC_COARSE` in ns, the tracers' clock. The coarse clock moves
/// once per tick, so each CPU keeps its last reading with the jiffy it was
/// taken in and reads the clock again only when the jiffy changed: the kernel
/// inlines `bpf_jiffies64` into a load, while the clock read is a helper call
/// on every packet. A reading taken between a tick's jiffies update and its
/// clock update stays one tick behind until the next tick: a tick more of
/// imprecision on a clock that has a tick's precision anyway.
#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: helpers without arguments.
    let jiffy = unsafe { bpf_jiffies64() };
    let Some(c) = CLOCK_CACHE.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: per-CPU value, only this CPU uses it while the program runs.
    unsafe {
        if (*c)[0] == jiffy && (*c)[1] != 0 {
            return (*c)[1];
        }
        let now = bpf_ktime_get_coarse_ns();
        *c = [jiffy, now];
        now
    }
}

/// Records a flow the connection table did not know.
#[inline(always)]
pub fn new_flow(p: &Packet, settings: &Settings) {
    let trace = settings.flags & SETTING_TRACE_FLOWS != 0;
    // The coarse clock (a tick's precision) is plenty for ages and idle
    // times and much cheaper per packet.
    let now = if trace { coarse_now() } else { 0 };
    let state = FlowState {
        backend_id: p.backend_id,
        vip_id: p.vip_id,
        hash: p.hash,
        tcp_flags: p.tcp_flags,
        state: 0,
        _pad: [0; 2],
        first_ns: now,
        last_ns: now,
        packets_in: 1,
        bytes_in: p.bytes_in,
        bytes_out: p.bytes_out,
    };
    // A full LRU evicts its oldest entry; an error here only means the flow
    // is re-hashed next packet, which Maglev answers the same way.
    let _ = FLOWS.insert(p.key, state, 0);
    if trace {
        event(p, settings, EVENT_OPEN, now);
        closes(p, settings, None, now);
    }
}

/// Updates a known flow's tracers.
#[inline(always)]
pub fn known_flow(p: &Packet, settings: &Settings, state: *mut FlowState) {
    if settings.flags & SETTING_TRACE_FLOWS == 0 {
        return;
    }
    let now = coarse_now();
    // SAFETY: a connection-table entry; racing updates from two CPUs can lose
    // an increment, never corrupt the entry (a flow normally stays on one queue).
    unsafe {
        (*state).last_ns = now;
        (*state).tcp_flags |= p.tcp_flags;
        (*state).packets_in += 1;
        (*state).bytes_in += p.bytes_in;
        (*state).bytes_out += p.bytes_out;
    }
    closes(p, settings, Some(state), now);
}

/// Counts the first FIN or RST of a flow as its close.
#[inline(always)]
fn closes(p: &Packet, settings: &Settings, state: Option<*mut FlowState>, now: u64) {
    let closing = p.tcp_flags & (TCP_FIN | TCP_RST);
    if closing == 0 {
        return;
    }
    if let Some(s) = state {
        // SAFETY: as in known_flow.
        unsafe {
            if (*s).state & (FLOW_CLOSED_FIN | FLOW_CLOSED_RST) != 0 {
                return;
            }
            (*s).state |= if closing & TCP_RST != 0 {
                FLOW_CLOSED_RST
            } else {
                FLOW_CLOSED_FIN
            };
        }
    }
    let rst = closing & TCP_RST != 0;
    counters::closed(p.vip_id, p.backend_id, rst);
    event(
        p,
        settings,
        if rst {
            EVENT_CLOSE_RST
        } else {
            EVENT_CLOSE_FIN
        },
        now,
    );
}
