//! The address dimension: prefixes expanded into the program's multibit
//! trie, one 256-entry block per address byte below a 16-bit root.

use std::{collections::HashMap, sync::Arc};

use filter_common::{AddressBlock, CHILD, ROOT_BLOCKS, V6_ROOT};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{AddressDim, BitmapBuilder, ClassTable, CompileError, Conditions};
use crate::config::{AddressList, Rule};

/// The address dimension of `field` (named `name`), within `budget` bytes
/// of trie blocks (which it spends).
pub(super) fn address_dim<'r>(
    rules: &[&'r Rule],
    bitmap: &BitmapBuilder,
    name: &'static str,
    budget: &mut usize,
    field: impl Fn(&'r Rule) -> Option<&'r Arc<AddressList>>,
) -> Result<AddressDim, CompileError> {
    // Rules naming the same set share one condition.
    let conditions = Conditions::group(rules, |rule| field(rule).map(ArcKey));
    let mut classes = ClassTable::new();
    let v4 = family_prefixes(&conditions, &mut classes, |net| match net {
        IpNet::V4(net) => Some(*net),
        IpNet::V6(_) => None,
    });
    let v6 = family_prefixes(&conditions, &mut classes, |net| match net {
        IpNet::V6(net) => Some(*net),
        IpNet::V4(_) => None,
    });
    let order: Vec<u32> = (0..classes.keys.len() as u32).collect();
    let max_blocks = *budget / size_of::<AddressBlock>();
    let blocks = address_blocks(&v4, &v6, max_blocks).map_err(|estimate| {
        let largest = rules
            .iter()
            .filter_map(|rule| field(rule))
            .max_by_key(|list| list.nets.len());
        CompileError::MapMemory {
            field: name,
            set: largest.and_then(|list| list.set.clone()),
            estimate_mib: (estimate * size_of::<AddressBlock>()) as u64 >> 20,
            limit_mib: 0,
        }
    })?;
    *budget -= blocks.len() * size_of::<AddressBlock>();
    Ok(AddressDim {
        bitmaps: bitmap.all_chunks(&conditions, &classes, &order),
        blocks,
    })
}

/// Expands prefixes into the program's multibit trie (controlled prefix
/// expansion): shortest first, so a longer prefix overwrites the entries
/// of the shorter ones it is inside of. Stops once more than `max_blocks`
/// would be needed, with the number extrapolated from those expanded.
pub fn address_blocks(
    v4: &[(Ipv4Net, u32)],
    v6: &[(Ipv6Net, u32)],
    max_blocks: usize,
) -> Result<Vec<AddressBlock>, usize> {
    let mut blocks = vec![[0u32; 256]; ROOT_BLOCKS as usize];
    let mut prefixes: Vec<(u8, usize, [u8; 16], u32)> = Vec::with_capacity(v4.len() + v6.len());
    for (net, class) in v4 {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&net.network().octets());
        prefixes.push((net.prefix_len(), 0, bytes, *class));
    }
    for (net, class) in v6 {
        prefixes.push((
            net.prefix_len(),
            V6_ROOT as usize,
            net.network().octets(),
            *class,
        ));
    }
    prefixes.sort_unstable_by_key(|&(len, ..)| len);
    let total = prefixes.len();
    for (done, (len, root, bytes, class)) in prefixes.into_iter().enumerate() {
        insert_prefix(&mut blocks, root, &bytes, len, class);
        if blocks.len() > max_blocks {
            let root = ROOT_BLOCKS as usize;
            return Err(root + (blocks.len() - root) * total / (done + 1));
        }
    }
    Ok(blocks)
}

fn insert_prefix(
    blocks: &mut Vec<AddressBlock>,
    root: usize,
    bytes: &[u8; 16],
    len: u8,
    class: u32,
) {
    // The root covers the first 16 bits: 256 blocks of 256 entries.
    let top = usize::from(bytes[0]) << 8 | usize::from(bytes[1]);
    if len <= 16 {
        let span = 1usize << (16 - len);
        for slot in (top & !(span - 1))..(top & !(span - 1)) + span {
            blocks[root + (slot >> 8)][slot & 255] = class;
        }
        return;
    }
    let mut block = child_block(blocks, root + (top >> 8), top & 255);
    let mut remaining = len - 16;
    for &byte in &bytes[2..] {
        let byte = usize::from(byte);
        if remaining <= 8 {
            let span = 1usize << (8 - remaining);
            blocks[block][byte & !(span - 1)..(byte & !(span - 1)) + span].fill(class);
            return;
        }
        block = child_block(blocks, block, byte);
        remaining -= 8;
    }
}

/// The block below `blocks[block][slot]`, created (inheriting the entry's
/// class) if the entry is still a class.
fn child_block(blocks: &mut Vec<AddressBlock>, block: usize, slot: usize) -> usize {
    let entry = blocks[block][slot];
    if entry & CHILD != 0 {
        return (entry & !CHILD) as usize;
    }
    let child = blocks.len();
    blocks.push([entry; 256]);
    blocks[block][slot] = CHILD | child as u32;
    child
}

/// Identity of a shared address list.
#[derive(Clone)]
struct ArcKey<'a>(&'a Arc<AddressList>);

impl PartialEq for ArcKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(self.0, other.0)
    }
}
impl Eq for ArcKey<'_> {}
impl std::hash::Hash for ArcKey<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(self.0).hash(state);
    }
}

/// A prefix type of one family.
trait Prefix: Copy + Eq + std::hash::Hash {
    const ZERO: Self;
    fn len(&self) -> u8;
    /// The covering prefix of length `len` (`len <= self.len()`).
    fn truncated(&self, len: u8) -> Self;
}

impl Prefix for Ipv4Net {
    const ZERO: Self = Ipv4Net::new_assert(std::net::Ipv4Addr::UNSPECIFIED, 0);
    fn len(&self) -> u8 {
        self.prefix_len()
    }
    fn truncated(&self, len: u8) -> Self {
        Ipv4Net::new_assert(self.addr(), len).trunc()
    }
}

impl Prefix for Ipv6Net {
    const ZERO: Self = Ipv6Net::new_assert(std::net::Ipv6Addr::UNSPECIFIED, 0);
    fn len(&self) -> u8 {
        self.prefix_len()
    }
    fn truncated(&self, len: u8) -> Self {
        Ipv6Net::new_assert(self.addr(), len).trunc()
    }
}

/// Every listed prefix of one family with its class. The class of an
/// address is that of its longest listed prefix: the conditions that list
/// that prefix or any shorter one covering it.
fn family_prefixes<P: Prefix>(
    conditions: &Conditions<ArcKey<'_>>,
    classes: &mut ClassTable,
    of_family: impl Fn(&IpNet) -> Option<P>,
) -> Vec<(P, u32)> {
    let mut listed: HashMap<P, Vec<u32>> = HashMap::new();
    for (id, (condition, _)) in (0u32..).zip(&conditions.distinct) {
        for net in condition.0.nets.iter().filter_map(&of_family) {
            let ids = listed.entry(net).or_default();
            if ids.last() != Some(&id) {
                ids.push(id);
            }
        }
    }
    let mut lengths: Vec<u8> = listed.keys().map(Prefix::len).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let satisfied = |net: &P| {
        let mut ids: Vec<u32> = lengths
            .iter()
            .take_while(|&&len| len <= net.len())
            .filter_map(|&len| listed.get(&net.truncated(len)))
            .flatten()
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let mut prefixes: Vec<P> = listed.keys().copied().collect();
    if !listed.contains_key(&P::ZERO) {
        prefixes.push(P::ZERO);
    }
    prefixes
        .into_iter()
        .map(|net| {
            let class = classes.class_of(satisfied(&net));
            (net, class)
        })
        .collect()
}
