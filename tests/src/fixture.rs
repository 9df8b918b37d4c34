//! Loads the real XDP programs and runs packets through them with
//! `BPF_PROG_TEST_RUN`, with map state set by the agent's own balancer logic.
use std::{collections::BTreeSet, net::IpAddr};

use aya::{
    maps::MapData,
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use lb_common::{addr_bytes, FlowKey, FlowState, Outcome, PacketCounter};
use lb_userspace::{
    balancer::Balancer,
    config::{BalancerConfig, Config},
    datapath::{load_logging, load_with, Datapath as _, DecapMaps, KernelDatapath, MapSizes},
    nexthop::NextHop,
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The smallest Maglev table size fixtures use; a VIP's table grows with
/// its backend count (`ring_size`).
pub const M: u32 = 13;

/// The size of the Maglev table of a fixture VIP with `backends` backends.
pub fn ring_size(backends: usize) -> u32 {
    lb_userspace::maglev::ring_size(M, backends)
}
/// In `BPF_PROG_TEST_RUN` the packet arrives on the loopback device.
pub const TEST_RUN_IFINDEX: u32 = 1;
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
/// The MTU of every backend's link in fixtures, unless a test sets another.
pub const LINK_MTU: u32 = 1500;

pub struct Fixture {
    pub ebpf: Ebpf,
    pub balancer: Balancer<KernelDatapath>,
    pub config: BalancerConfig,
    decap: DecapMaps,
    pub sizes: MapSizes,
    /// The MTU every backend's next hop is given.
    pub mtu: u32,
    /// `BYPASS_NEXT`, held while `lb_source` is loaded.
    source_next: Option<aya::maps::ProgramArray<MapData>>,
}

pub struct Run {
    pub action: u32,
    pub output: Vec<u8>,
}

/// Map sizes fixtures use: small, so tests can enumerate Maglev slots.
pub const SIZES: MapSizes = MapSizes {
    maglev_size: M,
    maglev_slots: 1 << 17,
    max_vips: 4,
    max_backends: 16,
    flow_table_size: 1024,
};

pub fn config(vips: &str) -> BalancerConfig {
    config_with(&SIZES, vips)
}

/// `vips` may start with a `[visibility]` table.
pub fn config_with(sizes: &MapSizes, vips: &str) -> BalancerConfig {
    config_full(sizes, "", vips)
}

/// Like `config_with`, with more `[datapath]` settings (TOML lines).
pub fn config_full(sizes: &MapSizes, datapath: &str, vips: &str) -> BalancerConfig {
    let text = format!(
        "[datapath]\ninterfaces=[\"lo\"]\nmaglev_table_size={}\nmaglev_slots={}\nmax_vips={}\nmax_backends={}\nflow_table_size={}\n{datapath}\n\
         [encap]\nsource_v4=\"198.18.200.0/24\"\nsource_v6=\"fd00:200::/64\"\n{vips}",
        sizes.maglev_size,
        sizes.maglev_slots,
        sizes.max_vips,
        sizes.max_backends,
        sizes.flow_table_size
    );
    Config::from_toml(&text)
        .expect("fixture config is valid")
        .balancer
        .expect("has a balancer")
}

impl Fixture {
    /// Loads both programs and applies `vips` (TOML `[[vips]]` tables); every
    /// backend's next hop is the test-run interface, so forwarding is `XDP_TX`.
    pub fn new(vips: &str) -> Fixture {
        Fixture::with_sizes(SIZES, vips)
    }

    pub fn with_sizes(sizes: MapSizes, vips: &str) -> Fixture {
        Fixture::with_datapath_log(sizes, vips, false)
    }

    /// `with_sizes`, with the datapath logs (`lb-agent --datapath-log`) on or
    /// off.
    pub fn with_datapath_log(sizes: MapSizes, vips: &str, datapath_log: bool) -> Fixture {
        let ebpf = load_logging(&sizes, datapath_log).expect("the eBPF object loads");
        Fixture::loaded(ebpf, sizes, vips)
    }

    /// `with_sizes`, with the datapath built as for a host whose CPUs may
    /// reorder each other's stores (arm64): a new slot is published behind
    /// a full barrier, whatever this host is.
    pub fn with_store_barriers(sizes: MapSizes, vips: &str) -> Fixture {
        let ebpf = load_with(&sizes, false, false).expect("the eBPF object loads");
        Fixture::loaded(ebpf, sizes, vips)
    }

    fn loaded(mut ebpf: Ebpf, sizes: MapSizes, vips: &str) -> Fixture {
        for name in ["lb_ingress", "lb_decap"] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .expect("program exists")
                .try_into()
                .expect("is XDP");
            prog.load()
                .unwrap_or_else(|e| panic!("the verifier accepts {name}: {e:?}"));
        }
        let dp = KernelDatapath::new(&mut ebpf, &sizes).expect("maps");
        let decap = DecapMaps::new(&mut ebpf).expect("decap maps");
        let mut balancer = Balancer::new(dp, sizes, BTreeSet::from([TEST_RUN_IFINDEX]));
        let config = config_with(&sizes, vips);
        balancer.apply(&config, &Default::default()).expect("apply");
        let mut f = Fixture {
            ebpf,
            balancer,
            config,
            decap,
            sizes,
            mtu: LINK_MTU,
            source_next: None,
        };
        f.resolve_all();
        f
    }

    pub fn resolve_all(&mut self) {
        for a in self.balancer.backend_addresses() {
            let nh = NextHop {
                ifindex: TEST_RUN_IFINDEX,
                src_mac: LB_MAC,
                dst_mac: NEXT_HOP_MAC,
                mtu: self.mtu,
            };
            self.balancer.set_next_hop(a, Some(nh)).expect("next hop");
        }
    }

    /// Gives every backend's next hop this MTU.
    pub fn set_mtu(&mut self, mtu: u32) {
        self.mtu = mtu;
        self.resolve_all();
    }

    /// SYNs whose MSS the datapath clamped.
    pub fn mss_clamped(&self) -> u64 {
        self.balancer.datapath().mss_clamped().expect("MSS_CLAMPED")
    }

    pub fn apply(&mut self, vips: &str) {
        self.apply_full("", vips);
    }

    /// Applies `vips` with more `[datapath]` settings (TOML lines).
    pub fn apply_full(&mut self, datapath: &str, vips: &str) {
        self.config = config_full(&self.sizes, datapath, vips);
        self.balancer
            .apply(&self.config, &Default::default())
            .expect("apply");
        self.resolve_all();
    }

    pub fn add_decap_address(&mut self, addr: IpAddr) {
        let mut addresses = self.decap.addresses().expect("decap addresses");
        addresses.push(addr);
        self.decap.set_addresses(&addresses).expect("decap address");
    }

    fn run(&self, program: &str, input: &[u8]) -> Run {
        let prog: &Xdp = self
            .ebpf
            .program(program)
            .expect("program")
            .try_into()
            .expect("XDP");
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        Run {
            action: r.return_value,
            output: out,
        }
    }

    pub fn ingress(&self, input: &[u8]) -> Run {
        self.run("lb_ingress", input)
    }

    pub fn decap(&self, input: &[u8]) -> Run {
        self.run("lb_decap", input)
    }

    /// Loads `lb_source` (the bypass source intermediary) with `lb_ingress`
    /// as the program it hands other frames to.
    pub fn load_source(&mut self) {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut("lb_source")
            .expect("program exists")
            .try_into()
            .expect("is XDP");
        prog.load()
            .unwrap_or_else(|e| panic!("the verifier accepts lb_source: {e:?}"));
        let next = self.ebpf.take_map("BYPASS_NEXT").expect("BYPASS_NEXT");
        let mut next = aya::maps::ProgramArray::try_from(next).expect("program array");
        let ingress: &Xdp = self
            .ebpf
            .program("lb_ingress")
            .expect("program")
            .try_into()
            .expect("XDP");
        next.set(0, ingress.fd().expect("loaded"), 0)
            .expect("BYPASS_NEXT[0]");
        self.source_next = Some(next);
    }

    pub fn source(&self, input: &[u8]) -> Run {
        self.run("lb_source", input)
    }

    /// Backend id of an address, as the balancer allocated it.
    pub fn backend_id(&self, addr: &str) -> u32 {
        let addr: IpAddr = addr.parse().expect("address");
        self.balancer
            .backends()
            .find(|(a, _, _)| *a == addr)
            .expect("backend present")
            .1
    }

    pub fn outcome(&self, o: Outcome) -> u64 {
        self.balancer.datapath().outcomes().expect("outcomes")[o as usize].packets
    }

    pub fn decap_outcomes(&self) -> Vec<PacketCounter> {
        self.decap.outcomes().expect("decap outcomes")
    }

    /// Every connection-table entry, read through the mapped table.
    pub fn flows(&self) -> Vec<(FlowKey, FlowState)> {
        let mut out = Vec::new();
        self.balancer
            .datapath()
            .scan_flows(&mut |k, v| out.push((*k, *v)))
            .expect("scanning the connection table");
        out
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowState> {
        self.balancer.datapath().flow(key).expect("flow lookup")
    }

    /// Flow events waiting in the ring buffer, oldest first.
    pub fn events(&mut self) -> Vec<lb_common::FlowEvent> {
        let map = self.ebpf.map_mut("FLOW_EVENTS").expect("FLOW_EVENTS");
        let mut ring = aya::maps::RingBuf::try_from(map).expect("ring buffer");
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), std::mem::size_of::<lb_common::FlowEvent>());
            // SAFETY: the datapath writes whole FlowEvents; read unaligned.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        out
    }

    pub fn vip_counters(&self, vip_id: u32) -> lb_common::TrafficCounters {
        self.balancer
            .datapath()
            .vip_counters(vip_id)
            .expect("counters")
    }

    pub fn backend_counters(&self, id: u32) -> lb_common::TrafficCounters {
        self.balancer
            .datapath()
            .backend_counters(id)
            .expect("counters")
    }

    pub fn decap_addresses(&self) -> usize {
        self.decap.addresses().expect("decap addresses").len()
    }
}

/// The `MapData` behind a map of a loaded object.
pub fn map_data(map: &aya::maps::Map) -> &MapData {
    use aya::maps::Map;
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::ProgramArray(m)
        | Map::DevMapHash(m) => m,
        other => panic!("unexpected map type {other:?}"),
    }
}

/// The flow key as the datapath builds it (ports in network byte order).
pub fn flow_key(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    let (s, family) = addr_bytes(src);
    let (d, _) = addr_bytes(dst);
    FlowKey {
        src: s,
        dst: d,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family,
        _pad: [0; 2],
    }
}
