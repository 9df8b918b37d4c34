//! Benchmark support for `BPF_PROG_TEST_RUN` with a high repeat count.
//!
//! The kernel reruns a program on the same buffer without resetting it, so an
//! encapsulating program would see its own output from the second run on.
//! `bench_shim` restores the original frame before every run (and, for
//! new-flow cases, writes a fresh source port and address), then tail-calls the
//! program under test. `bench_floor` is the baseline: swap MACs, `XDP_TX`.
//! With `bench_send` in the tail-call slot and live frames, the shim is also
//! the traffic generator for the live forwarding benchmark.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};

/// Every benchmark frame is padded to this size, so restoring it is one
/// constant-size copy.
pub const FRAME_LEN: usize = 128;

#[repr(C)]
pub struct BenchFrame {
    /// Offset of the 2-byte source port to vary per run, or 0 for none.
    pub port_off: u32,
    /// Offset of the last 2 bytes of the source address to vary, or 0.
    pub addr_off: u32,
    pub data: [u8; FRAME_LEN],
}

/// The frame to restore, index 0. Written by the benchmark.
#[map]
static BENCH_FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);

/// The program under test, index 0. Written by the benchmark.
#[map]
static BENCH_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Runs so far on this CPU (source of the varying port and address).
#[map]
static BENCH_RUNS: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn bench_shim(ctx: XdpContext) -> u32 {
    let Some(frame) = BENCH_FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // The programs measured only add or remove bytes at the head.
    let delta = (ctx.data_end() - ctx.data()) as i32 - FRAME_LEN as i32;
    // SAFETY: helpers on the context we were given; bounds are the kernel's.
    unsafe {
        if delta != 0 && bpf_xdp_adjust_head(ctx.ctx, delta) != 0 {
            return xdp_action::XDP_ABORTED;
        }
        let src = frame.data.as_ptr() as *mut core::ffi::c_void;
        if bpf_xdp_store_bytes(ctx.ctx, 0, src, FRAME_LEN as u32) != 0 {
            return xdp_action::XDP_ABORTED;
        }
        if frame.port_off != 0 {
            if let Some(runs) = BENCH_RUNS.get_ptr_mut(0) {
                *runs = (*runs).wrapping_add(1);
                let n = *runs;
                let port = (n as u16).to_be_bytes();
                let addr = ((n >> 16) as u16).to_be_bytes();
                let port_off = frame.port_off & 0x7f;
                let addr_off = frame.addr_off & 0x7f;
                bpf_xdp_store_bytes(ctx.ctx, port_off, port.as_ptr() as *mut _, 2);
                bpf_xdp_store_bytes(ctx.ctx, addr_off, addr.as_ptr() as *mut _, 2);
            }
        }
        BENCH_PROGS.tail_call(&ctx, 0);
    }
    // Only reached when the tail call failed.
    xdp_action::XDP_ABORTED
}

#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: bounds checked above.
    unsafe {
        let p = start as *mut [u8; 6];
        let dst = *p;
        *p = *p.add(1);
        *p.add(1) = dst;
    }
    xdp_action::XDP_TX
}

/// The live-traffic generator's last step: send the frame the shim prepared
/// out of the interface `BPF_PROG_TEST_RUN` runs it on (live-frames mode).
#[xdp]
pub fn bench_send(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
