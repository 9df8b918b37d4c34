//! Unit tests of `balancer`.

use super::*;
use crate::{
    config::{BalancerConfig, Config, Protocol},
    datapath::fake::*,
};
use keys::marker_key;
use lb_common::{VipKey, BACKEND_ALLOCATED, BACKEND_AVAILABLE, BACKEND_USABLE};

const SIZES: MapSizes = MapSizes {
    maglev_size: 257,
    max_vips: 4,
    max_backends: 8,
    flow_table_size: 1024,
};

fn config(vips: &str) -> BalancerConfig {
    let text = format!(
        "[datapath]\ninterfaces=[\"eth0\"]\nmaglev_table_size=257\nmax_vips=4\nmax_backends=8\n\
         [encap]\nsource_v4=\"198.18.200.0/24\"\nsource_v6=\"fd00:200::/64\"\n{vips}"
    );
    Config::from_toml(&text).unwrap().balancer.unwrap()
}

fn vip(addr: &str, port: u16, backends: &[(&str, u32)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        "[[vips]]\naddress=\"{addr}\"\nport={port}\nprotocol=\"tcp\"\nbackends=[{}]\n",
        list.join(", ")
    )
}

/// VIP 198.18.10.1:80 over two equal backends.
fn web_two() -> BalancerConfig {
    config(&vip(
        "198.18.10.1",
        80,
        &[("198.18.0.11", 1), ("198.18.0.12", 1)],
    ))
}

fn balancer() -> Balancer<FakeDatapath> {
    let dp = FakeDatapath {
        maglev_size: 257,
        ..FakeDatapath::default()
    };
    Balancer::new(dp, SIZES, BTreeSet::from([2]))
}

impl Balancer<FakeDatapath> {
    fn apply_cfg(&mut self, c: &BalancerConfig) -> Result<ApplySummary> {
        self.apply(c, &BTreeMap::new())
    }
}

fn key(addr: &str, port: u16) -> VipKey {
    vip_key(addr.parse().unwrap(), port, Protocol::Tcp)
}

#[test]
fn first_apply_writes_backends_rings_vips_and_markers() {
    let mut b = balancer();
    let s = b.apply_cfg(&web_two()).unwrap();
    assert_eq!((s.vips_added, s.backends_added), (1, 2));
    let dp = b.datapath();
    assert_eq!(dp.backends.len(), 2);
    assert!(dp
        .backends
        .values()
        .all(|i| i.flags == BACKEND_ALLOCATED | BACKEND_USABLE | BACKEND_AVAILABLE));
    assert!(dp.vips.contains_key(&key("198.18.10.1", 80)));
    assert!(dp
        .vips
        .contains_key(&marker_key("198.18.10.1".parse().unwrap())));
    assert_eq!(dp.settings.maglev_size, 257);
    assert_eq!(u32::from_be(dp.settings.src_v4_hostmask), 0xff);
    assert_eq!(u32::from_be(dp.settings.src_v6_hostmask), u32::MAX);
    // The ring holds both backends in about equal shares.
    let ring = &dp.rings[&dp.vips[&key("198.18.10.1", 80)].ring];
    let first = ring.iter().filter(|id| **id == ring[0]).count();
    assert!((120..=137).contains(&first), "{first} of 257 slots");
}

#[test]
fn changed_weights_go_to_a_new_ring_written_before_the_switch() {
    let mut b = balancer();
    b.apply_cfg(&web_two()).unwrap();
    let old_ring = b.datapath().vips[&key("198.18.10.1", 80)].ring;
    let start = b.datapath().log.len();
    let s = b
        .apply_cfg(&config(&vip(
            "198.18.10.1",
            80,
            &[("198.18.0.11", 3), ("198.18.0.12", 1)],
        )))
        .unwrap();
    assert_eq!(
        (s.vips_changed, s.backends_added, s.backends_removed),
        (1, 0, 0)
    );
    let log = &b.datapath().log[start..];
    let new_ring = b.datapath().vips[&key("198.18.10.1", 80)].ring;
    assert_ne!(new_ring, old_ring);
    let ring_at = log.iter().position(|o| *o == Op::Ring(new_ring)).unwrap();
    let switch_at = log
        .iter()
        .position(
            |o| matches!(o, Op::Vip(k, i) if *k == key("198.18.10.1", 80) && i.ring == new_ring),
        )
        .unwrap();
    assert!(ring_at < switch_at);
    // The VIP keeps its id (and counters).
    assert_eq!(b.datapath().vips[&key("198.18.10.1", 80)].vip_id, 0);
}

#[test]
fn unchanged_vips_keep_their_ring_and_write_nothing() {
    let mut b = balancer();
    let c = config(&vip("198.18.10.1", 80, &[("198.18.0.11", 1)]));
    b.apply(&c, &BTreeMap::new()).unwrap();
    let start = b.datapath().log.len();
    let s = b.apply(&c, &BTreeMap::new()).unwrap();
    assert_eq!(s.vips_unchanged, 1);
    assert_eq!(b.datapath().log.len(), start);
}

#[test]
fn removed_backend_loses_usable_bit_after_vip_switch() {
    let mut b = balancer();
    b.apply_cfg(&web_two()).unwrap();
    let gone_id = b.backends[&"198.18.0.12".parse().unwrap()].id;
    let start = b.datapath().log.len();
    let s = b
        .apply_cfg(&config(&vip("198.18.10.1", 80, &[("198.18.0.11", 1)])))
        .unwrap();
    assert_eq!(s.backends_removed, 1);
    let log = &b.datapath().log[start..];
    let switch_at = log.iter().position(|o| matches!(o, Op::Vip(..))).unwrap();
    let cleared_at = log
        .iter()
        .position(|o| *o == Op::Backend(gone_id, 0))
        .unwrap();
    assert!(switch_at < cleared_at);
    let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring];
    assert!(!ring.contains(&gone_id));
}

#[test]
fn removed_vip_and_its_marker_go() {
    let mut b = balancer();
    b.apply_cfg(&config(&format!(
        "{}{}",
        vip("198.18.10.1", 80, &[("198.18.0.11", 1)]),
        vip("198.18.10.2", 80, &[("198.18.0.11", 1)])
    )))
    .unwrap();
    b.apply_cfg(&config(&vip("198.18.10.1", 80, &[("198.18.0.11", 1)])))
        .unwrap();
    let dp = b.datapath();
    assert!(!dp.vips.contains_key(&key("198.18.10.2", 80)));
    assert!(!dp
        .vips
        .contains_key(&marker_key("198.18.10.2".parse().unwrap())));
    assert!(dp
        .vips
        .contains_key(&marker_key("198.18.10.1".parse().unwrap())));
}

#[test]
fn many_applies_never_run_out_of_rings_or_reuse_a_live_ring() {
    let mut b = balancer();
    for round in 0..50u32 {
        let vips: String = (0..4)
            .map(|i| {
                vip(
                    &format!("198.18.10.{}", i + 1),
                    80,
                    &[("198.18.0.11", round + 1), ("198.18.0.12", 1)],
                )
            })
            .collect();
        b.apply_cfg(&config(&vips)).unwrap();
        let live: BTreeSet<u32> = b.vips.values().map(|v| v.ring).collect();
        assert_eq!(live.len(), 4, "round {round}: two VIPs share a ring");
    }
}

#[test]
fn too_many_backends_changes_nothing() {
    let mut b = balancer();
    b.apply_cfg(&config(&vip("198.18.10.1", 80, &[("198.18.0.11", 1)])))
        .unwrap();
    let before = b.datapath().log.len();
    let many: Vec<(String, u32)> = (0..9).map(|i| (format!("198.18.1.{i}"), 1)).collect();
    let many: Vec<(&str, u32)> = many.iter().map(|(a, w)| (a.as_str(), *w)).collect();
    // The config itself is valid for max_backends=8 per... use a raw build to bypass validation.
    let mut c = config(&vip("198.18.10.1", 80, &[("198.18.0.11", 1)]));
    c.vips[0].backends = many
        .iter()
        .map(|(a, w)| BackendConfig {
            address: a.parse().unwrap(),
            weight: *w,
            max_flows: None,
        })
        .collect();
    assert!(b.apply(&c, &BTreeMap::new()).is_err());
    assert_eq!(b.datapath().log.len(), before);
}

#[test]
fn next_hops_fill_backend_entries_and_tx_ports() {
    let mut b = balancer();
    b.apply_cfg(&web_two()).unwrap();
    let nh = NextHop {
        ifindex: 7,
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        mtu: 1500,
    };
    assert!(b
        .set_next_hop("198.18.0.11".parse().unwrap(), Some(nh))
        .unwrap());
    assert!(!b
        .set_next_hop("198.18.0.11".parse().unwrap(), Some(nh))
        .unwrap());
    let local = NextHop { ifindex: 2, ..nh };
    assert!(b
        .set_next_hop("198.18.0.12".parse().unwrap(), Some(local))
        .unwrap());
    let dp = b.datapath();
    let id = b.backends[&"198.18.0.11".parse().unwrap()].id;
    assert_eq!(dp.backends[&id].ifindex, 7);
    assert_eq!(dp.backends[&id].dst_mac, [2, 0, 0, 0, 0, 2]);
    assert_eq!(dp.backends[&id].mtu, 1500);
    assert_eq!(dp.tx_ports, BTreeSet::from([7]));
    // A new MTU rewrites the entry; one beyond 16 bits (loopback's 65536) is capped.
    let address = "198.18.0.11".parse().unwrap();
    for (mtu, written) in [(1400, 1400), (65536, u16::MAX)] {
        assert!(b
            .set_next_hop(address, Some(NextHop { mtu, ..nh }))
            .unwrap());
        assert_eq!(b.datapath().backends[&id].mtu, written);
    }
}

#[test]
fn a_down_backend_leaves_the_table_then_loses_its_flows_and_comes_back() {
    let mut b = balancer();
    b.apply_cfg(&web_two()).unwrap();
    let addr: IpAddr = "198.18.0.12".parse().unwrap();
    let id = b.backends[&addr].id;
    let web = ("198.18.10.1".parse().unwrap(), 80, Protocol::Tcp);
    let start = b.datapath().log.len();
    assert!(b.set_health(web, addr, false).unwrap());
    assert!(
        !b.set_health(web, addr, false).unwrap(),
        "no change, no writes"
    );
    let log = b.datapath().log[start..].to_vec();
    let switch = log
        .iter()
        .position(|o| matches!(o, Op::Vip(k, _) if *k == key("198.18.10.1", 80)))
        .unwrap();
    let unusable = log
        .iter()
        .position(|o| *o == Op::Backend(id, BACKEND_ALLOCATED))
        .unwrap();
    assert!(
        switch < unusable,
        "new flows stop before established ones move"
    );
    let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring];
    assert!(!ring.contains(&id));
    // A reload keeps the verdict.
    b.apply_cfg(&config(&vip(
        "198.18.10.1",
        80,
        &[("198.18.0.11", 2), ("198.18.0.12", 1)],
    )))
    .unwrap();
    let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring];
    assert!(!ring.contains(&id));
    let start = b.datapath().log.len();
    assert!(b.set_health(web, addr, true).unwrap());
    let log = b.datapath().log[start..].to_vec();
    let usable = log
        .iter()
        .position(|o| *o == Op::Backend(id, BACKEND_ALLOCATED | BACKEND_USABLE | BACKEND_AVAILABLE))
        .unwrap();
    let switch = log.iter().position(|o| matches!(o, Op::Vip(..))).unwrap();
    assert!(usable < switch, "usable again before new flows come");
    let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring];
    assert!(ring.contains(&id));
    // Unknown pairs change nothing.
    assert!(!b
        .set_health(web, "198.18.0.99".parse().unwrap(), false)
        .unwrap());
}

#[test]
fn load_scales_weights_and_shares() {
    let mut b = balancer();
    b.apply_cfg(&config(&vip(
        "198.18.10.1",
        80,
        &[("198.18.0.11", 100), ("198.18.0.12", 100)],
    )))
    .unwrap();
    let web = ("198.18.10.1".parse().unwrap(), 80, Protocol::Tcp);
    let busy: IpAddr = "198.18.0.12".parse().unwrap();
    let place = Placement {
        backend: busy,
        service: Service::Serving,
        preference: 1.0,
        load_factor: 0.25,
    };
    assert!(b.set_service(web, &[place]).unwrap());
    let writes = b.datapath().log.len();
    assert!(
        !b.set_service(web, &[place]).unwrap(),
        "same factor, no rebuild"
    );
    assert_eq!(b.datapath().log.len(), writes);
    let cfg = b.vips[&web].config.clone();
    let weights: Vec<u32> = cfg
        .backends
        .iter()
        .map(|x| b.effective_weight(&cfg, x))
        .collect();
    assert_eq!(weights, [100, 25]);
    let share = f64::from(b.slots(web, busy)) / 257.0;
    assert!((share - 0.2).abs() < 0.02, "25 of 125: {share}");
}

#[test]
fn two_agents_agree_whatever_the_order() {
    let mut a = balancer();
    let mut b = balancer();
    a.apply_cfg(&config(&vip(
        "198.18.10.1",
        80,
        &[("198.18.0.11", 2), ("198.18.0.12", 1), ("198.18.0.13", 1)],
    )))
    .unwrap();
    b.apply_cfg(&config(&vip(
        "198.18.10.1",
        80,
        &[("198.18.0.13", 1), ("198.18.0.11", 2), ("198.18.0.12", 1)],
    )))
    .unwrap();
    let addr_of = |bal: &Balancer<FakeDatapath>, id: u32| {
        *bal.backends.iter().find(|(_, s)| s.id == id).unwrap().0
    };
    for hash in 0..257 {
        let pa = a.datapath().pick(&key("198.18.10.1", 80), hash).unwrap();
        let pb = b.datapath().pick(&key("198.18.10.1", 80), hash).unwrap();
        assert_eq!(addr_of(&a, pa), addr_of(&b, pb));
    }
}

#[test]
fn second_vip_lookup_is_skipped_only_while_no_vip_has_every_port() {
    use lb_common::SETTING_NO_EVERY_PORT_VIPS as NONE;
    let mut b = balancer();
    b.apply_cfg(&web_two()).unwrap();
    assert_ne!(b.datapath().settings.flags & NONE, 0);
    let both = config(&format!(
        "{}{}",
        vip("198.18.10.1", 80, &[("198.18.0.11", 1)]),
        vip("198.18.10.2", 0, &[("198.18.0.12", 1)])
    ));
    // Cleared before the every-port VIP is written.
    b.apply_cfg(&both).unwrap();
    assert_eq!(b.datapath().settings.flags & NONE, 0);
    // Still clear in the apply that removes it (packets may still reach it)...
    b.apply_cfg(&web_two()).unwrap();
    assert_eq!(b.datapath().settings.flags & NONE, 0);
    // ...and set again once no VIP has port 0.
    b.apply_cfg(&web_two()).unwrap();
    assert_ne!(b.datapath().settings.flags & NONE, 0);
}
