//! `lb-agent --datapath-log`: the programs' aya-log records (why a packet
//! was dropped or passed, see `lb-ebpf/src/datapath_log.rs`), read from
//! their ring buffer and written to the agent's logs under the target
//! `lb_datapath`, with the program, outcome, action, protocol and addresses
//! as fields (so `--log-format json` carries them as keys).
use anyhow::{Context as _, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;
use lb_common::{DecapOutcome, Outcome};
use tokio::{
    io::{unix::AsyncFd, Interest},
    task::JoinHandle,
};
use tracing::{info, warn};

/// Starts forwarding the records of the loaded object's programs.
pub(super) fn forward(ebpf: &mut Ebpf) -> Result<JoinHandle<()>> {
    let logger = EbpfLogger::init_with_logger(ebpf, Forwarder).context(
        "the eBPF object has no datapath log ring (AYA_LOGS): run without --datapath-log, or load a build that has it",
    )?;
    // SAFETY: the logger owns the ring buffer's descriptor, which stays the
    // same for as long as the AsyncFd owns the logger.
    let mut ring = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the datapath log ring: {e}"))?;
    info!("datapath logs on: every packet dropped or passed is logged (target lb_datapath)");
    Ok(tokio::spawn(async move {
        loop {
            let mut ready = match ring.readable_mut().await {
                Ok(r) => r,
                Err(e) => {
                    warn!("datapath logs stopped: {e}");
                    return;
                }
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    }))
}

/// One record, as the programs write it: `key=value` pairs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Record {
    program: &'static str,
    outcome: &'static str,
    action: &'static str,
    proto: String,
    src: String,
    dst: String,
    ether_type: String,
}

const PROGRAMS: [&str; 3] = ["lb_ingress", "lb_decap", "lb_source"];
const ACTIONS: [&str; 5] = ["aborted", "drop", "pass", "tx", "redirect"];

fn outcome_name(program: &str, n: usize) -> Option<&'static str> {
    if program == "lb_decap" {
        DecapOutcome::ALL.get(n).map(|o| o.name())
    } else {
        Outcome::ALL.get(n).map(|o| o.name())
    }
}

/// Reads a record's message; `None` for one of another shape (an object
/// whose records this agent does not know).
fn parse(message: &str) -> Option<Record> {
    let mut r = Record::default();
    let mut outcome = None;
    for pair in message.split_whitespace() {
        let (key, value) = pair.split_once('=')?;
        match key {
            "program" => r.program = PROGRAMS.get(value.parse::<usize>().ok()?)?,
            "outcome" => outcome = Some(value.parse::<usize>().ok()?),
            "action" => r.action = ACTIONS.get(value.parse::<usize>().ok()?)?,
            "proto" => r.proto = value.to_string(),
            "src" => r.src = value.to_string(),
            "dst" => r.dst = value.to_string(),
            "ether_type" => r.ether_type = format!("0x{value}"),
            _ => return None,
        }
    }
    if r.program.is_empty() || r.action.is_empty() {
        return None;
    }
    r.outcome = outcome_name(r.program, outcome?)?;
    Some(r)
}

/// The `log::Log` aya-log writes to: each record becomes a `tracing` event.
struct Forwarder;

impl log::Log for Forwarder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        let Some(r) = parse(&message) else {
            warn!(target: "lb_datapath", record = message, "datapath log record of an unknown shape");
            return;
        };
        if r.ether_type.is_empty() {
            info!(
                target: "lb_datapath",
                program = r.program,
                outcome = r.outcome,
                action = r.action,
                proto = r.proto,
                src = r.src,
                dst = r.dst,
                "{} {}: {}",
                r.program,
                r.action,
                r.outcome
            );
        } else {
            info!(
                target: "lb_datapath",
                program = r.program,
                outcome = r.outcome,
                action = r.action,
                ether_type = r.ether_type,
                "{} {}: {}",
                r.program,
                r.action,
                r.outcome
            );
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_named_fields() {
        let r =
            parse("program=0 outcome=4 action=2 proto=17 src=198.18.0.1:5000 dst=198.18.0.10:4242")
                .expect("a record");
        assert_eq!(
            r,
            Record {
                program: "lb_ingress",
                outcome: "passed_not_vip",
                action: "pass",
                proto: "17".into(),
                src: "198.18.0.1:5000".into(),
                dst: "198.18.0.10:4242".into(),
                ether_type: String::new(),
            }
        );
        let r = parse("program=1 outcome=2 action=1 proto=4 src=[fd00::1]:0 dst=[fd00::2]:0")
            .expect("a record");
        assert_eq!(
            (r.program, r.outcome, r.action),
            ("lb_decap", "dropped_malformed", "drop")
        );
        let r = parse("program=0 outcome=3 action=2 ether_type=806").expect("a record");
        assert_eq!(
            (r.outcome, r.ether_type.as_str()),
            ("passed_not_ip", "0x806")
        );
    }

    #[test]
    fn records_of_another_shape_are_refused() {
        for bad in [
            "",
            "hello",
            "program=9 outcome=0 action=1",
            "program=0 outcome=99 action=1",
            "program=0 outcome=4 action=7",
            "program=0 action=2",
            "program=0 outcome=4 action=2 colour=blue",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
