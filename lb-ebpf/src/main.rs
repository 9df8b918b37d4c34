//! XDP programs of the load balancer.
//!
//! Layout (one module per stage of the packet path):
//! - `maps`: every BPF map, what it is keyed by and who writes it.
//! - `headers`: wire header layouts and the bounds-checked `ptr_at` accessor.
//! - `counters`: per-CPU counters, updated in one place per packet.
//! - `flows`: the connection table, an array the datapath indexes itself.
//! - `balance`: VIP lookup, connection table and Maglev backend choice.
//! - `encap`: IPIP / IPv6 encapsulation toward a backend and the send decision.
//! - `forward`: `Verdict`, and sending a packet to its flow's backend.
//! - `icmp`: ICMP "fragmentation needed" / ICMPv6 "packet too big" about VIP flows.
//! - `mtu`: packets too big for the backend's link: SYN MSS clamping, ICMP
//!   "too big" answers to clients (rate-limited), drops.
//! - `second_chance`: the previous table's backend for flows the connection
//!   table does not know, carried in the outer header; `lb_decap` sends
//!   packets no local socket owns on to it.
//! - `trace`: connection and traffic tracers, flow events.
//! - `datapath_log`: aya-log records of packets dropped or passed, when the
//!   agent runs with `--datapath-log` (removed by the verifier otherwise).
//! - `bypass`: the `lb_source` entry point, the source intermediary of a
//!   client host (flows sent straight to their backend on instruction,
//!   others recorded and passed to the LB; the rest as `lb_ingress`).
//! - `bypass_dest`: in `lb_decap`, the destination intermediary: flows of
//!   bypass VIPs from clients behind an intermediary, reported to the agent.
//! - `ingress`: the `lb_ingress` entry point (parse, balance, encapsulate, send).
//! - `decap`: the `lb_decap` entry point for backend hosts.
#![no_std]
#![no_main]
// Word loads and stores at 2-aligned packet offsets (`headers::addr6_words`).
#![feature(asm_experimental_arch)]
// BPF atomics (`flows`): the target has no atomic read-modify-write types.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod balance;
mod bypass;
mod bypass_dest;
mod counters;
mod datapath_log;
mod decap;
mod encap;
mod flows;
mod forward;
mod headers;
mod icmp;
mod ingress;
mod maps;
mod mtu;
mod second_chance;
mod trace;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
