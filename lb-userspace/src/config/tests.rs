//! Unit tests of `config`.

use super::*;

const GOOD: &str = r#"
socket = "/run/lb-test/lb.sock"
[datapath]
interfaces = ["eth0"]
xdp_mode = "native"
maglev_table_size = 65537
[encap]
source_v4 = "198.18.200.0/24"
source_v6 = "fd00:200::/96"
[[vips]]
name = "web"
address = "198.18.10.1"
port = 80
protocol = "tcp"
backends = [ { address = "198.18.0.11", weight = 100 }, { address = "fd00::12", weight = 50 } ]
[[vips]]
address = "fd00:10::1"
protocol = "udp"
backends = [ { address = "fd00::12" } ]
"#;

fn with(replace: &str, by: &str) -> Result<Config, ConfigError> {
    assert!(GOOD.contains(replace), "fixture lacks {replace:?}");
    Config::from_toml(&GOOD.replacen(replace, by, 1))
}

fn field_of(replace: &str, by: &str) -> String {
    match with(replace, by) {
        Ok(_) => panic!("{replace:?} -> {by:?} was accepted"),
        Err(e) => {
            assert!(!e.message.is_empty());
            e.field
        }
    }
}

#[test]
fn good_config_parses_with_defaults() {
    let c = Config::from_toml(GOOD).unwrap();
    let b = c.balancer.unwrap();
    assert_eq!(b.vips.len(), 2);
    assert_eq!(b.vips[1].name, "udp/[fd00:10::1]:0");
    assert_eq!(b.vips[1].port, 0);
    assert_eq!(b.vips[1].backends[0].weight, 100);
    assert_eq!(b.datapath.max_vips, 64);
    // Three rings of the smallest size per VIP, by default.
    assert_eq!(b.datapath.maglev_slots, 3 * 64 * 65537);
    assert_eq!(b.datapath.flow_table_size, 1_000_000);
    assert!(c.decap.is_none());
}

/// (text of the good file, what replaces it, the field the error must name).
const BAD_FIELDS: &[(&str, &str, &str)] = &[
    (
        "socket = \"/run/lb-test/lb.sock\"",
        "socket = \"relative.sock\"",
        "socket",
    ),
    (
        "socket = \"/run/lb-test/lb.sock\"",
        "instance = \"../escape\"\nsocket = \"/run/lb-test/lb.sock\"",
        "instance",
    ),
    (
        "interfaces = [\"eth0\"]",
        "interfaces = []",
        "datapath.interfaces",
    ),
    (
        "interfaces = [\"eth0\"]",
        "interfaces = [\"eth0\", \"eth0\"]",
        "datapath.interfaces[1]",
    ),
    (
        "interfaces = [\"eth0\"]",
        "interfaces = [\"a-very-long-interface-name\"]",
        "datapath.interfaces[0]",
    ),
    (
        "xdp_mode = \"native\"",
        "xdp_mode = \"turbo\"",
        "datapath.xdp_mode",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 65536",
        "datapath.maglev_table_size",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 5",
        "datapath.maglev_table_size",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 65537\nicmp_too_big_rate = -1",
        "datapath.icmp_too_big_rate",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 65537\nicmp_too_big_burst = 0",
        "datapath.icmp_too_big_burst",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 65537\nmax_vips = 0",
        "datapath.max_vips",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 65537\nmax_vips = 4096",
        "datapath.max_vips",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 65537\nmax_vips = 1",
        "vips",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 65537\nmax_backends = 1",
        "vips",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 65537\nmaglev_slots = 196610",
        "datapath.maglev_slots",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 65537\nmaglev_slots = 268435457",
        "datapath.maglev_slots",
    ),
    // Two backends take rings of 907 slots from 7: three do not fit 2,000.
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 7\nmaglev_slots = 2000",
        "vips[0].backends",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 65537\nflow_table_size = 0",
        "datapath.flow_table_size",
    ),
    (
        "maglev_table_size = 65537",
        "maglev_table_size = 65537\nnext_hop_refresh_ms = 1",
        "datapath.next_hop_refresh_ms",
    ),
    (
        "source_v4 = \"198.18.200.0/24\"",
        "source_v4 = \"198.18.200.0/33\"",
        "encap.source_v4",
    ),
    (
        "source_v6 = \"fd00:200::/96\"",
        "source_v6 = \"nope\"",
        "encap.source_v6",
    ),
    (
        "source_v6 = \"fd00:200::/96\"",
        "",
        "vips[0].backends[1].address",
    ),
    (
        "source_v4 = \"198.18.200.0/24\"",
        "",
        "vips[0].backends[0].address",
    ),
    (
        "address = \"198.18.10.1\"",
        "address = \"198.18.10\"",
        "vips[0].address",
    ),
    (
        "address = \"198.18.10.1\"",
        "address = \"0.0.0.0\"",
        "vips[0].address",
    ),
    (
        "address = \"198.18.10.1\"",
        "address = \"224.0.0.1\"",
        "vips[0].address",
    ),
    (
        "protocol = \"tcp\"",
        "protocol = \"sctp\"",
        "vips[0].protocol",
    ),
    ("name = \"web\"", "name = \"two words\"", "vips[0].name"),
    (
        "name = \"web\"",
        "name = \"udp/[fd00:10::1]:0\"",
        "vips[1].name",
    ),
    (
        "{ address = \"198.18.0.11\", weight = 100 }",
        "{ address = \"198.18.0.11\", weight = 70000 }",
        "vips[0].backends[0].weight",
    ),
    (
        "{ address = \"198.18.0.11\", weight = 100 }",
        "{ address = \"fd00::12\", weight = 1 }",
        "vips[0].backends[1].address",
    ),
    (
        "{ address = \"198.18.0.11\", weight = 100 }",
        "{ address = \"127.0.0.1\" }",
        "vips[0].backends[0].address",
    ),
    (
        "backends = [ { address = \"fd00::12\" } ]",
        "backends = []",
        "vips[1].backends",
    ),
    (
        "address = \"fd00:10::1\"\nprotocol = \"udp\"",
        "address = \"198.18.10.1\"\nport = 80\nprotocol = \"tcp\"",
        "vips[1]",
    ),
    ("port = 80", "port = 80\ncolour = \"red\"", "config"),
    (
        "[encap]",
        "[visibility]\nevent_sample = -2\n[encap]",
        "visibility.event_sample",
    ),
    (
        "[encap]",
        "[visibility]\ntcp_idle_timeout_s = 0\n[encap]",
        "visibility.tcp_idle_timeout_s",
    ),
    (
        "[encap]",
        "[visibility]\ncollect_interval_ms = 5\n[encap]",
        "visibility.collect_interval_ms",
    ),
    (
        "[encap]",
        "[metrics]\nlisten = \"localhost\"\n[encap]",
        "metrics.listen",
    ),
    ("port = 80", "port = 70000", "vips[0].port"),
    ("port = 80", "port = -1", "vips[0].port"),
    (
        "{ address = \"198.18.0.11\", weight = 100 }",
        "{ address = \"198.18.0.11\", weight = -1 }",
        "vips[0].backends[0].weight",
    ),
    ("port = 80", "port = \"eighty\"", "config"),
    (
        "port = 80",
        "port = 80\nhealth = { kind = \"icmp\" }",
        "vips[0].health.kind",
    ),
    (
        "port = 80",
        "port = 80\nhealth = { kind = \"http\", path = \"x\" }",
        "vips[0].health.path",
    ),
    (
        "port = 80",
        "port = 80\nhealth = { kind = \"tcp\", path = \"/\" }",
        "vips[0].health.path",
    ),
    (
        "port = 80",
        "port = 80\nhealth = { kind = \"http\", expect_status = 99 }",
        "vips[0].health.expect_status",
    ),
    (
        "port = 80",
        "port = 80\nhealth = { kind = \"tcp\", interval_ms = 100, timeout_ms = 200 }",
        "vips[0].health.timeout_ms",
    ),
    (
        "port = 80",
        "port = 80\nhealth = { kind = \"tcp\", fall = 0 }",
        "vips[0].health.fall",
    ),
    (
        "port = 80",
        "port = 80\nhealth = { kind = \"http\", tls_server_name = \"a.test\" }",
        "vips[0].health.tls_server_name",
    ),
    (
        "port = 80",
        "port = 80\nhealth = { kind = \"https\", tls_server_name = \"not a name\" }",
        "vips[0].health.tls_server_name",
    ),
    (
        "port = 80",
        "port = 80\nhealth = { kind = \"https\", tls_server_name = \"198.18.0.11\" }",
        "vips[0].health.tls_server_name",
    ),
    (
        "port = 80",
        "port = 80\nhealth = { kind = \"https\", tls_ca_file = \"/nonexistent/ca.pem\" }",
        "vips[0].health.tls_ca_file",
    ),
    (
        "port = 80",
        "port = 80\nhealth = { kind = \"https\", tls_ca_file = \"/proc/version\" }",
        "vips[0].health.tls_ca_file",
    ),
    (
        "protocol = \"udp\"",
        "protocol = \"udp\"\nhealth = { kind = \"tcp\" }",
        "vips[1].health.port",
    ),
    (
        "port = 80",
        "port = 80\nfeedback = { port = 0 }",
        "vips[0].feedback.port",
    ),
    (
        "port = 80",
        "port = 80\nfeedback = { port = 8081, smoothing = 0 }",
        "vips[0].feedback.smoothing",
    ),
    (
        "port = 80",
        "port = 80\nfeedback = { port = 8081, min_change = 2 }",
        "vips[0].feedback.min_change",
    ),
    (
        "port = 80",
        "port = 80\nfeedback = { port = 8081, path = \"load\" }",
        "vips[0].feedback.path",
    ),
    (
        "port = 80",
        "port = 80\nfeedback = { port = 8081, interval_ms = 100, timeout_ms = 200 }",
        "vips[0].feedback.timeout_ms",
    ),
    (
        "port = 80",
        "port = 80\nmaintenance = { load_limit = 0 }",
        "vips[0].maintenance.load_limit",
    ),
    (
        "port = 80",
        "port = 80\nmaintenance = { load_limit = 1.5 }",
        "vips[0].maintenance.load_limit",
    ),
    (
        "port = 80",
        "port = 80\nmaintenance = { min_spare = 1 }",
        "vips[0].maintenance.min_spare",
    ),
    (
        "port = 80",
        "port = 80\nmaintenance = { max_parallel = 0 }",
        "vips[0].maintenance.max_parallel",
    ),
    (
        "port = 80",
        "port = 80\nmaintenance = { drain_timeout_s = 0 }",
        "vips[0].maintenance.drain_timeout_s",
    ),
    (
        "port = 80",
        "port = 80\nmaintenance = { hook = [] }",
        "vips[0].maintenance.hook",
    ),
    (
        "port = 80",
        "port = 80\nmaintenance = { hook = [\"upgrade.sh\"] }",
        "vips[0].maintenance.hook",
    ),
    (
        "port = 80",
        "port = 80\nmaintenance = { hook_timeout_s = -1 }",
        "vips[0].maintenance.hook_timeout_s",
    ),
    (
        "port = 80",
        "port = 80\nmaintenance = { prefer_up_to_date = 0 }",
        "vips[0].maintenance.prefer_up_to_date",
    ),
    (
        "weight = 100 }",
        "weight = 100, max_flows = 0 }",
        "vips[0].backends[0].max_flows",
    ),
    (
        "[encap]",
        "[lifecycle]\nstate_file = \"relative.json\"\n[encap]",
        "lifecycle.state_file",
    ),
];

#[test]
fn every_bad_field_is_named() {
    let cases = BAD_FIELDS;
    for (replace, by, field) in cases {
        assert_eq!(&field_of(replace, by), field, "case {by:?}");
    }
}

#[test]
fn structural_errors() {
    let e = Config::from_toml("").unwrap_err();
    assert_eq!(e.field, "config");
    let e = Config::from_toml("[[vips]]\naddress=\"198.18.10.1\"\nprotocol=\"tcp\"\nbackends=[]")
        .unwrap_err();
    assert_eq!(e.field, "vips");
    let e = Config::from_toml("this is not toml").unwrap_err();
    assert_eq!(e.field, "config");
    let e = Config::from_toml("[decap]\ninterfaces=[\"eth0\"]\naddresses=[]").unwrap_err();
    assert_eq!(e.field, "decap.addresses");
    let e = Config::from_toml("[decap]\ninterfaces=[\"eth0\"]\naddresses=[\"x\"]").unwrap_err();
    assert_eq!(e.field, "decap.addresses[0]");
    let both = format!("{GOOD}\n[decap]\ninterfaces=[\"eth0\"]\naddresses=[\"198.18.0.2\"]");
    assert_eq!(
        Config::from_toml(&both).unwrap_err().field,
        "decap.interfaces[0]"
    );
}

#[test]
fn shipped_examples_are_valid() {
    let lb = Config::from_toml(include_str!("../../../examples/lb.toml")).unwrap();
    assert_eq!(lb.balancer.unwrap().vips.len(), 2);
    let backend = Config::from_toml(include_str!("../../../examples/backend.toml")).unwrap();
    assert!(backend.decap.is_some());
}

#[test]
fn decap_only_config() {
    let c = Config::from_toml(
        "[decap]\ninterfaces=[\"veth0\"]\naddresses=[\"198.18.0.11\", \"fd00::11\"]\nxdp_mode=\"generic\"",
    )
    .unwrap();
    let d = c.decap.unwrap();
    assert_eq!(d.addresses.len(), 2);
    assert_eq!(d.xdp_mode, XdpModeSetting::Generic);
    assert!(c.balancer.is_none());
}

#[test]
fn reload_may_change_vips_but_not_sizes() {
    let old = Config::from_toml(GOOD).unwrap();
    let weights = with("weight = 50", "weight = 10").unwrap();
    old.check_reload(&weights).unwrap();
    let resized = with("maglev_table_size = 65537", "maglev_table_size = 257").unwrap();
    assert_eq!(old.check_reload(&resized).unwrap_err().field, "datapath");
    let moved = with("/run/lb-test/lb.sock", "/run/other.sock").unwrap();
    assert_eq!(old.check_reload(&moved).unwrap_err().field, "socket");
}

const FLEET: &str = r#"
[fleet]
endpoints = ["https://127.0.0.1:2379", "etcd.example:2379"]
ca = "/etc/lb/ca.pem"
cert = "/etc/lb/client.pem"
key = "/etc/lb/client.key"
node = "lb-1"
"#;

#[test]
fn fleet_section_parses_with_defaults() {
    let c = Config::from_toml(&format!("{GOOD}{FLEET}")).unwrap();
    let f = c.fleet.unwrap();
    assert_eq!(
        f.endpoints,
        ["https://127.0.0.1:2379", "https://etcd.example:2379"]
    );
    assert_eq!((f.node.as_str(), f.prefix.as_str()), ("lb-1", "/lb"));
    assert_eq!(f.lease_ttl_s, 10);
    // lbctl reads the section alone, from an agent's file or a file of its own.
    assert_eq!(
        FleetConfig::from_toml_section(&format!("{GOOD}{FLEET}")).unwrap(),
        FleetConfig::from_toml_section(FLEET).unwrap()
    );
    assert_eq!(
        FleetConfig::from_toml_section("x = 1").unwrap_err().field,
        "fleet"
    );
    // The node defaults to the host name.
    let unnamed = FLEET.replace("node = \"lb-1\"\n", "");
    assert!(!FleetConfig::from_toml_section(&unnamed)
        .unwrap()
        .node
        .is_empty());
}

#[test]
fn every_bad_fleet_field_is_named() {
    let cases = [
        (
            "\"https://127.0.0.1:2379\", ",
            "\"http://127.0.0.1:2379\", ",
            "fleet.endpoints[0]",
        ),
        ("etcd.example:2379", "etcd.example", "fleet.endpoints[1]"),
        ("etcd.example:2379", "etcd.example:0", "fleet.endpoints[1]"),
        ("ca = \"/etc/lb/ca.pem\"\n", "", "fleet.ca"),
        ("cert = \"/etc/lb/client.pem\"\n", "", "fleet.cert"),
        ("key = \"/etc/lb/client.key\"", "key = \"\"", "fleet.key"),
        ("node = \"lb-1\"", "node = \"lb/1\"", "fleet.node"),
        (
            "node = \"lb-1\"",
            "node = \"lb-1\"\nprefix = \"lb\"",
            "fleet.prefix",
        ),
        (
            "node = \"lb-1\"",
            "node = \"lb-1\"\nprefix = \"/lb/\"",
            "fleet.prefix",
        ),
        (
            "node = \"lb-1\"",
            "node = \"lb-1\"\nlease_ttl_s = 1",
            "fleet.lease_ttl_s",
        ),
    ];
    for (replace, by, field) in cases {
        assert!(FLEET.contains(replace), "fixture lacks {replace:?}");
        let text = format!("{GOOD}{}", FLEET.replacen(replace, by, 1));
        let e = Config::from_toml(&text).expect_err(by);
        assert_eq!(e.field, field, "case {by:?}: {e}");
    }
    let empty = FLEET.replace("[\"https://127.0.0.1:2379\", \"etcd.example:2379\"]", "[]");
    let e = Config::from_toml(&format!("{GOOD}{empty}")).unwrap_err();
    assert_eq!(e.field, "fleet.endpoints");
    let e = Config::from_toml(&format!("{GOOD}{FLEET}colour = 1\n")).unwrap_err();
    assert!(e.message.contains("colour"), "{e}");
    let old = Config::from_toml(&format!("{GOOD}{FLEET}")).unwrap();
    let moved = Config::from_toml(&format!("{GOOD}{}", FLEET.replace("lb-1", "lb-2"))).unwrap();
    assert_eq!(old.check_reload(&moved).unwrap_err().field, "fleet");
}

#[test]
fn vip_documents_follow_the_vips_rules() {
    // GOOD's [[vips]], alone: the same document a fleet keeps.
    let doc = &GOOD[GOOD.find("[[vips]]").unwrap()..];
    let b = Config::from_toml(GOOD).unwrap().balancer.unwrap();
    let vips = RawVipDocument::from_toml(doc)
        .unwrap()
        .validate_for(&b)
        .unwrap();
    assert_eq!(vips, b.vips);
    assert_eq!(
        RawVipDocument::from_toml(doc)
            .unwrap()
            .validate_alone()
            .unwrap(),
        b.vips
    );
    // A bad field is named as in a configuration file, by both checks.
    let bad = doc.replacen("port = 80", "port = 70000", 1);
    for e in [
        RawVipDocument::from_toml(&bad).unwrap().validate_alone(),
        RawVipDocument::from_toml(&bad).unwrap().validate_for(&b),
    ] {
        assert_eq!(e.unwrap_err().field, "vips[0].port");
    }
    // A balancer's own limits apply only where it applies the document.
    let v6_only = Config::from_toml(&GOOD.replacen("source_v4 = \"198.18.200.0/24\"\n", "", 1));
    assert_eq!(v6_only.unwrap_err().field, "vips[0].backends[0].address");
    let mut small = b.clone();
    small.datapath.max_vips = 1;
    let e = RawVipDocument::from_toml(doc)
        .unwrap()
        .validate_for(&small)
        .unwrap_err();
    assert_eq!(e.field, "vips");
    // Anything but [[vips]] is refused.
    let e = RawVipDocument::from_toml(&format!("socket = \"/x\"\n{doc}")).unwrap_err();
    assert_eq!(e.field, "vips document");
    assert!(RawVipDocument::from_toml("")
        .unwrap()
        .validate_alone()
        .unwrap()
        .is_empty());
}

#[test]
fn https_checks_read_their_ca_bundle() {
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let path = std::env::temp_dir().join(format!("lb-config-ca-{}.pem", std::process::id()));
    std::fs::write(&path, ca.pem()).unwrap();
    let health = format!(
        "port = 80\nhealth = {{ kind = \"https\", tls_server_name = \"Api.Example.com\", tls_ca_file = \"{}\" }}",
        path.display()
    );
    let c = with("port = 80", &health);
    std::fs::remove_file(&path).unwrap();
    let hc = c.unwrap().balancer.unwrap().vips[0].health.clone().unwrap();
    let HealthKind::Http { tls: Some(tls), .. } = hc.kind else {
        panic!("{hc:?}")
    };
    assert_eq!(tls.server_name.as_deref(), Some("api.example.com"));
    assert_eq!(tls.ca_pem.as_deref(), Some(ca.pem().as_bytes()));
}
