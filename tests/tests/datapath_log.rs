//! Datapath logs (`lb-agent --datapath-log`) through BPF_PROG_TEST_RUN: with
//! the logs on, each packet a program drops or passes leaves one aya-log
//! record naming its outcome and addresses, forwarded packets none; with
//! them off, the same packets leave nothing.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
};

use aya_log::EbpfLogger;
use lb_common::{PROTO_IPIP, PROTO_TCP, PROTO_UDP};
use lb_tests::{fixture::*, packet::*};

const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);

/// Collects the messages aya-log reads from the ring.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<(String, String)>>>);

impl log::Log for Collect {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((r.target().to_string(), r.args().to_string()));
    }
    fn flush(&self) {}
}

fn fixture(datapath_log: bool) -> Fixture {
    let vips = "[[vips]]\naddress=\"198.18.10.1\"\nport=80\nprotocol=\"tcp\"\nbackends=[{ address = \"198.18.0.11\" }]\n";
    let mut f = Fixture::with_datapath_log(SIZES, vips, datapath_log);
    f.add_decap_address("198.18.0.11".parse().unwrap());
    f
}

struct Case {
    description: &'static str,
    program: &'static str,
    input: Vec<u8>,
    /// The record expected with the logs on; `None`: none.
    record: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    let inner = ipv4(CLIENT4, VIP4, PROTO_TCP, &tcp(40000, 80, TCP_ACK, b""));
    vec![
        Case {
            description: "IPv4 UDP to an address that is no VIP",
            program: "lb_ingress",
            input: v4(ipv4(
                CLIENT4,
                Ipv4Addr::new(198, 18, 0, 99),
                PROTO_UDP,
                &udp(5000, 4242, b"x"),
            )),
            record: Some(
                "program=0 outcome=4 action=2 proto=17 src=198.18.0.1:5000 dst=198.18.0.99:4242",
            ),
        },
        Case {
            description: "IPv6 TCP to an address that is no VIP",
            program: "lb_ingress",
            input: eth(
                LB_MAC,
                CLIENT_MAC,
                ETH_IPV6,
                &ipv6(
                    CLIENT6,
                    OTHER6,
                    PROTO_TCP,
                    0,
                    64,
                    &tcp(40001, 443, TCP_SYN, b""),
                ),
            ),
            record: Some(
                "program=0 outcome=4 action=2 proto=6 src=[fd00::1]:40001 dst=[fd00:99::1]:443",
            ),
        },
        Case {
            description: "VIP TCP with the TCP header cut short",
            program: "lb_ingress",
            input: v4(ipv4(
                CLIENT4,
                VIP4,
                PROTO_TCP,
                &tcp(40002, 80, TCP_ACK, b"")[..6],
            )),
            record: Some(
                "program=0 outcome=6 action=1 proto=6 src=198.18.0.1:40002 dst=198.18.10.1:80",
            ),
        },
        Case {
            description: "ARP",
            program: "lb_ingress",
            input: eth(LB_MAC, CLIENT_MAC, 0x0806, &[0u8; 28]),
            record: Some("program=0 outcome=3 action=2 ether_type=806"),
        },
        Case {
            description: "VIP TCP, forwarded: not logged",
            program: "lb_ingress",
            input: v4(ipv4(
                CLIENT4,
                VIP4,
                PROTO_TCP,
                &tcp(40003, 80, TCP_SYN, b""),
            )),
            record: None,
        },
        Case {
            description: "lb_decap: IPIP to an address that is not this host's",
            program: "lb_decap",
            input: v4(encap_ipv4(
                Ipv4Addr::new(198, 18, 200, 7),
                Ipv4Addr::new(198, 18, 0, 77),
                PROTO_IPIP,
                &inner,
            )),
            record: Some(
                "program=1 outcome=1 action=2 proto=4 src=198.18.200.7:0 dst=198.18.0.77:0",
            ),
        },
        Case {
            description: "lb_decap: IPIP to this host, decapsulated: not logged",
            program: "lb_decap",
            input: v4(encap_ipv4(
                Ipv4Addr::new(198, 18, 200, 7),
                Ipv4Addr::new(198, 18, 0, 11),
                PROTO_IPIP,
                &inner,
            )),
            record: None,
        },
    ]
}

fn v4(ip: Vec<u8>) -> Vec<u8> {
    eth(LB_MAC, CLIENT_MAC, ETH_IPV4, &ip)
}

/// Runs every case and returns each one's records.
fn run_all(f: &mut Fixture) -> Vec<Vec<(String, String)>> {
    let collect = Collect::default();
    let logger = EbpfLogger::init_with_logger(&mut f.ebpf, collect.clone());
    let mut logger = logger.expect("the object has the log ring");
    let mut out = Vec::new();
    for c in cases() {
        let run = match c.program {
            "lb_ingress" => f.ingress(&c.input),
            _ => f.decap(&c.input),
        };
        assert_ne!(run.action, 0, "{}: aborted", c.description);
        logger.flush();
        out.push(std::mem::take(&mut *collect.0.lock().unwrap()));
    }
    out
}

#[test]
fn with_the_logs_on_each_drop_or_pass_leaves_one_record() {
    let mut f = fixture(true);
    for (c, records) in cases().iter().zip(run_all(&mut f)) {
        match c.record {
            Some(want) => {
                assert_eq!(records.len(), 1, "{}: {records:?}", c.description);
                assert_eq!(records[0].0, "lb_datapath", "{}", c.description);
                assert_eq!(records[0].1, want, "{}", c.description);
            }
            None => assert!(records.is_empty(), "{}: {records:?}", c.description),
        }
    }
}

#[test]
fn with_the_logs_off_nothing_is_written() {
    let mut f = fixture(false);
    for (c, records) in cases().iter().zip(run_all(&mut f)) {
        assert!(records.is_empty(), "{}: {records:?}", c.description);
    }
}
