//! Sampled events to the agent: drops, and packets the guard flags. Only
//! those paths pay for them, and a per-CPU budget bounds them. Once a
//! second's budget is spent, a drop costs a counter, not a clock read.

use aya_ebpf::{
    Global,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use filter_common::{Event, EventBudget, event};

use crate::{guard, parse::Packet};

const SECOND_NS: u64 = 1_000_000_000;

/// Events per second and CPU; 0 turns them off. Set by the agent.
#[unsafe(no_mangle)]
static EVENT_RATE: Global<u32> = Global::new(event::DEFAULT_RATE);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(event::RING_BYTES, 0);
#[map]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

/// Sends an event about `packet` (if parsed; `end` is the end of packet
/// memory) unless this CPU's budget for the current second is spent.
#[inline(always)]
pub fn emit(packet: Option<&Packet>, end: usize, slot: u32, verdict: u8, guard_kind: u8, len: u64) {
    let rate = EVENT_RATE.load() as u64;
    if rate == 0 || !take_budget(rate) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        return;
    };
    let mut ev = Event {
        src: [0; 16],
        dst: [0; 16],
        slot,
        len: len as u32,
        sport: 0,
        dport: 0,
        proto: 0,
        verdict,
        guard: guard_kind,
        tcp_flags: 0,
    };
    if let Some(packet) = packet {
        // SAFETY: a parsed packet's addresses were bounds-checked.
        unsafe {
            ev.src = guard::address(packet, 0, end);
            ev.dst = guard::address(packet, 1, end);
        }
        ev.sport = packet.sport;
        ev.dport = packet.dport;
        ev.proto = packet.proto;
        ev.tcp_flags = packet.tcp_flags;
    }
    entry.write(ev);
    entry.submit(0);
}

/// Once a second's budget is spent, the clock is read only every this many
/// refused events: a flood of drops then costs a counter per packet, and a
/// new second is noticed at most this many packets late.
const CLOCK_EVERY: u64 = 16;

#[inline(always)]
fn take_budget(rate: u64) -> bool {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; the program is not preempted by itself.
    unsafe {
        let asked = (*budget).asked;
        (*budget).asked = asked + 1;
        if asked < rate {
            if (*budget).window_start_ns == 0 {
                (*budget).window_start_ns = bpf_ktime_get_ns();
            }
            return true;
        }
        if (asked - rate) % CLOCK_EVERY != CLOCK_EVERY - 1 {
            return false;
        }
        let now = bpf_ktime_get_ns();
        if now - (*budget).window_start_ns < SECOND_NS {
            return false;
        }
        (*budget).window_start_ns = now;
        (*budget).asked = 1;
    }
    true
}
