//! First-match classification at a cost that does not grow with the rule
//! count: five equivalence-class lookups, each class's rule bitmap in one
//! map value (all its chunks), then the AND of the five bitmaps, skipping
//! 64-rule words that are empty in any of them or that no rule of the
//! address classes' pair summary has.

use aya_ebpf::{Global, maps::Array};
use filter_common::{
    ClassBitmaps, EntryBlock, MAX_CHUNKS, NodeBlock, PairSummary, V6_ROOT, WORDS_PER_CHUNK,
    proto_index,
};

use crate::{parse::Packet, trie::class};

/// Bitmap chunks per class in the `*_BITS` maps; set by the agent.
#[unsafe(no_mangle)]
static CHUNKS: Global<u32> = Global::new(1);
/// How the address classes group into `PAIR_SUMMARY` entries; set by the agent.
#[unsafe(no_mangle)]
static PAIR_SRC_SHIFT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static PAIR_DST_SHIFT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static PAIR_DST_GROUPS: Global<u32> = Global::new(1);

// Every map is sized by the agent for its rule set at load time.
#[aya_ebpf::macros::map]
static SRC_ENTRIES: Array<EntryBlock> = Array::with_max_entries(1, 0);
#[aya_ebpf::macros::map]
static SRC_NODES: Array<NodeBlock> = Array::with_max_entries(1, 0);
#[aya_ebpf::macros::map]
static DST_ENTRIES: Array<EntryBlock> = Array::with_max_entries(1, 0);
#[aya_ebpf::macros::map]
static DST_NODES: Array<NodeBlock> = Array::with_max_entries(1, 0);
#[aya_ebpf::macros::map]
static PROTO_CLASS: Array<u32> = Array::with_max_entries(filter_common::PROTO_TABLE_SIZE, 0);
#[aya_ebpf::macros::map]
static SPORT_CLASS: Array<u32> = Array::with_max_entries(filter_common::PORT_TABLE_SIZE, 0);
#[aya_ebpf::macros::map]
static DPORT_CLASS: Array<u32> = Array::with_max_entries(filter_common::PORT_TABLE_SIZE, 0);
#[aya_ebpf::macros::map]
static SRC_BITS: Array<ClassBitmaps> = Array::with_max_entries(1, 0);
#[aya_ebpf::macros::map]
static DST_BITS: Array<ClassBitmaps> = Array::with_max_entries(1, 0);
#[aya_ebpf::macros::map]
static PROTO_BITS: Array<ClassBitmaps> = Array::with_max_entries(1, 0);
#[aya_ebpf::macros::map]
static SPORT_BITS: Array<ClassBitmaps> = Array::with_max_entries(1, 0);
#[aya_ebpf::macros::map]
static DPORT_BITS: Array<ClassBitmaps> = Array::with_max_entries(1, 0);
#[aya_ebpf::macros::map]
static PAIR_SUMMARY: Array<PairSummary> = Array::with_max_entries(1, 0);

/// The index of the first rule that matches `packet`, if any.
#[inline(always)]
pub fn first_match(packet: &Packet) -> Option<u32> {
    let (src, dst) = address_classes(packet)?;
    let proto = *PROTO_CLASS.get(proto_index(packet.proto, packet.has_l4, packet.tcp_flags))?;
    let sport = *SPORT_CLASS.get(packet.sport as u32)?;
    let dport = *DPORT_CLASS.get(packet.dport as u32)?;
    let pair_group =
        (src >> PAIR_SRC_SHIFT.load()) * PAIR_DST_GROUPS.load() + (dst >> PAIR_DST_SHIFT.load());
    let pair = PAIR_SUMMARY.get(pair_group)?;
    // No rule takes both addresses (chunks past `CHUNKS` are zero): decided
    // by none, without the five bitmap lookups.
    let [a, b, c, d] = pair.chunks;
    if a | b | c | d == 0 {
        return None;
    }
    // One lookup per field for every chunk: a chunk costs loads, not lookups.
    let bits = [
        SRC_BITS.get(src)?,
        DST_BITS.get(dst)?,
        PROTO_BITS.get(proto)?,
        SPORT_BITS.get(sport)?,
        DPORT_BITS.get(dport)?,
    ];

    let chunks = CHUNKS.load();
    for chunk in 0..MAX_CHUNKS {
        if chunk >= chunks {
            break;
        }
        // No rule here takes both addresses: skip the chunk.
        let pair = pair.chunks[chunk as usize];
        if pair == 0 {
            continue;
        }
        let [src, dst, proto, sport, dport] = bits.map(|class| &class[chunk as usize]);
        let mut candidates =
            pair & src.summary & dst.summary & proto.summary & sport.summary & dport.summary;
        for _ in 0..WORDS_PER_CHUNK {
            if candidates == 0 {
                break;
            }
            let word = lowest_set_bit(candidates) as usize;
            let hits = src.words[word]
                & dst.words[word]
                & proto.words[word]
                & sport.words[word]
                & dport.words[word];
            if hits != 0 {
                let bit = lowest_set_bit(hits);
                return Some(chunk * filter_common::RULES_PER_CHUNK + (word as u32) * 64 + bit);
            }
            candidates &= candidates - 1;
        }
    }
    None
}

/// Index of the lowest set bit of `x` (non-zero). `trailing_zeros` becomes
/// a de Bruijn table lookup whose result the verifier cannot bound; LLVM
/// knows it is below 64 and would drop a plain mask, so the mask sits behind
/// an optimisation barrier.
#[inline(always)]
fn lowest_set_bit(x: u64) -> u32 {
    core::hint::black_box(x.trailing_zeros()) & 63
}

/// Source and destination classes from the address tries.
#[inline(always)]
fn address_classes(packet: &Packet) -> Option<(u32, u32)> {
    let src = packet.addresses;
    if packet.v6 {
        let dst = unsafe { src.add(16) };
        Some((
            class::<16>(&SRC_ENTRIES, &SRC_NODES, V6_ROOT, src)?,
            class::<16>(&DST_ENTRIES, &DST_NODES, V6_ROOT, dst)?,
        ))
    } else {
        let dst = unsafe { src.add(4) };
        Some((
            class::<4>(&SRC_ENTRIES, &SRC_NODES, 0, src)?,
            class::<4>(&DST_ENTRIES, &DST_NODES, 0, dst)?,
        ))
    }
}
