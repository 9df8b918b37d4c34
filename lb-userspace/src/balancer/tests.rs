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
    maglev_slots: 32768,
    max_vips: 4,
    max_backends: 8,
    flow_table_size: 1024,
};

fn config(vips: &str) -> BalancerConfig {
    let text = format!(
        "[datapath]\ninterfaces=[\"eth0\"]\nmaglev_table_size=257\nmaglev_slots=32768\nmax_vips=4\nmax_backends=8\n\
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
    Balancer::new(FakeDatapath::default(), SIZES, BTreeSet::from([2]))
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
    // The ring, sized for two backends (400 slots each, in sizes doubling
    // from 257), holds both in about equal shares.
    let ring = &dp.rings[&dp.vips[&key("198.18.10.1", 80)].ring_base];
    assert_eq!(ring.len(), 1031);
    let first = ring.iter().filter(|id| **id == ring[0]).count();
    assert!((495..=536).contains(&first), "{first} of 1031 slots");
}

#[test]
fn changed_weights_go_to_a_new_ring_written_before_the_switch() {
    let mut b = balancer();
    b.apply_cfg(&web_two()).unwrap();
    let old_ring = b.datapath().vips[&key("198.18.10.1", 80)].ring_base;
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
    let new_ring = b.datapath().vips[&key("198.18.10.1", 80)].ring_base;
    assert_ne!(new_ring, old_ring);
    let ring_at = log.iter().position(|o| *o == Op::Ring(new_ring)).unwrap();
    let switch_at = log
        .iter()
        .position(
            |o| matches!(o, Op::Vip(k, i) if *k == key("198.18.10.1", 80) && i.ring_base == new_ring),
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
    let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring_base];
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
        let mut live: Vec<Span> = b.vips.values().map(|v| v.ring).collect();
        live.extend(b.vips.values().filter_map(|v| v.previous));
        live.sort();
        for pair in live.windows(2) {
            assert!(
                pair[0].base + pair[0].size <= pair[1].base,
                "round {round}: two rings overlap: {pair:?}"
            );
        }
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
    let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring_base];
    assert!(!ring.contains(&id));
    // A reload keeps the verdict.
    b.apply_cfg(&config(&vip(
        "198.18.10.1",
        80,
        &[("198.18.0.11", 2), ("198.18.0.12", 1)],
    )))
    .unwrap();
    let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring_base];
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
    let ring = &b.datapath().rings[&b.datapath().vips[&key("198.18.10.1", 80)].ring_base];
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
    let size = b.datapath().vips[&key("198.18.10.1", 80)].ring_size;
    let share = f64::from(b.slots(web, busy)) / f64::from(size);
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

/// Second chance: a changed table keeps the one it replaced as the VIP's
/// previous ring, untouched, until the next change gives it up.
#[test]
fn a_changed_table_keeps_the_previous_one_for_the_second_chance() {
    let mut b = balancer();
    b.apply_cfg(&web_two()).unwrap();
    let k = key("198.18.10.1", 80);
    let first = b.datapath().vips[&k];
    assert_eq!(first.previous_size, 0, "a new VIP has no previous table");
    let first_table = b.datapath().rings[&first.ring_base].clone();

    // A third backend crosses a size boundary (800 slots are wanted for two
    // backends, 1,200 for three): the new ring is larger, the previous one
    // keeps its own size.
    let three = config(&vip(
        "198.18.10.1",
        80,
        &[("198.18.0.11", 1), ("198.18.0.12", 1), ("198.18.0.13", 1)],
    ));
    b.apply_cfg(&three).unwrap();
    let second = b.datapath().vips[&k];
    assert_ne!(second.ring_base, first.ring_base);
    assert!(second.ring_size > first.ring_size);
    assert_eq!(
        (second.previous_base, second.previous_size),
        (first.ring_base, first.ring_size)
    );
    // The previous ring still holds the first table for the datapath to read.
    assert_eq!(b.datapath().rings[&first.ring_base], first_table);

    // Many changes later no ring in use has been rewritten under the VIP:
    // the live and the previous ring always differ and are never reused
    // while named.
    let mut named = vec![(second.ring_base, second.previous_base)];
    for round in 0..12u32 {
        let weight = 1 + round % 3;
        b.apply_cfg(&config(&vip(
            "198.18.10.1",
            80,
            &[
                ("198.18.0.11", 1),
                ("198.18.0.12", weight),
                ("198.18.0.13", 1),
            ],
        )))
        .unwrap();
        let now = b.datapath().vips[&k];
        let (last_ring, _) = *named.last().unwrap();
        if now.ring_base != last_ring {
            assert_eq!(now.previous_base, last_ring);
            assert!(b.datapath().rings.contains_key(&now.previous_base));
        }
        assert_ne!(now.ring_base, now.previous_base);
        named.push((now.ring_base, now.previous_base));
    }
    // Removing the VIP gives both rings up.
    b.apply_cfg(&config(&vip("198.18.10.2", 80, &[("198.18.0.11", 1)])))
        .unwrap();
    assert!(!b.datapath().vips.contains_key(&k));
}

#[test]
fn the_digest_is_the_same_whatever_the_order_and_ids() {
    let mut a = balancer();
    a.apply_cfg(&config(&vip(
        "198.18.10.1",
        80,
        &[("198.18.0.11", 1), ("198.18.0.12", 2)],
    )))
    .unwrap();
    let mut b = balancer();
    // Another backend first takes other ids; then the same VIP, reordered.
    b.apply_cfg(&config(&vip("198.18.10.9", 80, &[("198.18.0.30", 1)])))
        .unwrap();
    b.apply_cfg(&config(&vip(
        "198.18.10.1",
        80,
        &[("198.18.0.12", 2), ("198.18.0.11", 1)],
    )))
    .unwrap();
    let ident = ("198.18.10.1".parse().unwrap(), 80, Protocol::Tcp);
    assert_ne!(a.table_digest(ident), 0);
    assert_eq!(a.table_digest(ident), b.table_digest(ident));
}

/// Rings that do not fit `maglev_slots` fail the apply before any write,
/// with an error naming the setting; what runs is untouched.
#[test]
fn rings_that_do_not_fit_fail_the_apply_and_change_nothing() {
    // Eight backends take rings of 4,127 slots: four VIPs fill 16,508 of
    // the 32,768, and changing all four at once needs four more rings.
    let vips = |changed: usize, weight: u32| -> BalancerConfig {
        let text: String = (0..4)
            .map(|i| {
                let list: Vec<(String, u32)> = (0..8)
                    .map(|j| {
                        (
                            format!("198.18.0.{}", 11 + j),
                            if i < changed { weight } else { 1 },
                        )
                    })
                    .collect();
                let list: Vec<(&str, u32)> = list.iter().map(|(a, w)| (a.as_str(), *w)).collect();
                vip(&format!("198.18.10.{}", i + 1), 80, &list)
            })
            .collect();
        config(&text)
    };
    let mut b = balancer();
    b.apply_cfg(&vips(0, 1)).unwrap();
    assert_eq!(b.datapath().vips[&key("198.18.10.1", 80)].ring_size, 4127);
    let (log, entries) = (b.datapath().log.len(), b.datapath().vips.clone());
    let e = b.apply_cfg(&vips(4, 2)).unwrap_err().to_string();
    assert!(e.contains("datapath.maglev_slots = 32768"), "{e}");
    assert!(e.contains("4127 slots"), "{e}");
    assert_eq!(b.datapath().log.len(), log, "nothing was written");
    assert_eq!(b.datapath().vips, entries);
    // Three changed VIPs fit.
    let s = b.apply_cfg(&vips(3, 2)).unwrap();
    assert_eq!(s.vips_changed, 3);
}

/// A restarted agent adopts the live and previous rings of every VIP where
/// they are (sizes included), so its first apply writes around them.
#[test]
fn an_adopting_agent_keeps_the_rings_in_use() {
    let mut a = balancer();
    a.apply_cfg(&web_two()).unwrap();
    let three = config(&vip(
        "198.18.10.1",
        80,
        &[("198.18.0.11", 1), ("198.18.0.12", 1), ("198.18.0.13", 1)],
    ));
    a.apply_cfg(&three).unwrap();
    let k = key("198.18.10.1", 80);
    let held = a.datapath().vips[&k];
    assert!(held.previous_size > 0 && held.previous_size != held.ring_size);
    let dp = FakeDatapath {
        vips: a.datapath().vips.clone(),
        backends: a.datapath().backends.clone(),
        rings: a.datapath().rings.clone(),
        ..FakeDatapath::default()
    };
    let mut b = Balancer::new(dp, SIZES, BTreeSet::from([2]));
    assert_eq!(b.adopt().unwrap(), (1, 3));
    let four = config(&vip(
        "198.18.10.1",
        80,
        &[("198.18.0.11", 2), ("198.18.0.12", 1), ("198.18.0.13", 1)],
    ));
    b.apply_cfg(&four).unwrap();
    let now = b.datapath().vips[&k];
    assert_eq!(
        (now.previous_base, now.previous_size),
        (held.ring_base, held.ring_size)
    );
    // The adopted live ring (now the previous one) was not written over.
    assert_eq!(
        b.datapath().rings[&held.ring_base],
        a.datapath().rings[&held.ring_base]
    );
    // Pinned rings outside this agent's array are refused.
    let mut outside = a.datapath().vips.clone();
    outside.get_mut(&k).unwrap().ring_base = SIZES.maglev_slots - 10;
    let dp = FakeDatapath {
        vips: outside,
        ..FakeDatapath::default()
    };
    let e = Balancer::new(dp, SIZES, BTreeSet::new())
        .adopt()
        .unwrap_err()
        .to_string();
    assert!(e.contains("datapath.maglev_slots = 32768"), "{e}");
}
