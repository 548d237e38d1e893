//! Reference points for `cargo xtask bench`: what BPF_PROG_TEST_RUN costs
//! with no work at all, and what one kernel LPM-trie lookup costs, so that
//! filter-agent's numbers can be read against them; and the live
//! benchmark's packet sender.
#![no_std]
#![no_main]

mod runtime;
mod trie;

use aya_ebpf::{
    Global,
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use filter_common::{EntryBlock, NodeBlock, V6_ROOT, sender::FRAME_BYTES};

// The same prefixes in a kernel LPM trie per family and in filter-agent's
// trie; sized and filled by the benchmark.
#[map]
static PREFIXES: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(1, 0);
#[map]
static PREFIXES6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(1, 0);
/// The class of listed addresses in `TRIE_*`; set by the benchmark.
#[unsafe(no_mangle)]
static LISTED_CLASS: Global<u32> = Global::new(0);
#[map]
static TRIE_ENTRIES: Array<EntryBlock> = Array::with_max_entries(1, 0);
#[map]
static TRIE_NODES: Array<NodeBlock> = Array::with_max_entries(1, 0);

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

/// Where an untagged frame's IPv4 and IPv6 source address starts.
const SOURCE_V4: usize = 14 + 12;
const SOURCE_V6: usize = 14 + 8;

/// The source address of an untagged frame (`LEN` bytes at `offset`).
#[inline(always)]
fn source<const LEN: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; LEN]> {
    if ctx.data() + offset + LEN > ctx.data_end() {
        return None;
    }
    Some(unsafe { *((ctx.data() + offset) as *const [u8; LEN]) })
}

/// Drops what the lookup found (a listed source).
#[inline(always)]
fn verdict(listed: bool) -> u32 {
    if listed {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// The IPv4 source address looked up in `PREFIXES`.
#[xdp]
pub fn lpm(ctx: XdpContext) -> u32 {
    let Some(addr) = source::<4>(&ctx, SOURCE_V4) else {
        return xdp_action::XDP_PASS;
    };
    verdict(PREFIXES.get(Key::new(32, addr)).is_some())
}

#[xdp]
pub fn lpm6(ctx: XdpContext) -> u32 {
    let Some(addr) = source::<16>(&ctx, SOURCE_V6) else {
        return xdp_action::XDP_PASS;
    };
    verdict(PREFIXES6.get(Key::new(128, addr)).is_some())
}

/// The IPv4 source address looked up in filter-agent's trie, as the
/// filter looks it up.
#[xdp]
pub fn trie4(ctx: XdpContext) -> u32 {
    let Some(addr) = source::<4>(&ctx, SOURCE_V4) else {
        return xdp_action::XDP_PASS;
    };
    let class = trie::class::<4>(&TRIE_ENTRIES, &TRIE_NODES, 0, addr.as_ptr());
    verdict(class.unwrap_or(u32::MAX) == LISTED_CLASS.load())
}

#[xdp]
pub fn trie6(ctx: XdpContext) -> u32 {
    let Some(addr) = source::<16>(&ctx, SOURCE_V6) else {
        return xdp_action::XDP_PASS;
    };
    let class = trie::class::<16>(&TRIE_ENTRIES, &TRIE_NODES, V6_ROOT, addr.as_ptr());
    verdict(class.unwrap_or(u32::MAX) == LISTED_CLASS.load())
}
