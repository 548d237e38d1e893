//! Rate limits: a GCRA bucket per rule, or per source prefix in a fixed
//! array of buckets indexed by a keyed hash of the masked source (no
//! insert, no eviction: a flood of new sources costs what a known source
//! does). A bucket is the time its next packet is due; every CPU updates
//! the same one with a plain store or one atomic add (`BPF_XADD`, on every
//! kernel from 5.10), so the limit holds across CPUs without a lock.
//!
//! Exact on one CPU; when two CPUs race for the same token, both may take
//! it (at most one extra packet per race), so the limit errs on letting a
//! packet through, never on dropping one it owed.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    Global,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::map,
    maps::Array,
};
use filter_common::{RateLimit, SourceBucket, source_hash};

use crate::parse::Packet;

/// The limits, indexed by the slot in a rule's `RULE_ACTIONS` entry (sized
/// by the agent; slot 0 is unused).
#[map]
static LIMITS: Array<RateLimit> = Array::with_max_entries(1, 0);
/// Per-source buckets of every per-source limit: a power of two of them
/// (sized by the agent), shared by all rules.
#[map]
static SOURCE_BUCKETS: Array<SourceBucket> = Array::with_max_entries(1, 0);
/// The key of `source_hash`, drawn by the agent at each load.
#[unsafe(no_mangle)]
static SOURCE_SEED: Global<u64> = Global::new(0);
/// `SOURCE_BUCKETS`' entries minus one: the hash bits that index it.
#[unsafe(no_mangle)]
static SOURCE_INDEX_MASK: Global<u32> = Global::new(0);
/// The clock as last read, for limits that may decide with a clock up to
/// a tick old (`RateLimit::coarse_clock`). One for all CPUs: per-CPU
/// copies would lag by different amounts, and a bucket whose packets move
/// between CPUs would then look fuller than it is.
#[map]
static COARSE_CLOCK: Array<CoarseClock> = Array::with_max_entries(1, 0);

/// A clock reading and the tick it was taken in.
#[repr(C)]
struct CoarseClock {
    ns: u64,
    jiffies: u64,
}

/// The time traced instances (`test`, `replay`) decide at, set before each
/// packet, so a capture replays at its own pace.
#[map]
static CLOCK: Array<u64> = Array::with_max_entries(1, 0);

/// True when the packet fits the limit in `slot`, and takes its token;
/// `end` is the end of packet memory (see `guard::address`).
#[inline(always)]
pub fn admit(slot: u32, packet: &Packet, end: usize) -> bool {
    let Some(limit) = LIMITS.get_ptr_mut(slot) else {
        return true;
    };
    // SAFETY: a map value of this program. Other CPUs change `due_ns`
    // under us, so it is only reached through its pointer; the rest is
    // written by the agent before the program runs.
    let (interval, tolerance, per_source, mask, now) = unsafe {
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
            now((*limit).coarse_clock != 0),
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
    let source = masked_source(mask, packet, end);
    let tag = source_hash(SOURCE_SEED.load(), source, slot);
    let Some(bucket) = SOURCE_BUCKETS.get_ptr_mut(tag as u32 & SOURCE_INDEX_MASK.load()) else {
        return true;
    };
    // SAFETY: a map value of this program, reached through its pointer
    // because other CPUs change it under us.
    unsafe {
        if core::ptr::read_volatile(&raw const (*bucket).tag) != tag {
            // Another source's bucket (or none yet): this source takes it
            // over with a full bucket, and this packet takes one token.
            core::ptr::write_volatile(&raw mut (*bucket).tag, tag);
            core::ptr::write_volatile(&raw mut (*bucket).due_ns, now + interval);
            return true;
        }
        take(&raw mut (*bucket).due_ns, now, interval, tolerance)
    }
}

/// The time to decide at: the clock, or with `coarse` its last reading
/// while the tick (jiffies) has not moved on, which saves a clock read
/// (most of a limit's cost) on nearly every packet of a flood.
#[inline(always)]
fn now(coarse: bool) -> u64 {
    if crate::TRACE.load() != 0
        && let Some(clock) = CLOCK.get(0)
    {
        return *clock;
    }
    if coarse && let Some(cached) = COARSE_CLOCK.get_ptr_mut(0) {
        // SAFETY: a map value of this program; other CPUs write it too, so
        // only through its pointer. A pair torn by a racing writer is at
        // worst one tick older still: it errs the way the lag does.
        unsafe {
            let jiffies = bpf_jiffies64();
            if core::ptr::read_volatile(&raw const (*cached).jiffies) == jiffies {
                return core::ptr::read_volatile(&raw const (*cached).ns);
            }
            let ns = bpf_ktime_get_ns();
            core::ptr::write_volatile(&raw mut (*cached).ns, ns);
            core::ptr::write_volatile(&raw mut (*cached).jiffies, jiffies);
            return ns;
        }
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

/// The packet's source under its family's prefix `mask`, as
/// `source_hash` takes it (IPv4-mapped for IPv4), read as whole words
/// rather than through a 16-byte copy.
#[inline(always)]
fn masked_source(mask: &[u64; 2], packet: &Packet, end: usize) -> [u64; 2] {
    let from = packet.addresses;
    // The proof next to the reads, as in `guard::address`.
    let source = if packet.v6 {
        if from as usize + 32 > end {
            return [0; 2];
        }
        // SAFETY: 16 bytes of the packet, checked just above.
        unsafe { [be_word(from), be_word(from.add(8))] }
    } else {
        if from as usize + 8 > end {
            return [0; 2];
        }
        // SAFETY: 4 bytes of the packet, checked just above.
        let v4 = unsafe { u32::from_be_bytes(from.cast::<[u8; 4]>().read_unaligned()) };
        [0, 0xffff_0000_0000 | u64::from(v4)]
    };
    [source[0] & mask[0], source[1] & mask[1]]
}

/// The big-endian word at `at`.
///
/// # Safety
/// `at` and the 7 bytes after it are packet memory.
#[inline(always)]
unsafe fn be_word(at: *const u8) -> u64 {
    u64::from_be_bytes(unsafe { at.cast::<[u8; 8]>().read_unaligned() })
}
