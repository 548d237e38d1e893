//! The filter-agent XDP program.
//!
//! Parses Ethernet, up to two VLAN tags, IPv4 (with options) and IPv6 (with a
//! bounded walk over extension headers) and reaches one verdict per packet.
//! Every verdict leaves through [`finish`], which records why it was reached.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    Global,
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use aya_log_ebpf::error;
use filter_common::{Counter, action, mode, reason};

use crate::parse::{Frame, parse};

/// Action for IP packets that match no rule; set by the agent at load time.
#[unsafe(no_mangle)]
static DEFAULT_ACTION: Global<u32> = Global::new(action::ALLOW);

/// `mode::ENFORCE` or `mode::MONITOR`; set by the agent at load time.
#[unsafe(no_mangle)]
static MODE: Global<u32> = Global::new(mode::ENFORCE);

/// Per-CPU packet/byte counters, indexed by `filter_common::reason`.
#[map]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(reason::COUNT, 0);

#[xdp]
pub fn filter(ctx: XdpContext) -> u32 {
    let (why, act) = classify(&ctx);
    finish(&ctx, why, act)
}

/// Returns the reason and action for this packet.
#[inline(always)]
fn classify(ctx: &XdpContext) -> (u32, u32) {
    match parse(ctx) {
        Err(_) => (reason::MALFORMED, action::DENY),
        Ok(Frame::NonIp) => (reason::NON_IP, action::ALLOW),
        Ok(Frame::Ip(_)) => {
            let act = DEFAULT_ACTION.load();
            if act == action::DENY {
                (reason::DEFAULT_DENY, act)
            } else {
                (reason::DEFAULT_ALLOW, act)
            }
        }
    }
}

/// The single exit: counts the packet under `why` and turns `act` into an
/// XDP verdict (monitor mode never drops).
#[inline(always)]
fn finish(ctx: &XdpContext, why: u32, act: u32) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    match STATS.get_ptr_mut(why) {
        Some(counter) => unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len;
        },
        // Cannot happen: `why` is always below `reason::COUNT`. Logged, not
        // silently ignored, because it would mean the counters lie.
        None => error!(ctx, "no STATS slot for reason {}", why),
    }
    if act == action::DENY && MODE.load() == mode::ENFORCE {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
