//! The one collector: it reads the connection table and the per-VIP and
//! per-backend counters, expires idle flows, and keeps the aggregates that
//! reports, metrics and the lifecycle logic read: one source of truth.

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
};

use anyhow::Result;
use lb_common::{
    FlowEvent, FlowKey, FlowState, TrafficCounters, EVENT_CLOSE_FIN, EVENT_CLOSE_RST,
    FLOW_CLOSED_FIN, FLOW_CLOSED_RST, PROTO_TCP, TCP_SYN,
};
use tracing::{info, warn};

use crate::{
    config::VisibilityConfig,
    datapath::{Datapath, FlowSource},
};

mod records;
use records::protocol_name;
pub use records::{
    endpoints, flow_record, tcp_flags_text, EventRecord, FlowRecord, FlowReport, Leg,
};

/// CLOCK_MONOTONIC_COARSE in ns, the clock the datapath's tracers read
/// (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

const NS: u64 = 1_000_000_000;
/// Memory the counter snapshots kept for `--since` windows may take; past
/// it, the history is thinned (see `Collector::thin`).
pub const HISTORY_BYTES: usize = 64 << 20;
/// Snapshots kept at most, however small: thinning looks at each of them.
const HISTORY_MAX: usize = 4096;
/// Largest flows kept from each collection.
const TOP_KEPT: usize = 100;
/// Flow events kept for `lbctl events`.
const EVENTS_KEPT: usize = 1024;

/// Where a flow is in its life, as its tracers tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowPhase {
    Open,
    HalfOpen,
    ClosedFin,
    ClosedRst,
}

impl FlowPhase {
    pub fn of(key: &FlowKey, state: &FlowState) -> FlowPhase {
        if state.state & FLOW_CLOSED_RST != 0 {
            FlowPhase::ClosedRst
        } else if state.state & FLOW_CLOSED_FIN != 0 {
            FlowPhase::ClosedFin
        } else if key.proto == PROTO_TCP && state.tcp_flags == TCP_SYN {
            FlowPhase::HalfOpen
        } else {
            FlowPhase::Open
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FlowPhase::Open => "open",
            FlowPhase::HalfOpen => "half-open",
            FlowPhase::ClosedFin => "closed-fin",
            FlowPhase::ClosedRst => "closed-rst",
        }
    }

    fn closed(self) -> bool {
        matches!(self, FlowPhase::ClosedFin | FlowPhase::ClosedRst)
    }
}

/// Present flows of one VIP or backend at the last collection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Presence {
    pub active: u64,
    pub half_open: u64,
    pub closing: u64,
}

impl Presence {
    fn count(&mut self, phase: FlowPhase) {
        match phase {
            FlowPhase::Open => self.active += 1,
            FlowPhase::HalfOpen => {
                self.active += 1;
                self.half_open += 1;
            }
            FlowPhase::ClosedFin | FlowPhase::ClosedRst => self.closing += 1,
        }
    }

    fn add(&mut self, other: &Presence) {
        self.active += other.active;
        self.half_open += other.half_open;
        self.closing += other.closing;
    }
}

/// Flows the collector expired, cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    pub flows: u64,
    pub half_open: u64,
}

/// A VIP's or a backend's counters and expired flows at a snapshot.
#[derive(Debug, Clone, Copy)]
struct Sample {
    id: u32,
    counters: TrafficCounters,
    expired: Expired,
}

/// The counters of every VIP and backend at one collection, sorted by id.
#[derive(Debug)]
struct Snapshot {
    at_ns: u64,
    vips: Box<[Sample]>,
    backends: Box<[Sample]>,
}

impl Snapshot {
    /// Memory the snapshot takes in the history.
    fn bytes(&self) -> usize {
        std::mem::size_of::<Snapshot>()
            + (self.vips.len() + self.backends.len()) * std::mem::size_of::<Sample>()
    }
}

/// The samples of `ids`, sorted by id, with counters from `read`.
fn samples(
    ids: &[u32],
    expired: &BTreeMap<u32, Expired>,
    read: impl Fn(u32) -> Result<TrafficCounters>,
) -> Result<Box<[Sample]>> {
    let mut out = ids
        .iter()
        .map(|id| {
            Ok(Sample {
                id: *id,
                counters: read(*id)?,
                expired: expired.get(id).copied().unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    out.sort_unstable_by_key(|s| s.id);
    Ok(out.into_boxed_slice())
}

/// The counters and expired flows of `id` in `samples`.
fn sample(samples: &[Sample], id: u32) -> (Option<TrafficCounters>, Expired) {
    match samples.binary_search_by_key(&id, |s| s.id) {
        Ok(i) => (Some(samples[i].counters), samples[i].expired),
        Err(_) => (None, Expired::default()),
    }
}

/// Idle times after which flows are removed from the connection table.
/// The table does not evict (the datapath forwards a flow it has no room
/// for by Maglev alone), so while it is nearly full the idle times are
/// divided (`divisor`, see `next_divisor`): the least recently used flows
/// go first, as an LRU would drop them, but a scan at a time.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub tcp_idle_ns: u64,
    pub udp_idle_ns: u64,
    pub closed_ns: u64,
    pub half_open_ns: u64,
    /// Entries the table holds (`flow_table_size`); 0: unknown, never shortened.
    pub table_size: u64,
    /// What every idle time is divided by now (1: the configured times).
    pub divisor: u64,
}

impl Timeouts {
    pub fn new(v: &VisibilityConfig, table_size: u64) -> Self {
        Timeouts {
            tcp_idle_ns: v.tcp_idle_timeout_s * NS,
            udp_idle_ns: v.udp_idle_timeout_s * NS,
            closed_ns: v.closed_timeout_s * NS,
            half_open_ns: v.half_open_timeout_s * NS,
            table_size,
            divisor: 1,
        }
    }

    /// The idle time `limit` as shortened now: never below a second (or
    /// `limit` itself, if shorter), so that flows alive between two
    /// collections stay.
    fn shortened(&self, limit: u64) -> u64 {
        (limit / self.divisor.max(1)).max(limit.min(NS))
    }
}

/// Above this share of the table (per mille) after a collection, idle times
/// are halved again; below `RELAX_PER_MILLE` they are doubled back toward
/// the configured ones.
pub const PRESSURE_PER_MILLE: u64 = 900;
pub const RELAX_PER_MILLE: u64 = 750;
/// The most idle times are divided by (300 s becomes 0.3 s).
pub const MAX_DIVISOR: u64 = 1024;

/// The divisor of idle times after a collection left `present` flows in a
/// table of `table_size`.
pub fn next_divisor(divisor: u64, present: u64, table_size: u64) -> u64 {
    if table_size == 0 {
        return 1;
    }
    let per_mille = present.saturating_mul(1000) / table_size;
    if per_mille >= PRESSURE_PER_MILLE {
        (divisor * 2).min(MAX_DIVISOR)
    } else if per_mille < RELAX_PER_MILLE {
        (divisor / 2).max(1)
    } else {
        divisor
    }
}

/// One pass over the connection table.
#[derive(Debug, Default)]
pub struct Scan {
    pub at_ns: u64,
    /// Flows left in the table.
    pub present: u64,
    pub pair_presence: BTreeMap<(u32, u32), Presence>,
    /// Idle flows: to expire, then (after `expire`) expired.
    pub expired: Vec<(FlowKey, FlowState, FlowPhase)>,
    top: Vec<(FlowKey, FlowState)>,
}

/// Reads the connection table at `now_ns`: what is present by VIP and
/// backend, the largest flows, and the idle ones to expire.
pub fn scan(flows: &dyn FlowSource, timeouts: Option<Timeouts>, now_ns: u64) -> Result<Scan> {
    let timeouts = timeouts.unwrap_or(Timeouts {
        tcp_idle_ns: u64::MAX,
        udp_idle_ns: u64::MAX,
        closed_ns: u64::MAX,
        half_open_ns: u64::MAX,
        table_size: 0,
        divisor: 1,
    });
    let mut out = Scan {
        at_ns: now_ns,
        ..Scan::default()
    };
    let mut top: Vec<(FlowKey, FlowState)> = Vec::new();
    let scanned = flows.scan_flows(&mut |key, state| {
        let phase = FlowPhase::of(key, state);
        // The datapath stamps `last_ns` with tracers off too.
        let idle = now_ns.saturating_sub(state.last_ns);
        let limit = match phase {
            FlowPhase::ClosedFin | FlowPhase::ClosedRst => timeouts.closed_ns,
            FlowPhase::HalfOpen => timeouts.half_open_ns,
            FlowPhase::Open if key.proto == PROTO_TCP => timeouts.tcp_idle_ns,
            FlowPhase::Open => timeouts.udp_idle_ns,
        };
        if idle > timeouts.shortened(limit) {
            out.expired.push((*key, *state, phase));
            return;
        }
        let p = out
            .pair_presence
            .entry((state.vip_id, state.backend_id))
            .or_default();
        p.count(phase);
        // Keep the largest flows without sorting the whole table.
        if top.len() < TOP_KEPT * 2 {
            top.push((*key, *state));
        } else {
            top.sort_unstable_by_key(|f| std::cmp::Reverse(f.1.bytes_in));
            top.truncate(TOP_KEPT);
            top.push((*key, *state));
        }
    })?;
    top.sort_unstable_by_key(|f| std::cmp::Reverse(f.1.bytes_in));
    top.truncate(TOP_KEPT);
    out.top = top;
    out.present = (scanned - out.expired.len()) as u64;
    Ok(out)
}

/// Removes the scan's idle flows from the table; a flow that saw a packet
/// since the scan stays (and is counted present again).
pub fn expire(flows: &mut dyn FlowSource, scan: &mut Scan) -> Result<()> {
    let mut kept = Vec::new();
    for (key, state, phase) in std::mem::take(&mut scan.expired) {
        if flows.remove_idle_flow(&key, state.last_ns)? {
            kept.push((key, state, phase));
        } else {
            // A packet came since: present after all (as it was scanned).
            scan.present += 1;
            let p = scan
                .pair_presence
                .entry((state.vip_id, state.backend_id))
                .or_default();
            p.count(phase);
        }
    }
    scan.expired = kept;
    flows.settle()
}

#[derive(Default)]
pub struct Collector {
    pub timeouts: Option<Timeouts>,
    pub flows_in_table: u64,
    pub collected_at_ns: u64,
    pub vip_presence: BTreeMap<u32, Presence>,
    pub backend_presence: BTreeMap<u32, Presence>,
    /// By (vip id, backend id): what the lifecycle reads to see a drain end.
    pub pair_presence: BTreeMap<(u32, u32), Presence>,
    vip_expired: BTreeMap<u32, Expired>,
    backend_expired: BTreeMap<u32, Expired>,
    top: Vec<(FlowKey, FlowState)>,
    history: VecDeque<Snapshot>,
    /// What the snapshots in `history` take, as `Snapshot::bytes` counts.
    history_bytes: usize,
    events: VecDeque<FlowEvent>,
    pub events_received: u64,
}

impl Collector {
    /// A collector for a connection table of `table_size` entries.
    pub fn new(visibility: &VisibilityConfig, table_size: u64) -> Self {
        Collector {
            timeouts: Some(Timeouts::new(visibility, table_size)),
            ..Collector::default()
        }
    }

    /// New configured idle times (a reload); the shortening in force stays.
    pub fn set_timeouts(&mut self, visibility: &VisibilityConfig, table_size: u64) {
        let divisor = self.timeouts.map_or(1, |t| t.divisor);
        self.timeouts = Some(Timeouts {
            divisor,
            ..Timeouts::new(visibility, table_size)
        });
    }

    /// One collection at `now_ns`: scan, expire, aggregate, snapshot counters.
    /// (The agent runs the scan and the expiry outside its state lock; see
    /// `scan`, `expire` and `absorb`.)
    pub fn collect<D: Datapath>(
        &mut self,
        dp: &mut D,
        now_ns: u64,
        vip_ids: &[u32],
        backend_ids: &[u32],
    ) -> Result<()> {
        let mut scan = scan(dp, self.timeouts, now_ns)?;
        expire(dp, &mut scan)?;
        self.absorb(scan, dp, now_ns, vip_ids, backend_ids)
    }

    /// Takes in a scan whose idle flows are expired, and snapshots the
    /// VIP and backend counters, read at `counters_at_ns` (rates are computed
    /// from these snapshots, so their time is the time of the read).
    pub fn absorb<D: Datapath>(
        &mut self,
        scan: Scan,
        dp: &D,
        counters_at_ns: u64,
        vip_ids: &[u32],
        backend_ids: &[u32],
    ) -> Result<()> {
        let now_ns = scan.at_ns;
        for (_, state, phase) in &scan.expired {
            for e in [
                self.vip_expired.entry(state.vip_id).or_default(),
                self.backend_expired.entry(state.backend_id).or_default(),
            ] {
                e.flows += 1;
                if *phase == FlowPhase::HalfOpen {
                    e.half_open += 1;
                }
            }
        }
        self.top = scan.top;
        self.flows_in_table = scan.present;
        if let Some(t) = self.timeouts.as_mut() {
            let divisor = next_divisor(t.divisor, scan.present, t.table_size);
            if divisor > t.divisor {
                warn!(
                    flows = scan.present,
                    flow_table_size = t.table_size,
                    divisor,
                    "the connection table is nearly full: idle timeouts divided by {divisor} (least recently used flows go first)"
                );
            } else if divisor < t.divisor {
                info!(
                    flows = scan.present,
                    divisor, "connection table pressure easing: idle timeouts divided by {divisor}"
                );
            }
            t.divisor = divisor;
        }
        let mut vip_presence: BTreeMap<u32, Presence> = BTreeMap::new();
        let mut backend_presence: BTreeMap<u32, Presence> = BTreeMap::new();
        for ((vip, backend), p) in &scan.pair_presence {
            vip_presence.entry(*vip).or_default().add(p);
            backend_presence.entry(*backend).or_default().add(p);
        }
        self.vip_presence = vip_presence;
        self.backend_presence = backend_presence;
        self.pair_presence = scan.pair_presence;
        self.collected_at_ns = now_ns;

        let snap = Snapshot {
            at_ns: counters_at_ns,
            vips: samples(vip_ids, &self.vip_expired, |id| dp.vip_counters(id))?,
            backends: samples(backend_ids, &self.backend_expired, |id| {
                dp.backend_counters(id)
            })?,
        };
        self.history_bytes += snap.bytes();
        self.history.push_back(snap);
        self.thin();
        Ok(())
    }

    /// Keeps the history within `HISTORY_BYTES` (and `HISTORY_MAX`
    /// snapshots) by dropping snapshots so that the gaps left grow with
    /// age: the resolution of a `--since` window is then about the same
    /// share of its length whatever the length, back to the agent's start
    /// (a few percent with 4,000 backends and 1,000 VIPs, which leave room
    /// for 186 snapshots). The newest two (the default window) stay, and so
    /// does the oldest while there are others to drop.
    fn thin(&mut self) {
        while self.history.len() > 2
            && (self.history_bytes > HISTORY_BYTES || self.history.len() > HISTORY_MAX)
        {
            let h = &self.history;
            let last = h[h.len() - 1].at_ns;
            // Drop the one whose neighbours are closest, for their age.
            let drop = (1..h.len() - 2)
                .min_by(|&a, &b| {
                    let cost = |i: usize| {
                        let gap = h[i + 1].at_ns.saturating_sub(h[i - 1].at_ns);
                        let age = last.saturating_sub(h[i - 1].at_ns).max(1);
                        gap as f64 / age as f64
                    };
                    cost(a).total_cmp(&cost(b))
                })
                .unwrap_or(0);
            if let Some(gone) = self.history.remove(drop) {
                self.history_bytes -= gone.bytes();
            }
        }
    }

    /// Memory the counter history takes: the snapshots and the ring.
    pub fn history_bytes(&self) -> usize {
        self.history_bytes
            + (self.history.capacity() - self.history.len()) * std::mem::size_of::<Snapshot>()
    }

    /// The snapshot that starts a window of `since_s` seconds (the previous
    /// collection by default), and the latest one.
    fn window(&self, since_s: Option<f64>) -> Option<(&Snapshot, &Snapshot)> {
        let last = self.history.back()?;
        let first = match since_s {
            None => self.history.iter().rev().nth(1).unwrap_or(last),
            Some(s) => {
                // The oldest snapshot inside the window: the window is at
                // most what was asked for, less where the history is thin.
                let from = last.at_ns.saturating_sub((s * NS as f64) as u64);
                let i = self.history.partition_point(|h| h.at_ns < from);
                self.history.get(i).unwrap_or(last)
            }
        };
        Some((first, last))
    }

    pub fn window_s(&self, since_s: Option<f64>) -> f64 {
        self.window(since_s)
            .map(|(a, b)| (b.at_ns - a.at_ns) as f64 / NS as f64)
            .unwrap_or(0.0)
    }

    fn report(
        &self,
        since_s: Option<f64>,
        pick: impl Fn(&Snapshot) -> (Option<TrafficCounters>, Expired),
        presence: Presence,
    ) -> FlowReport {
        let Some((first, last)) = self.window(since_s) else {
            return FlowReport::default();
        };
        let (a, ea) = pick(first);
        let (b, eb) = pick(last);
        let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
        // A VIP that appeared inside the window starts from zero.
        let a = if pick(first).0.is_some() {
            a
        } else {
            TrafficCounters::default()
        };
        let secs = (last.at_ns - first.at_ns) as f64 / NS as f64;
        let new_flows = b.new_flows.saturating_sub(a.new_flows);
        FlowReport {
            new_flows_per_s: if secs > 0.0 {
                new_flows as f64 / secs
            } else {
                0.0
            },
            new_flows,
            closed_fin: b.closed_fin.saturating_sub(a.closed_fin),
            closed_rst: b.closed_rst.saturating_sub(a.closed_rst),
            expired: eb.flows.saturating_sub(ea.flows),
            half_open_expired: eb.half_open.saturating_sub(ea.half_open),
            active: presence.active,
            half_open: presence.half_open,
            closing: presence.closing,
            client_to_lb: Leg {
                packets: b.packets.saturating_sub(a.packets),
                bytes: b.bytes.saturating_sub(a.bytes),
            },
            lb_to_backend: Leg {
                packets: b.packets.saturating_sub(a.packets),
                bytes: b.bytes_out.saturating_sub(a.bytes_out),
            },
        }
    }

    pub fn vip_report(&self, vip_id: u32, since_s: Option<f64>) -> FlowReport {
        let presence = self.vip_presence.get(&vip_id).copied().unwrap_or_default();
        self.report(since_s, |s| sample(&s.vips, vip_id), presence)
    }

    pub fn backend_report(&self, backend_id: u32, since_s: Option<f64>) -> FlowReport {
        let presence = self
            .backend_presence
            .get(&backend_id)
            .copied()
            .unwrap_or_default();
        self.report(since_s, |s| sample(&s.backends, backend_id), presence)
    }

    /// Expired flows of a VIP / backend since the agent started.
    pub fn vip_expired(&self, vip_id: u32) -> Expired {
        self.vip_expired.get(&vip_id).copied().unwrap_or_default()
    }

    pub fn backend_expired(&self, backend_id: u32) -> Expired {
        self.backend_expired
            .get(&backend_id)
            .copied()
            .unwrap_or_default()
    }

    /// The largest flows of the last collection, passing `keep`.
    pub fn top(
        &self,
        n: usize,
        keep: impl Fn(&FlowKey, &FlowState) -> bool,
    ) -> Vec<(FlowKey, FlowState)> {
        self.top
            .iter()
            .filter(|(k, s)| keep(k, s))
            .take(n)
            .copied()
            .collect()
    }

    pub fn add_event(&mut self, event: FlowEvent) {
        self.events_received += 1;
        self.events.push_back(event);
        while self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
    }

    pub fn events(
        &self,
        limit: usize,
        backend_of: impl Fn(u32) -> Option<IpAddr>,
        now_ns: u64,
    ) -> Vec<EventRecord> {
        let skip = self.events.len().saturating_sub(limit);
        self.events
            .iter()
            .skip(skip)
            .map(|e| {
                let (client, vip) = endpoints(&e.key);
                EventRecord {
                    kind: match e.kind {
                        EVENT_CLOSE_FIN => "close-fin",
                        EVENT_CLOSE_RST => "close-rst",
                        _ => "open",
                    }
                    .into(),
                    client,
                    vip,
                    protocol: protocol_name(e.key.proto),
                    backend: backend_of(e.backend_id),
                    ago_s: now_ns.saturating_sub(e.ts_ns) as f64 / NS as f64,
                }
            })
            .collect()
    }
}

/// Whether a flow in `phase` matches a `--state` filter.
pub fn phase_matches(phase: FlowPhase, filter: &str) -> bool {
    match filter {
        "closed" => phase.closed(),
        "open" => !phase.closed(),
        other => phase.name() == other,
    }
}

#[cfg(test)]
mod tests;
