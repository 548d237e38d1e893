//! Reference points for `cargo xtask bench`: what BPF_PROG_TEST_RUN costs
//! with no work at all, and what one kernel LPM-trie lookup costs, so that
//! filter-agent's numbers can be read against them.
#![no_std]
#![no_main]

mod runtime;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};

/// Sized and filled by the benchmark.
#[map]
static PREFIXES: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(1, 0);

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
