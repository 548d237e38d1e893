//! The address trie's lookup (see `filter_common::AddressNode`), shared by
//! the filter and the benchmark's reference program.

use aya_ebpf::maps::Array;
use filter_common::{CHILD, ENTRIES_PER_BLOCK, EntryBlock, NODE, NODES_PER_BLOCK, NodeBlock, WIDE};

/// The class of the `LEN`-byte address at `addr`: the root entry for its
/// first two bytes, then one node per byte while entries point further.
/// A wide node is read directly; a compressed one through its rank.
#[inline(always)]
pub fn class<const LEN: usize>(
    entries: &Array<EntryBlock>,
    nodes: &Array<NodeBlock>,
    root: u32,
    addr: *const u8,
) -> Option<u32> {
    let byte = |i: usize| unsafe { *addr.add(i) } as usize;
    let mut entry = entry_at(entries, root + (byte(0) << 8 | byte(1)) as u32)?;
    for i in 2..LEN {
        if entry & CHILD == 0 {
            break;
        }
        let node = entry & NODE;
        let index = if entry & WIDE != 0 {
            node * ENTRIES_PER_BLOCK as u32 + byte(i) as u32
        } else {
            let block = nodes.get(node / NODES_PER_BLOCK as u32)?;
            block[node as usize % NODES_PER_BLOCK].entry_index(byte(i))
        };
        entry = entry_at(entries, index)?;
    }
    Some(entry)
}

#[inline(always)]
fn entry_at(entries: &Array<EntryBlock>, index: u32) -> Option<u32> {
    let block = entries.get(index / ENTRIES_PER_BLOCK as u32)?;
    Some(block[index as usize % ENTRIES_PER_BLOCK])
}
