//! Datapath logs (`lb-agent --datapath-log`): one aya-log record per packet
//! a program drops or passes, with its outcome and the frame's addresses,
//! protocol and ports, for debugging on a live host.
//!
//! Off, they cost nothing per packet: `DATAPATH_LOG` is a `.rodata` constant
//! the agent sets at load, so the verifier knows the branch below it is never
//! taken and removes it with the logging code behind it (`cargo xtask bench
//! datapath` shows the instruction counts). On, each record is written by a
//! call of its own, whose stack is not added to the entry point's.
use aya_ebpf::{programs::XdpContext, Global};
use aya_log_ebpf::info;
use lb_common::{DecapOutcome, Outcome, PROTO_TCP, PROTO_UDP};

use crate::headers::{
    ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Ports, ETH_LEN, ETH_P_IPV4, ETH_P_IPV6, IPV6_LEN,
};

/// Non-zero when the agent runs with `--datapath-log`; set at load.
#[unsafe(no_mangle)]
static DATAPATH_LOG: Global<u8> = Global::new(0);

/// The records' target, which the agent forwards to its own logs.
const TARGET: &str = "lb_datapath";

#[inline(always)]
fn enabled() -> bool {
    DATAPATH_LOG.load() != 0
}

/// A verdict and its outcome in one scalar: what a call returns.
#[inline(always)]
pub fn pack(action: u32, outcome: u32) -> u32 {
    action | (outcome << 8)
}

/// The action of a `pack`ed verdict, after recording it if the logs are
/// on. Called by the entry points after the packet's pipeline, which runs
/// as a call of its own: the record's stack and the pipeline's are then not
/// added up (512 bytes at most for a chain of calls).
#[inline(always)]
pub fn exit(ctx: &XdpContext, program: u32, verdict: u32) -> u32 {
    let action = verdict & 0xff;
    if enabled() {
        let outcome = verdict >> 8;
        let kept = if program == PROGRAM_DECAP {
            outcome == DecapOutcome::Decapsulated as u32
                || outcome == DecapOutcome::SecondChance as u32
        } else {
            outcome == Outcome::Forwarded as u32
                || outcome == Outcome::Redirected as u32
                || outcome == Outcome::IcmpForwarded as u32
        };
        if !kept {
            record(ctx, program, action, outcome);
        }
    }
    action
}

/// `pack`, for a program whose pipeline is not a call of its own
/// (`lb_source`, whose frame is small).
#[inline(always)]
pub fn ingress(ctx: &XdpContext, program: u32, action: u32, outcome: Outcome) -> u32 {
    exit(ctx, program, pack(action, outcome as u32))
}

/// Program numbers in the records (the agent names them).
pub const PROGRAM_INGRESS: u32 = 0;
pub const PROGRAM_DECAP: u32 = 1;
pub const PROGRAM_SOURCE: u32 = 2;

/// The transport ports at `l4`, if the protocol has them and they fit.
#[inline(always)]
fn ports(ctx: &XdpContext, proto: u8, l4: usize) -> (u16, u16) {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return (0, 0);
    }
    match ptr_at::<Ports>(ctx, l4) {
        // SAFETY: ptr_at checked bounds.
        Some(p) => unsafe { (u16::from_be((*p).src), u16::from_be((*p).dst)) },
        None => (0, 0),
    }
}

/// Writes one record about the frame as the program leaves it. The message
/// is `key=value` pairs, which the agent turns into fields.
#[inline(never)]
fn record(ctx: &XdpContext, program: u32, action: u32, outcome: u32) {
    // Opaque to LLVM, which would otherwise pass `data` and `data_end` as
    // 32-bit arguments instead of the context, and the verifier refuses
    // the zero extension of `data_end` that the callee then does.
    let ctx = core::hint::black_box(ctx);
    let ether_type = match ptr_at::<EthHdr>(ctx, 0) {
        // SAFETY: ptr_at checked bounds.
        Some(eth) => u16::from_be(unsafe { (*eth).ether_type }),
        None => 0,
    };
    if ether_type == ETH_P_IPV4 {
        if let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) {
            // SAFETY: ptr_at checked bounds; fields read one by one, so
            // that the header is not copied to the stack.
            let (version_ihl, proto, src, dst) =
                unsafe { ((*ip).version_ihl, (*ip).proto, (*ip).src, (*ip).dst) };
            let l4 = ETH_LEN + ((((version_ihl & 0x0f) as usize) * 4) & 0x3c);
            let (sport, dport) = ports(ctx, proto, l4);
            info!(
                ctx,
                target: TARGET,
                "program={} outcome={} action={} proto={} src={:i}:{} dst={:i}:{}",
                program,
                outcome,
                action,
                proto,
                src,
                sport,
                dst,
                dport
            );
            return;
        }
    } else if ether_type == ETH_P_IPV6 {
        if let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN) {
            // SAFETY: as above.
            let (proto, src, dst) = unsafe { ((*ip).next_hdr, (*ip).src, (*ip).dst) };
            let (sport, dport) = ports(ctx, proto, ETH_LEN + IPV6_LEN);
            info!(
                ctx,
                target: TARGET,
                "program={} outcome={} action={} proto={} src=[{:i}]:{} dst=[{:i}]:{}",
                program,
                outcome,
                action,
                proto,
                src,
                sport,
                dst,
                dport
            );
            return;
        }
    }
    info!(
        ctx,
        target: TARGET,
        "program={} outcome={} action={} ether_type={:x}",
        program,
        outcome,
        action,
        ether_type
    );
}
