//! Rate limits: a GCRA bucket per rule, or per source prefix in an LRU
//! table. A bucket is the time its next packet is due; every CPU updates
//! the same one with a plain store or one atomic add (`BPF_XADD`, on every
//! kernel from 5.10), so the limit holds across CPUs without a lock.
//!
//! Exact on one CPU; when two CPUs race for the same token, both may take
//! it (at most one extra packet per race), so the limit errs on letting a
//! packet through, never on dropping one it owed.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LruHashMap},
};
use filter_common::{RateLimit, SourceBucket};

use crate::{guard, parse::Packet};

/// The limits, indexed by the slot in a rule's `RULE_ACTIONS` entry (sized
/// by the agent; slot 0 is unused).
#[map]
static LIMITS: Array<RateLimit> = Array::with_max_entries(1, 0);
/// Per-source buckets of every per-source limit (sized by the agent).
#[map]
static SOURCE_BUCKETS: LruHashMap<SourceBucket, u64> = LruHashMap::with_max_entries(1, 0);
/// The time traced instances (`test`, `replay`) decide at, set before each
/// packet, so a capture replays at its own pace.
#[map]
static CLOCK: Array<u64> = Array::with_max_entries(1, 0);

/// True when the packet fits the limit in `slot`, and takes its token;
/// `end` is the end of packet memory (see [`guard::address`]).
#[inline(always)]
pub fn admit(slot: u32, packet: &Packet, end: usize) -> bool {
    let Some(limit) = LIMITS.get_ptr_mut(slot) else {
        return true;
    };
    let now = now();
    // SAFETY: a map value of this program. Other CPUs change `due_ns`
    // under us, so it is only reached through its pointer; the rest is
    // written by the agent before the program runs.
    let (interval, tolerance, per_source, mask) = unsafe {
        let mask = if packet.v6 {
            &(*limit).v6_mask
        } else {
            &(*limit).v4_mask
        };
        (
            (*limit).interval_ns,
            (*limit).tolerance_ns,
            (*limit).per_source,
            mask,
        )
    };
    if per_source == 0 {
        return take(
            unsafe { &raw mut (*limit).due_ns },
            now,
            interval,
            tolerance,
        );
    }
    let key = SourceBucket {
        addr: masked_source(mask, packet, end),
        slot,
    };
    match SOURCE_BUCKETS.get_ptr_mut(&key) {
        Some(due) => take(due, now, interval, tolerance),
        None => {
            // A new source has a full bucket: this packet takes one token.
            // A full table evicts its least recently used source.
            let _ = SOURCE_BUCKETS.insert(&key, &(now + interval), BPF_NOEXIST as u64);
            true
        }
    }
}

#[inline(always)]
fn now() -> u64 {
    if crate::TRACE.load() != 0
        && let Some(clock) = CLOCK.get(0)
    {
        return *clock;
    }
    unsafe { bpf_ktime_get_ns() }
}

/// GCRA: a packet may come at most `tolerance` before it is due; it then
/// moves the due time one interval on (from now, if the bucket was full).
#[inline(always)]
fn take(due: *mut u64, now: u64, interval: u64, tolerance: u64) -> bool {
    // SAFETY: `due` points into a map value of this program.
    unsafe {
        let at = core::ptr::read_volatile(due);
        if at <= now {
            core::ptr::write_volatile(due, now + interval);
            return true;
        }
        if at - now > tolerance {
            return false;
        }
        // The old value is not used: LLVM emits the plain `BPF_XADD`.
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(due, interval);
    }
    true
}

/// The packet's source under its family's prefix `mask`.
#[inline(always)]
fn masked_source(mask: &[u8; 16], packet: &Packet, end: usize) -> [u8; 16] {
    // SAFETY: `end` ends the packet that `packet` was parsed from.
    let mut addr = unsafe { guard::address(packet, 0, end) };
    for (byte, mask) in addr.iter_mut().zip(mask) {
        *byte &= mask;
    }
    addr
}
