//! `lbctl report` as text, and `lbctl report --watch` redrawing it in place
//! on a terminal (the alternate screen, each frame written over the last in
//! one write, so nothing flickers); piped, each report follows the last.
use std::io::Write as _;

use lb_userspace::{
    api::{FlowRecord, FlowReport, Leg, Report},
    config::socket_text,
};

use crate::human_bytes;

/// `writeln!` into a `String`, which cannot fail.
macro_rules! put {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($out, $($arg)*);
    }};
}

/// `text` drawn over the previous frame: cursor home, each line cleared to
/// its end, the rest of the screen cleared.
pub(crate) fn frame(text: &str) -> String {
    let mut s = String::from("\x1b[H");
    for line in text.lines() {
        s.push_str(line);
        s.push_str("\x1b[K\n");
    }
    s.push_str("\x1b[J");
    s
}

/// The terminal's alternate screen while `--watch` redraws; the screen as it
/// was comes back when this is dropped (Ctrl-C, or an error).
pub(crate) struct Screen;

impl Screen {
    pub(crate) fn enter() -> Screen {
        // Alternate screen, cursor hidden.
        print!("\x1b[?1049h\x1b[?25l");
        Screen
    }

    pub(crate) fn draw(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(frame(text).as_bytes());
        let _ = out.flush();
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
    }
}

fn leg(l: &Leg) -> String {
    format!("{} packets {}", l.packets, human_bytes(l.bytes))
}

fn flow_report(out: &mut String, f: &FlowReport) {
    put!(
        out,
        "  new flows {:.1}/s ({})  active {}  half-open {}  closing {}  closed fin {} rst {}  expired {} (half-open {})",
        f.new_flows_per_s, f.new_flows, f.active, f.half_open, f.closing, f.closed_fin, f.closed_rst, f.expired, f.half_open_expired
    );
    put!(
        out,
        "  client→LB {}   LB→backend {}",
        leg(&f.client_to_lb),
        leg(&f.lb_to_backend)
    );
}

/// The flow table `lbctl flows` and the report print.
pub(crate) fn flows(out: &mut String, flows: &[FlowRecord]) {
    put!(
        out,
        "  {:<46} {:<5} {:<20} {:<10} {:<16} {:>8} {:>8} {:>10} {:>11}",
        "client → vip",
        "proto",
        "backend",
        "state",
        "flags",
        "age s",
        "idle s",
        "packets",
        "bytes in"
    );
    for f in flows {
        put!(
            out,
            "  {:<46} {:<5} {:<20} {:<10} {:<16} {:>8.1} {:>8.1} {:>10} {:>11}",
            format!("{} → {}", f.client, f.vip),
            f.protocol,
            f.backend
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            f.state,
            f.tcp_flags,
            f.age_s,
            f.idle_s,
            f.client_to_lb.packets,
            human_bytes(f.client_to_lb.bytes)
        );
    }
}

/// `lbctl report` as text.
pub(crate) fn render(r: &Report) -> String {
    let mut out = String::new();
    let out = &mut out;
    put!(
        out,
        "report over the last {:.1} s; {} flows in the connection table (collected {:.1} s ago)",
        r.window_s,
        r.flows_in_table,
        r.collected_ago_s
    );
    for v in &r.vips {
        out.push('\n');
        put!(
            out,
            "VIP {} {} {}",
            v.name,
            v.protocol,
            socket_text(v.address, v.port)
        );
        flow_report(out, &v.flows);
    }
    for b in &r.backends {
        out.push('\n');
        put!(out, "backend {}", b.address);
        flow_report(out, &b.flows);
        match &b.delivered {
            Some(d) => {
                let lost = b.sent_total.packets.saturating_sub(d.packets);
                put!(
                    out,
                    "  since start: sent {}   delivered {}   lost {} packets",
                    leg(&b.sent_total),
                    leg(d),
                    lost
                );
            }
            None => put!(
                out,
                "  since start: sent {}   delivered: unknown (see --decap-socket)",
                leg(&b.sent_total)
            ),
        }
    }
    if !r.top_flows.is_empty() {
        out.push('\n');
        put!(out, "largest flows:");
        flows(out, &r.top_flows);
    }
    if !r.bypassed_flows.is_empty() {
        out.push('\n');
        put!(
            out,
            "bypassed flows (sent straight to their backend by this host):"
        );
        for f in &r.bypassed_flows {
            let backend = f.backend.map_or("?".to_string(), |b| b.to_string());
            let idle = f.idle_s.map_or("-".to_string(), |s| format!("{s:.1} s"));
            put!(
                out,
                "  {} {} -> {} via {backend}: bypassed, straight {}, toward the LB {} packets, idle {idle}",
                f.protocol,
                f.client,
                f.vip,
                leg(&f.client_to_backend),
                f.client_to_lb_packets
            );
        }
    }
    out.push('\n');
    put!(
        out,
        "flow events: {} sent, {} dropped (ring buffer full), {} received",
        r.events.sent,
        r.events.dropped,
        r.events.received
    );
    for n in &r.notes {
        put!(out, "note: {n}");
    }
    std::mem::take(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_overwrites_the_previous_one_line_by_line() {
        let f = frame("report over 2 s\n\nVIP web\n");
        assert_eq!(
            f,
            "\x1b[Hreport over 2 s\x1b[K\n\x1b[K\nVIP web\x1b[K\n\x1b[J"
        );
    }
}
