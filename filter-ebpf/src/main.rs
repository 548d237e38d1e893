//! The filter-agent XDP program.
//!
//! Parses Ethernet, up to two VLAN tags, IPv4 (with options) and IPv6 (with a
//! bounded walk over extension headers) and reaches one verdict per packet.
//! Every verdict leaves through [`finish`], which records why it was reached.
#![no_std]
#![no_main]

mod guard;
mod parse;
mod rules;
mod runtime;

use aya_ebpf::{
    Global,
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::error;
use filter_common::{Counter, DECISION_RULE, action, fragments, mode, reason};

use crate::parse::{Frame, parse};

/// Action for IP packets that match no rule; set by the agent at load time.
#[unsafe(no_mangle)]
static DEFAULT_ACTION: Global<u32> = Global::new(action::ALLOW);

/// `mode::ENFORCE` or `mode::MONITOR`; set by the agent at load time.
#[unsafe(no_mangle)]
static MODE: Global<u32> = Global::new(mode::ENFORCE);

/// `fragments::*`: non-first fragments; set by the agent at load time.
#[unsafe(no_mangle)]
static FRAGMENTS: Global<u32> = Global::new(fragments::MATCH_L3);

/// Non-zero only in instances loaded for `filter-agent test`/`replay`: the
/// verifier sees the frozen value and drops the tracing code otherwise.
#[unsafe(no_mangle)]
static TRACE: Global<u32> = Global::new(0);

/// The last verdict's slot, when tracing (see `filter_common::DECISION_RULE`).
#[map]
static LAST_DECISION: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU packet/byte counters, indexed by `filter_common::reason`.
#[map]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Per-CPU packet/byte counters per rule (sized by the agent).
#[map]
static RULE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(1, 0);

/// `action::*` per rule (sized by the agent).
#[map]
static RULE_ACTIONS: Array<u32> = Array::with_max_entries(1, 0);

/// Which counter a verdict is recorded in.
enum Slot {
    Reason(u32),
    Rule(u32),
}

#[xdp]
pub fn filter(ctx: XdpContext) -> u32 {
    let (slot, act) = classify(&ctx);
    finish(&ctx, slot, act)
}

/// The guard's egress half (TC): counts outbound connection attempts from
/// ports outside the ephemeral range. Never drops; `TC_ACT_UNSPEC` lets
/// the next program on the interface decide.
#[classifier]
pub fn guard_egress(ctx: TcContext) -> i32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if let Ok(Frame::Ip(packet)) = parse(data, end) {
        guard::inspect_outbound(&packet, ctx.len() as u64);
    }
    TC_ACT_UNSPEC
}

/// Returns the counter slot and the action for this packet.
#[inline(always)]
fn classify(ctx: &XdpContext) -> (Slot, u32) {
    let (data, end) = (ctx.data(), ctx.data_end());
    let packet = match parse(data, end) {
        Err(_) => return (Slot::Reason(reason::MALFORMED), action::DENY),
        Ok(Frame::NonIp) => return (Slot::Reason(reason::NON_IP), action::ALLOW),
        Ok(Frame::Ip(packet)) => packet,
    };
    if guard::inspect_inbound(&packet, (end - data) as u64) {
        return (Slot::Reason(reason::GUARD_DROP), action::DENY);
    }
    if packet.fragment {
        match FRAGMENTS.load() {
            fragments::ALLOW => return (Slot::Reason(reason::FRAGMENT_ALLOW), action::ALLOW),
            fragments::DENY => return (Slot::Reason(reason::FRAGMENT_DENY), action::DENY),
            _ => {}
        }
    }
    if let Some(rule) = rules::first_match(&packet)
        && let Some(act) = RULE_ACTIONS.get(rule)
    {
        return (Slot::Rule(rule), *act);
    }
    let act = DEFAULT_ACTION.load();
    if act == action::DENY {
        (Slot::Reason(reason::DEFAULT_DENY), act)
    } else {
        (Slot::Reason(reason::DEFAULT_ALLOW), act)
    }
}

/// The single exit: counts the packet in its slot and turns `act` into an
/// XDP verdict (monitor mode never drops).
#[inline(always)]
fn finish(ctx: &XdpContext, slot: Slot, act: u32) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (counter, decision) = match slot {
        Slot::Reason(why) => (STATS.get_ptr_mut(why), why),
        Slot::Rule(rule) => (RULE_STATS.get_ptr_mut(rule), DECISION_RULE | rule),
    };
    if TRACE.load() != 0
        && let Some(last) = LAST_DECISION.get_ptr_mut(0)
    {
        unsafe { *last = decision };
    }
    match counter {
        Some(counter) => unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len;
        },
        // Cannot happen: every slot index is in range. Logged, not silently
        // ignored, because it would mean the counters lie.
        None => error!(ctx, "no counter slot for a verdict"),
    }
    if act == action::DENY && MODE.load() == mode::ENFORCE {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}
