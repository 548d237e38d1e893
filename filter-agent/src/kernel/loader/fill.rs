//! Writing a compiled rule set into the program's maps.

use aya::{Ebpf, Pod, maps::Array};
use filter_common::{
    AddressNode, BitmapChunk, ENTRIES_PER_BLOCK, MAX_CHUNKS, NODES_PER_BLOCK, WORDS_PER_CHUNK,
    names,
};

use super::{LoadError, map_mut};
use crate::{
    kernel::guard::{self, Listeners},
    rules::compile::{AddressTrie, RuleSet, TableDim},
};

/// Writes the compiled rule set into the maps, before the program can see
/// a packet.
pub(super) fn fill_maps(ebpf: &mut Ebpf, rules: &RuleSet) -> Result<(), LoadError> {
    fill_trie(
        ebpf,
        [names::SRC_ENTRIES, names::SRC_NODES],
        &rules.src.trie,
    )?;
    fill_trie(
        ebpf,
        [names::DST_ENTRIES, names::DST_NODES],
        &rules.dst.trie,
    )?;
    fill_table(ebpf, names::PROTO_CLASS, &rules.proto)?;
    fill_table(ebpf, names::SPORT_CLASS, &rules.sport)?;
    fill_table(ebpf, names::DPORT_CLASS, &rules.dport)?;
    // A class's chunks are one value (`ClassBitmaps`): the program looks
    // each field up once. Chunks the rule set does not use stay zero.
    let empty = BitmapChunk {
        summary: 0,
        words: [0; WORDS_PER_CHUNK],
    };
    let bitmaps = [
        (names::SRC_BITS, &rules.src.bitmaps),
        (names::DST_BITS, &rules.dst.bitmaps),
        (names::PROTO_BITS, &rules.proto.bitmaps),
        (names::SPORT_BITS, &rules.sport.bitmaps),
        (names::DPORT_BITS, &rules.dport.bitmaps),
    ];
    for (name, bitmaps) in bitmaps {
        let classes = blocks::<_, { MAX_CHUNKS as usize }>(bitmaps, rules.chunks as usize, empty);
        fill_array(ebpf, name, classes)?;
    }
    let pairs = rules.pairs.summaries.iter().copied().enumerate();
    fill_array(ebpf, names::PAIR_SUMMARY, pairs)?;
    fill_array(
        ebpf,
        names::RULE_ACTIONS,
        rules.action_entries().enumerate(),
    )?;
    fill_array(ebpf, names::LIMITS, rules.limits().into_iter().enumerate())?;
    let services = guard::service_words(&rules.guard.services, &Listeners::default());
    fill_array(ebpf, names::SERVICE_PORTS, services.into_iter().enumerate())
}

/// Writes `(index, value)` pairs into array map `name`.
pub(super) fn fill_array<V: Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    values: impl IntoIterator<Item = (usize, V)>,
) -> Result<(), LoadError> {
    let mut array = Array::<_, V>::try_from(map_mut(ebpf, name)?)?;
    for (index, value) in values {
        array
            .set(index as u32, value, 0)
            .map_err(|source| LoadError::Fill {
                map: name.to_owned(),
                source,
            })?;
    }
    Ok(())
}

/// A field's class per protocol index or port.
fn fill_table(ebpf: &mut Ebpf, table: &str, dim: &TableDim) -> Result<(), LoadError> {
    // Maps start zeroed and class 0 is the most common: skip those writes.
    let nonzero = dim
        .table
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, class)| class != 0);
    fill_array(ebpf, table, nonzero)
}

/// Writes `trie` into the array maps named `[entries, nodes]` (sized by
/// [`AddressTrie::entry_blocks`] and [`AddressTrie::node_blocks`]), a
/// block per syscall.
pub fn fill_trie(
    ebpf: &mut Ebpf,
    [entries, nodes]: [&str; 2],
    trie: &AddressTrie,
) -> Result<(), LoadError> {
    let entry_blocks = blocks::<_, ENTRIES_PER_BLOCK>(&trie.entries, ENTRIES_PER_BLOCK, 0);
    fill_array(ebpf, entries, entry_blocks)?;
    let node_blocks =
        blocks::<_, NODES_PER_BLOCK>(&trie.nodes, NODES_PER_BLOCK, AddressNode::default());
    fill_array(ebpf, nodes, node_blocks)
}

/// `values` as numbered blocks of `N`, `per` values to a block, each
/// padded with `pad`.
fn blocks<T: Copy, const N: usize>(
    values: &[T],
    per: usize,
    pad: T,
) -> impl Iterator<Item = (usize, [T; N])> + '_ {
    values.chunks(per).enumerate().map(move |(index, chunk)| {
        let mut block = [pad; N];
        block[..chunk.len()].copy_from_slice(chunk);
        (index, block)
    })
}
