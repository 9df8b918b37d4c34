//! Per-CPU counters. Each packet updates its outcome once, at exit.
use lb_common::{DecapOutcome, Outcome, PacketCounter, TrafficCounters};

use crate::maps::{BACKEND_STATS, DECAP_OUTCOMES, OUTCOMES, VIP_STATS};

#[inline(always)]
fn add(counter: Option<*mut PacketCounter>, bytes: u64) {
    if let Some(c) = counter {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn outcome(o: Outcome, bytes: u64) {
    add(OUTCOMES.get_ptr_mut(o as u32), bytes);
}

#[inline(always)]
pub fn decap_outcome(o: DecapOutcome, bytes: u64) {
    add(DECAP_OUTCOMES.get_ptr_mut(o as u32), bytes);
}

#[inline(always)]
fn traffic(counter: Option<*mut TrafficCounters>, bytes: u64, bytes_out: u64, new_flow: bool) {
    if let Some(c) = counter {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).bytes_out += bytes_out;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}

/// Counts a packet sent to a backend on behalf of a VIP: `bytes` as received,
/// `bytes_out` as sent.
#[inline(always)]
pub fn forwarded(vip_id: u32, backend_id: u32, bytes: u64, bytes_out: u64, new_flow: bool) {
    traffic(VIP_STATS.get_ptr_mut(vip_id), bytes, bytes_out, new_flow);
    traffic(
        BACKEND_STATS.get_ptr_mut(backend_id),
        bytes,
        bytes_out,
        new_flow,
    );
}

#[inline(always)]
fn close(counter: Option<*mut TrafficCounters>, rst: bool) {
    if let Some(c) = counter {
        // SAFETY: per-CPU value.
        unsafe {
            if rst {
                (*c).closed_rst += 1;
            } else {
                (*c).closed_fin += 1;
            }
        }
    }
}

/// Counts a flow the client closed.
#[inline(always)]
pub fn closed(vip_id: u32, backend_id: u32, rst: bool) {
    close(VIP_STATS.get_ptr_mut(vip_id), rst);
    close(BACKEND_STATS.get_ptr_mut(backend_id), rst);
}
