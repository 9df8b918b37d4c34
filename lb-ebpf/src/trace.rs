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
    flows::{self, Recorded},
    maps::{CLOCK_CACHE, EVENT_STATS, FLOWS_UNRECORDED, FLOW_EVENTS},
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
/// imprecision on a clock that has a tick's precision anyway. `cache` is
/// this CPU's `CLOCK_CACHE` entry (looked up once by the caller, which may
/// use it too).
#[inline(always)]
fn coarse_now(cache: Option<*mut [u64; 3]>) -> u64 {
    // SAFETY: helpers without arguments.
    let jiffy = unsafe { bpf_jiffies64() };
    let Some(c) = cache else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: per-CPU value, only this CPU uses it while the program runs.
    unsafe {
        if (*c)[0] == jiffy && (*c)[1] != 0 {
            return (*c)[1];
        }
        let now = bpf_ktime_get_coarse_ns();
        (*c)[0] = jiffy;
        (*c)[1] = now;
        now
    }
}

/// The `FLOW_CLOSED_*` bit a packet's flags close its flow with, if any.
#[inline(always)]
fn close_bit(tcp_flags: u8) -> u8 {
    if tcp_flags & TCP_RST != 0 {
        FLOW_CLOSED_RST
    } else if tcp_flags & TCP_FIN != 0 {
        FLOW_CLOSED_FIN
    } else {
        0
    }
}

#[inline(always)]
fn unrecorded() {
    if let Some(c) = FLOWS_UNRECORDED.get_ptr_mut(0) {
        // SAFETY: per-CPU value.
        unsafe { *c += 1 };
    }
}

/// Records a flow the connection table did not follow (`replaces`: it has
/// an entry, set aside, which this one overwrites). Returns whether it is
/// now recorded: a full table (the agent expires flows, the table does not
/// evict) leaves a flow without an entry to Maglev alone, counted in
/// `FLOWS_UNRECORDED`.
#[inline(always)]
pub fn new_flow(p: &Packet, settings: &Settings, replaces: Option<*mut FlowState>) -> bool {
    // The coarse clock (a tick's precision) is plenty for ages and idle
    // times and much cheaper per packet. Stamped with tracers off too: the
    // agent expires flows by it.
    let cache = CLOCK_CACHE.get_ptr_mut(0);
    let now = coarse_now(cache);
    // A CPU whose insert found the table full does not try again in the
    // same clock tick: an insert into a full table still hashes, locks and
    // walks a bucket, which a flood of new flows would pay per packet. The
    // flow is recorded by a later packet once the collector made room. An
    // entry set aside (a closed connection's, whose 5-tuple a new SYN
    // reuses) is always overwritten, full table or not: left in place, it
    // would take the new connection's later packets elsewhere.
    // SAFETY: per-CPU value, filled by `coarse_now` just above.
    if let Some(c) = cache {
        if replaces.is_none() && unsafe { (*c)[2] != 0 && (*c)[2] == (*c)[0] } {
            unrecorded();
            return false;
        }
    }
    let closed = close_bit(p.tcp_flags);
    let state = FlowState {
        backend_id: p.backend_id,
        vip_id: p.vip_id,
        hash: p.hash,
        tcp_flags: p.tcp_flags,
        state: closed,
        _pad: [0; 2],
        first_ns: now,
        last_ns: now,
        packets_in: 1,
        bytes_in: p.bytes_in,
        bytes_out: p.bytes_out,
    };
    if let Some(entry) = replaces {
        // SAFETY: the entry `known_flow` found, plain data.
        unsafe { *entry = state };
    } else {
        match flows::record(p.key, &state) {
            Recorded::Yes => {}
            Recorded::Full => {
                if let Some(c) = cache {
                    // SAFETY: as above.
                    unsafe { (*c)[2] = (*c)[0] };
                }
                unrecorded();
                return false;
            }
            Recorded::NoRoom => {
                unrecorded();
                return false;
            }
        }
    }
    if settings.flags & SETTING_TRACE_FLOWS != 0 {
        event(p, settings, EVENT_OPEN, now);
        if closed != 0 {
            closes(p, settings, closed, now);
        }
    }
    true
}

/// Updates a known flow: its last packet's time, the union of its TCP flags
/// and its close state always (the agent expires flows by them: a flow
/// whose flags are a lone SYN is half-open), its counters when the tracers
/// are on.
#[inline(always)]
pub fn known_flow(p: &Packet, settings: &Settings, state: *mut FlowState) {
    let now = coarse_now(CLOCK_CACHE.get_ptr_mut(0));
    let trace = settings.flags & SETTING_TRACE_FLOWS != 0;
    // SAFETY: a connection-table entry; racing updates from two CPUs can lose
    // an increment, never corrupt the entry (a flow normally stays on one queue).
    unsafe {
        if trace {
            (*state).last_ns = now;
            (*state).tcp_flags |= p.tcp_flags;
            (*state).packets_in += 1;
            (*state).bytes_in += p.bytes_in;
            (*state).bytes_out += p.bytes_out;
        } else {
            // Without tracers the entry is written once per clock tick, and
            // when a flag not seen before arrives.
            if (*state).last_ns != now {
                (*state).last_ns = now;
            }
            if (*state).tcp_flags | p.tcp_flags != (*state).tcp_flags {
                (*state).tcp_flags |= p.tcp_flags;
            }
        }
    }
    let closing = close_bit(p.tcp_flags);
    if closing == 0 {
        return;
    }
    // SAFETY: as above.
    unsafe {
        if (*state).state & (FLOW_CLOSED_FIN | FLOW_CLOSED_RST) != 0 {
            return;
        }
        (*state).state |= closing;
    }
    if trace {
        closes(p, settings, closing, now);
    }
}

/// Counts a flow's first FIN or RST (`closed`, its `FLOW_CLOSED_*` bit) as
/// its close, with tracers on.
#[inline(always)]
fn closes(p: &Packet, settings: &Settings, closed: u8, now: u64) {
    let rst = closed == FLOW_CLOSED_RST;
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
