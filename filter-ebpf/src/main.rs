//! The filter-agent XDP program.
//!
//! Parses Ethernet, up to two VLAN tags, IPv4 (with options) and IPv6 (with a
//! bounded walk over extension headers) and reaches one verdict per packet.
//! Every verdict leaves through [`finish`], which records why it was reached.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no compare-and-swap, so `AtomicU64`
// lacks `fetch_add` there.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod events;
mod guard;
mod limit;
mod parse;
mod rules;
mod runtime;
mod trie;

use aya_ebpf::{
    Global,
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::error;
use filter_common::{Counter, action, event, fragments, mode, over_limit_slot, reason, rule_slot};

use crate::{
    guard::Inbound,
    parse::{Frame, Malformed, Packet, parse},
};

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
pub(crate) static TRACE: Global<u32> = Global::new(0);

/// The last verdict's slot, when tracing (see `filter_common::Outcome`).
#[map]
static LAST_DECISION: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU packet/byte counters, indexed by `filter_common::reason`.
#[map]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Per-CPU packet/byte counters per rule (sized by the agent).
#[map]
static RULE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counters per rule of the packets its rate limit dropped.
#[map]
static RULE_OVER_LIMIT: PerCpuArray<Counter> = PerCpuArray::with_max_entries(1, 0);

/// `action::*` per rule, with its limit slot (sized by the agent).
#[map]
static RULE_ACTIONS: Array<u32> = Array::with_max_entries(1, 0);

/// Which counter a verdict is recorded in.
enum Slot {
    Reason(u32),
    Rule(u32),
    OverLimit(u32),
}

/// What `classify` decided.
struct Verdict {
    slot: Slot,
    action: u32,
    /// `event::GUARD_NONE` or `event::GUARD_RETURN`.
    guard: u8,
}

#[xdp]
pub fn filter(ctx: XdpContext) -> u32 {
    let frame = parse(ctx.data(), ctx.data_end());
    let verdict = classify(&ctx, &frame);
    let packet = match &frame {
        Ok(Frame::Ip(packet)) => Some(packet),
        _ => None,
    };
    finish(&ctx, verdict, packet)
}

/// The frame's length: what byte counters add.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// The guard's egress half (TC): counts outbound connection attempts from
/// ports outside the ephemeral range. Never drops; `TC_ACT_UNSPEC` lets
/// the next program on the interface decide.
#[classifier]
pub fn guard_egress(ctx: TcContext) -> i32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if let Ok(Frame::Ip(packet)) = parse(data, end) {
        let len = ctx.len() as u64;
        if guard::inspect_outbound(&packet, end, len) {
            let kind = event::GUARD_OUTBOUND;
            events::emit(Some(&packet), end, event::NO_SLOT, event::PASS, kind, len);
        }
    }
    TC_ACT_UNSPEC
}

/// Decides what happens to this packet and where it is counted.
#[inline(always)]
fn classify(ctx: &XdpContext, frame: &Result<Frame, Malformed>) -> Verdict {
    let decided = |slot, action| Verdict {
        slot,
        action,
        guard: event::GUARD_NONE,
    };
    let packet = match frame {
        Err(_) => return decided(Slot::Reason(reason::MALFORMED), action::DENY),
        Ok(Frame::NonIp) => return decided(Slot::Reason(reason::NON_IP), action::ALLOW),
        Ok(Frame::Ip(packet)) => packet,
    };
    let guarded = guard::inspect_inbound(packet, ctx.data_end(), frame_len(ctx));
    let guard = match guarded {
        Inbound::OutOfRange { reported: true } | Inbound::Drop { reported: true } => {
            event::GUARD_RETURN
        }
        _ => event::GUARD_NONE,
    };
    let (slot, action) = if let Inbound::Drop { .. } = guarded {
        (Slot::Reason(reason::GUARD_DROP), action::DENY)
    } else {
        decide(packet, ctx.data_end())
    };
    Verdict {
        slot,
        action,
        guard,
    }
}

/// Fragments policy, then the rules (and a matching rule's rate limit),
/// then the default. `end` is the end of packet memory.
#[inline(always)]
fn decide(packet: &Packet, end: usize) -> (Slot, u32) {
    if packet.fragment {
        match FRAGMENTS.load() {
            fragments::ALLOW => return (Slot::Reason(reason::FRAGMENT_ALLOW), action::ALLOW),
            fragments::DENY => return (Slot::Reason(reason::FRAGMENT_DENY), action::DENY),
            _ => {}
        }
    }
    if let Some(rule) = rules::first_match(packet)
        && let Some(&entry) = RULE_ACTIONS.get(rule)
    {
        let limit = entry >> action::LIMIT_SHIFT;
        if limit != 0 && !limit::admit(limit, packet, end) {
            return (Slot::OverLimit(rule), action::DENY);
        }
        return (Slot::Rule(rule), entry & action::MASK);
    }
    let act = DEFAULT_ACTION.load();
    if act == action::DENY {
        (Slot::Reason(reason::DEFAULT_DENY), act)
    } else {
        (Slot::Reason(reason::DEFAULT_ALLOW), act)
    }
}

/// The single exit: counts the packet in its slot, reports drops and
/// guard findings as events, and turns the action into an XDP verdict
/// (monitor mode never drops).
#[inline(always)]
fn finish(ctx: &XdpContext, verdict: Verdict, packet: Option<&Packet>) -> u32 {
    let len = frame_len(ctx);
    let (counter, decision) = match verdict.slot {
        Slot::Reason(why) => (STATS.get_ptr_mut(why), why),
        Slot::Rule(rule) => (RULE_STATS.get_ptr_mut(rule), rule_slot(rule)),
        Slot::OverLimit(rule) => (RULE_OVER_LIMIT.get_ptr_mut(rule), over_limit_slot(rule)),
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
    let denied = verdict.action == action::DENY;
    // The mode is read only for denied packets.
    let drop = denied && MODE.load() == mode::ENFORCE;
    if denied || verdict.guard != event::GUARD_NONE {
        let kind = if drop {
            event::DROP
        } else if denied {
            event::WOULD_DROP
        } else {
            event::PASS
        };
        events::emit(packet, ctx.data_end(), decision, kind, verdict.guard, len);
    }
    if drop {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}
