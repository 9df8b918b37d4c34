//! Bypass at the source intermediary: what `lb_source` costs per packet
//! against the floor, for a packet sent straight to its backend (an entry
//! in the bypass table) and for one passed toward the LB (recorded in the
//! sent table). The LB node's packets per flow with and without bypass are
//! measured end to end by `tests/tests/bypass.rs`.

use lb_userspace::datapath::BypassMaps;

use super::*;

pub fn run(report: &mut Report) {
    println!("== bypass source intermediary per packet (BPF_PROG_TEST_RUN)");
    let doc = "[[vips]]\naddress=\"198.18.10.1\"\nport=80\nprotocol=\"tcp\"\nbypass={ after_packets = 1 }\n\
               backends=[{ address = \"198.18.0.11\" }, { address = \"198.18.0.12\" }, { address = \"198.18.0.13\" }]\n";
    let mut f = Fixture::new(doc);
    f.apply_full(
        "bypass_source = true\n[bypass]\nkey_file = \"/etc/lb/bypass-keys.toml\"\nlisten = \"127.0.0.1:7470\"",
        doc,
    );
    f.load_source();
    let mut maps = BypassMaps::new(&mut f.ebpf).expect("bypass maps");
    let key = flow_key(IpAddr::V4(CLIENT), IpAddr::V4(V4_VIP), 40000, 80, PROTO_TCP);
    let mut shim = Shim::load();
    let floor_frame = pad(v4_tcp(V4_VIP, TCP_ACK));
    let data = pad(v4_tcp(V4_VIP, TCP_ACK));
    for (label, name, entry, expected, counted) in [
        (
            "direct",
            "packet with a bypass entry, straight to the backend",
            true,
            XDP_TX,
            Outcome::Forwarded,
        ),
        (
            "to_lb",
            "packet without an entry, recorded and passed toward the LB",
            false,
            XDP_PASS,
            Outcome::PassNotVip,
        ),
    ] {
        if entry {
            maps.set(&key, f.backend_id("198.18.0.12")).expect("entry");
            // Sent toward the LB "in the future": no refresh falls due while
            // the direct path is timed (one packet per flow every 2 s in use).
            maps.set_sent(&key, u64::MAX).expect("sent");
        } else {
            maps.remove(&key).expect("entry removed");
        }
        shim.target(Some((&f.ebpf, "lb_source")));
        shim.frame(data, None);
        shim.run(&data, 1000);
        let before = outcome(&f, counted);
        let (mut samples, mut ratios) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            shim.target(None);
            shim.frame(floor_frame, None);
            let (floor_ns, verdict) = shim.run(&floor_frame, REPEAT);
            assert_eq!(verdict, XDP_TX, "floor: unexpected verdict");
            shim.target(Some((&f.ebpf, "lb_source")));
            shim.frame(data, None);
            let (t, verdict) = shim.run(&data, REPEAT);
            assert_eq!(verdict, expected, "{name}: unexpected verdict");
            samples.push(t);
            ratios.push(t / floor_ns);
        }
        assert_eq!(
            outcome(&f, counted) - before,
            u64::from(REPEAT) * ROUNDS as u64,
            "{name}: not every run took that path"
        );
        let (ns, ratio) = (median(samples), median(ratios));
        report.row(
            "bypass",
            name,
            format!("{ns:.1} ns"),
            format!("{ratio:.2}× floor"),
            "",
            None,
        );
        report.json.insert(format!("bypass.{label}.ns"), json!(ns));
        report
            .json
            .insert(format!("bypass.{label}.ratio_to_floor"), json!(ratio));
    }
}
