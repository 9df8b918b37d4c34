//! Every map of the datapath. Sizes here are defaults; the agent sets the real
//! ones from its configuration before loading.
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use lb_common::{
    flow_table::{FlowSlot, BUCKET_ELEMENTS},
    BackendInfo, BypassEntry, BypassIntermediary, BypassPrefix, FlowKey, HostAddr, IcmpTokens,
    MaglevChunk, PacketCounter, Settings, TrafficCounters, VipInfo, VipKey, BYPASS_STAT_COUNT,
    DECAP_OUTCOME_COUNT, MAGLEV_LANES, OUTCOME_COUNT, VIP_FILTER_SLOTS,
};

/// VIPs keyed by (address, port, protocol); also one marker per VIP address
/// (port 0, protocol 0) so fragments can be recognised. Written by the agent.
#[map]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(128, 0);

/// Each live VIP's key by VIP id (an all-zero key: no VIP), so that a
/// connection-table entry can be checked against its VIP without the VIP
/// table; see `balance::vip_is_live`. Written by the agent, filled at each
/// load (not pinned); sized to `max_vips` by the agent.
#[map]
pub static VIP_BY_ID: Array<VipKey> = Array::with_max_entries(64, 0);

/// How many VIP addresses fold into each slot (`lb_common::vip_filter_slot`).
/// A packet whose slot is 0 is not to a VIP. Written by the agent, filled
/// at each load (not pinned).
#[map]
pub static VIP_FILTER: Array<u32> = Array::with_max_entries(VIP_FILTER_SLOTS, 0);

/// Maglev rings of every size, one after another: slot `g = ring_base +
/// hash % ring_size` (from the VIP's entry) holds a backend id, at lane
/// `g % 8` of element `g / 8`. Written by the agent into free space before
/// the VIP is switched to it; memory-mapped by the agent, which writes a
/// whole ring with one copy. The agent sizes it (`maglev_slots`).
#[map]
pub static MAGLEV: Array<MaglevChunk> =
    Array::with_max_entries(3 * 64 * 65537 / MAGLEV_LANES, BPF_F_MMAPABLE);

/// Backends by backend id. Written by the agent (flags, next-hop MACs).
#[map]
pub static BACKENDS: Array<BackendInfo> = Array::with_max_entries(4096, 0);

/// Connection table: an array the datapath indexes itself, keyed by the
/// client's 5-tuple (`flows`; layout in `lb_common::flow_table`). Written
/// by the datapath, expired by the agent's collector (idle times from
/// `last_ns`, shortened while the table is nearly full), which maps it into
/// its memory. The table does not evict: when it is full a new flow is
/// forwarded by Maglev alone and counted in `FLOWS_UNRECORDED`. The agent
/// sizes it from `flow_table_size` and sets up its header.
#[map]
pub static FLOWS: Array<FlowSlot> = Array::with_max_entries(1 + BUCKET_ELEMENTS, BPF_F_MMAPABLE);

/// Packets of flows the connection table had no room for (index 0): sent to
/// the Maglev ring's backend without an entry. Written by the datapath.
#[map]
pub static FLOWS_UNRECORDED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Global settings, index 0. Written by the agent.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Interfaces a backend can be reached through other than the receiving one,
/// keyed by ifindex. Written by the agent.
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// Per-VIP traffic by vip id. Written by the datapath.
#[map]
pub static VIP_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(64, 0);

/// Per-backend traffic by backend id. Written by the datapath.
#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(4096, 0);

/// `lb_ingress` outcomes by `Outcome`. Written by the datapath.
#[map]
pub static OUTCOMES: PerCpuArray<PacketCounter> = PerCpuArray::with_max_entries(OUTCOME_COUNT, 0);

/// Flow open and close events for the agent (sampled; see `Settings`). The
/// datapath never waits on it: a full buffer drops the event and counts it.
#[map]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Events sent and dropped (`EVENTS_SENT`, `EVENTS_DROPPED`). Written by the datapath.
#[map]
pub static EVENT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// SYNs whose MSS option was lowered to fit the backend's link (index 0).
/// Written by the datapath.
#[map]
pub static MSS_CLAMPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's token bucket for ICMP "too big" answers (index 0). Written by
/// the datapath; the agent sets the rate in `SETTINGS`.
#[map]
pub static ICMP_TOO_BIG_TOKENS: PerCpuArray<IcmpTokens> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's last coarse clock reading and the jiffy it was taken in, and
/// the jiffy in which its last connection-table insert found the table full
/// (`[jiffies, ns, full_jiffy]`, index 0); see `trace::coarse_now` and
/// `trace::new_flow`. Private to the programs of one load (not pinned): an
/// empty cache only costs a clock read.
#[map]
pub static CLOCK_CACHE: PerCpuArray<[u64; 3]> = PerCpuArray::with_max_entries(1, 0);

/// Addresses of this backend host that encapsulated packets arrive at. Written
/// by the agent running on the backend.
#[map]
pub static DECAP_ADDRS: HashMap<HostAddr, u32> = HashMap::with_max_entries(64, 0);

/// `lb_decap` outcomes by `DecapOutcome`. Written by the datapath.
#[map]
pub static DECAP_OUTCOMES: PerCpuArray<PacketCounter> =
    PerCpuArray::with_max_entries(DECAP_OUTCOME_COUNT, 0);

/// Bypass entries of a client host's intermediary, keyed by the flow as the
/// client sent it. Written by the agent (accepted instructions, revokes) and
/// by the datapath (counters; removal on FIN/RST or an unusable backend).
#[map]
pub static BYPASS: HashMap<FlowKey, BypassEntry> = HashMap::with_max_entries(65536, 0);

/// Flows to bypass VIPs this host sent toward the LB, keyed by the flow,
/// with the coarse time of the last packet. Written by the datapath; the
/// agent reads it to accept instructions only for flows it sent.
#[map]
pub static BYPASS_SENT: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// Bypass counters by `BYPASS_*` index. Written by the datapath.
#[map]
pub static BYPASS_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(BYPASS_STAT_COUNT, 0);

/// What `lb_source` hands frames that are not to a bypass VIP to (index 0:
/// `lb_ingress`, the source-side balancer). Written by the agent; empty, the
/// frames pass to the stack.
#[map]
pub static BYPASS_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Client prefixes that have a bypass intermediary, and where it listens.
/// Written by the agent of a backend host.
#[map]
pub static BYPASS_CLIENTS: LpmTrie<BypassPrefix, BypassIntermediary> =
    LpmTrie::with_max_entries(1024, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// VIPs whose flows may be bypassed (port 0: every port), with the packets
/// a flow must reach first. Written by the agent of a backend host.
#[map]
pub static BYPASS_POLICY: HashMap<VipKey, u32> = HashMap::with_max_entries(128, 0);

/// Packets `lb_decap` saw per flow of a bypass VIP from a client behind an
/// intermediary (the event goes out when the count reaches the policy's).
/// Written by the datapath.
#[map]
pub static BYPASS_SEEN: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(65536, 0);

/// Flows to tell an intermediary about, for the backend host's agent.
#[map]
pub static BYPASS_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 18, 0);
