//! `cargo xtask demo`: a client, an LB and three backends in network
//! namespaces; real TCP, UDP and IPv6 traffic through the XDP balancer; then
//! `lbctl status` and `lbctl report`; then everything is removed.
use std::net::SocketAddr;

use lb_tests::topology::*;

fn main() {
    let weights = [100, 100, 200];
    println!("== building the topology: client, LB and 3 backends on one segment");
    let mut t = Topology::new(3);
    println!(
        "== starting lb_decap agents and servers on the backends, then the LB agent (native XDP)"
    );
    t.start(&weights);

    let web: SocketAddr = SocketAddr::new(VIP_V4.parse().unwrap(), 80);
    let dns: SocketAddr = SocketAddr::new(VIP_V4.parse().unwrap(), 53);
    let web6: SocketAddr = SocketAddr::new(VIP_V6.parse().unwrap(), 80);
    let (tcp, udp, tcp6) = t.from_client(move || {
        let tcp: Vec<_> = (0..400).map(|_| connect_once(web)).collect();
        let udp: Vec<_> = (0..50).map(|_| udp_once(dns)).collect();
        let tcp6: Vec<_> = (0..50).map(|_| connect_once(web6)).collect();
        (tcp, udp, tcp6)
    });
    let report = |what: &str, r: &[std::io::Result<String>]| {
        let ok = r.iter().filter(|x| x.is_ok()).count();
        let mut per: std::collections::BTreeMap<String, usize> = Default::default();
        for name in r.iter().flatten() {
            *per.entry(name.clone()).or_default() += 1;
        }
        println!("{what}: {ok}/{} answered, by backend {per:?}", r.len());
        ok == r.len()
    };
    println!("== traffic from the client namespace (weights b0:b1:b2 = 100:100:200)");
    let all_ok = report("TCP  198.18.10.1:80   ", &tcp)
        & report("UDP  198.18.10.1:53   ", &udp)
        & report("TCP  [fd00:10::1]:80  ", &tcp6);

    println!("== lbctl status");
    let out = t.lbctl(&["status"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    // Let the collector (every 200 ms here) see the last packets.
    std::thread::sleep(std::time::Duration::from_millis(500));
    println!("== lbctl report --top 5");
    let report = t.lbctl(&["report", "--top", "5", "--since", "1h"]);
    print!("{}", String::from_utf8_lossy(&report.stdout));
    eprint!("{}", String::from_utf8_lossy(&report.stderr));
    println!("== removing the topology");
    drop(t);
    if !all_ok || !out.status.success() || !report.status.success() {
        eprintln!("demo: some traffic was not answered");
        std::process::exit(1);
    }
    println!("== done");
}
