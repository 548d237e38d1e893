//! Reference points for `cargo xtask bench`: what BPF_PROG_TEST_RUN costs
//! with no work at all, and what one kernel LPM-trie lookup costs, so that
//! filter-agent's numbers can be read against them; and the live
//! benchmark's packet sender.
#![no_std]
#![no_main]

mod runtime;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use filter_common::sender::FRAME_BYTES;

/// Sized and filled by the benchmark.
#[map]
static PREFIXES: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(1, 0);

/// The frames `transmit` sends in turn; sized and filled by the benchmark.
#[map]
static FRAMES: Array<[u8; FRAME_BYTES]> = Array::with_max_entries(1, 0);

/// The index of the next frame in `FRAMES`, per CPU.
#[map]
static NEXT_FRAME: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The live benchmark's traffic generator: run with live frames
/// (BPF_PROG_TEST_RUN), it sends the next frame of `FRAMES` out of the
/// ingress interface, as xdp-trafficgen does. One call then sends the
/// whole mix (each call costs the kernel tens of ms of setup).
#[xdp]
pub fn transmit(ctx: XdpContext) -> u32 {
    let Some(next) = NEXT_FRAME.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a per-CPU slot, only touched by this CPU.
    let mut index = unsafe { *next };
    let frame = match FRAMES.get(index) {
        Some(frame) => frame,
        None => {
            index = 0;
            match FRAMES.get(0) {
                Some(frame) => frame,
                None => return xdp_action::XDP_ABORTED,
            }
        }
    };
    if ctx.data() + FRAME_BYTES > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: bounds checked above; the whole frame is overwritten, so
    // what the previous run left in the recycled page does not matter.
    unsafe {
        *(ctx.data() as *mut [u8; FRAME_BYTES]) = *frame;
        *next = index + 1;
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The IPv4 source address of an untagged frame, looked up in `PREFIXES`.
#[xdp]
pub fn lpm(ctx: XdpContext) -> u32 {
    const SOURCE: usize = 14 + 12;
    if ctx.data() + SOURCE + 4 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let source = unsafe { *((ctx.data() + SOURCE) as *const [u8; 4]) };
    match PREFIXES.get(Key::new(32, source)) {
        Some(_) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_PASS,
    }
}
