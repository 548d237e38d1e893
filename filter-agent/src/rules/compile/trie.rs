//! The address dimension: prefixes expanded into the program's compressed
//! multibit trie, a 16-bit root and one 256-entry node per address byte
//! below it, each storing its runs of equal entries once, or, near the
//! root of a small trie, all 256 (wide).

use std::{net::IpAddr, sync::Arc};

use filter_common::{
    AddressNode, CHILD, ENTRIES_PER_BLOCK, EntryBlock, NODE, NODES_PER_BLOCK, NodeBlock,
    ROOT_ENTRIES, V6_ROOT, WIDE,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{AddressDim, BitmapBuilder, ClassTable, CompileError, Conditions};
use crate::rules::config::{AddressList, Rule};

/// The most wide nodes of one address dimension's trie (a KiB each): all
/// of them for ACLs of some thousands of rules, the top level or none for
/// large sets, whose compressed nodes take some tens of bytes.
const WIDE_NODES: usize = 8 << 10;

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
    let mut trie = AddressTrie::build(&v4, &v6, WIDE_NODES);
    if trie.bytes() > *budget {
        // Wide nodes buy speed with memory the limit does not have.
        trie = AddressTrie::build(&v4, &v6, 0);
    }
    if trie.bytes() > *budget {
        let largest = rules
            .iter()
            .filter_map(|rule| field(rule))
            .max_by_key(|list| list.nets.len());
        return Err(CompileError::MapMemory {
            field: name,
            set: largest.and_then(|list| list.set.clone()),
            estimate_mib: (trie.bytes() >> 20) as u64,
            limit_mib: 0,
        });
    }
    *budget -= trie.bytes();
    Ok(AddressDim {
        bitmaps: bitmap.all_chunks(&conditions, &classes, &order),
        trie,
    })
}

/// The program's address trie (see `filter_common::AddressNode`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressTrie {
    /// The flat entry array: both roots, then every node's runs.
    pub entries: Vec<u32>,
    pub nodes: Vec<AddressNode>,
}

/// A prefix as bits from the top of a `u128` (IPv4 in the top 32).
#[derive(Clone, Copy)]
struct Bits {
    bits: u128,
    len: u32,
    class: u32,
}

impl Bits {
    /// The `width` bits starting `depth` bits from the top.
    fn slice(&self, depth: u32, width: u32) -> usize {
        (self.bits << depth >> (128 - width)) as usize
    }
}

impl AddressTrie {
    /// Longest-prefix match over `v4` and `v6` (each with its class; /0
    /// included): each prefix fills the entries it spans at the level where
    /// it ends, shorter prefixes first (controlled prefix expansion), and a
    /// node whose 256 entries end up equal is not stored at all. Nodes of
    /// the levels nearest the root are wide while at most `wide_nodes` of
    /// them (both families together) are.
    pub fn build(v4: &[(Ipv4Net, u32)], v6: &[(Ipv6Net, u32)], wide_nodes: usize) -> Self {
        let mut builder = Builder {
            trie: AddressTrie {
                entries: vec![0; 2 * ROOT_ENTRIES as usize],
                nodes: Vec::new(),
            },
            wide: Vec::new(),
            wide_left: wide_nodes,
            wide_below: 0,
            built: [0; LEVELS],
        };
        let v4 = v4.iter().map(|(net, class)| Bits {
            bits: u128::from(u32::from(net.network())) << 96,
            len: u32::from(net.prefix_len()),
            class: *class,
        });
        builder.root(0, v4.collect());
        let v6 = v6.iter().map(|(net, class)| Bits {
            bits: u128::from(net.network()),
            len: u32::from(net.prefix_len()),
            class: *class,
        });
        builder.root(V6_ROOT as usize, v6.collect());
        builder.finish()
    }

    /// Bytes of map values: entries and nodes, in the blocks they are
    /// stored in.
    pub fn bytes(&self) -> usize {
        self.entry_blocks() as usize * size_of::<EntryBlock>()
            + self.node_blocks() as usize * size_of::<NodeBlock>()
    }

    /// Map values the entries take, `ENTRIES_PER_BLOCK` to a value.
    pub fn entry_blocks(&self) -> u32 {
        self.entries.len().div_ceil(ENTRIES_PER_BLOCK) as u32
    }

    /// Map values the nodes take (at least one: maps are not empty).
    pub fn node_blocks(&self) -> u32 {
        self.nodes.len().div_ceil(NODES_PER_BLOCK).max(1) as u32
    }

    /// The class of `addr`, looked up as the program does.
    pub fn lookup(&self, addr: IpAddr) -> u32 {
        let (root, bytes) = match addr {
            IpAddr::V4(a) => (0, a.octets().to_vec()),
            IpAddr::V6(a) => (V6_ROOT as usize, a.octets().to_vec()),
        };
        let mut entry = self.entries[root + (usize::from(bytes[0]) << 8 | usize::from(bytes[1]))];
        for &byte in &bytes[2..] {
            if entry & CHILD == 0 {
                break;
            }
            let node = (entry & NODE) as usize;
            let index = if entry & WIDE != 0 {
                node * ENTRIES_PER_BLOCK + usize::from(byte)
            } else {
                self.nodes[node].entry_index(usize::from(byte)) as usize
            };
            entry = self.entries[index];
        }
        entry
    }
}

/// An `AddressTrie` being built: wide nodes wait in `wide` (numbered from
/// 0) until `finish` puts them after every run, on block boundaries.
struct Builder {
    trie: AddressTrie,
    wide: Vec<EntryBlock>,
    /// How many more nodes may be wide.
    wide_left: usize,
    /// Nodes of the current family at depths below this are wide.
    wide_below: u32,
    /// Nodes built at each depth (in bytes) of the current family.
    built: [usize; LEVELS],
}

/// Address bytes: node depths in bytes are below this.
const LEVELS: usize = 16;
const ROOT_BITS: u32 = ROOT_ENTRIES.trailing_zeros();

impl Builder {
    /// Fills one family's root (`ROOT_ENTRIES` from `base`) and builds the
    /// nodes below it: compressed, and again with the levels nearest the
    /// root wide if the nodes built on them fit in what is left. Counting
    /// the nodes built, not the prefixes, makes a list and the same list
    /// merged compile alike.
    fn root(&mut self, base: usize, mut prefixes: Vec<Bits>) {
        prefixes.sort_unstable_by_key(|p| (p.bits, p.len));
        let table = &mut self.trie.entries[base..base + ROOT_ENTRIES as usize];
        fill(table, &prefixes, 0, ROOT_BITS);
        let filled = table.to_vec();
        let deeper: Vec<Bits> = prefixes.into_iter().filter(|p| p.len > ROOT_BITS).collect();
        let (entries, nodes) = (self.trie.entries.len(), self.trie.nodes.len());
        self.wide_below = ROOT_BITS;
        self.built = [0; LEVELS];
        self.nodes_below_root(base, &deeper);
        if let Some(wide_below) = self.wide_levels() {
            self.trie.entries.truncate(entries);
            self.trie.nodes.truncate(nodes);
            self.trie.entries[base..base + ROOT_ENTRIES as usize].copy_from_slice(&filled);
            self.wide_below = wide_below;
            self.nodes_below_root(base, &deeper);
        }
    }

    /// Builds the nodes under the root at `base` for `deeper`, the
    /// prefixes longer than the root (sorted).
    fn nodes_below_root(&mut self, base: usize, deeper: &[Bits]) {
        for group in deeper.chunk_by(|a, b| a.slice(0, ROOT_BITS) == b.slice(0, ROOT_BITS)) {
            let slot = base + group[0].slice(0, ROOT_BITS);
            self.trie.entries[slot] = self.node(ROOT_BITS, group, self.trie.entries[slot]);
        }
    }

    /// How deep wide nodes go (nodes at smaller depths are wide): the
    /// levels below the root, nearest first, while their nodes (as
    /// `built`) fit in what is left, which they spend; `None` if not even
    /// the first one fits.
    fn wide_levels(&mut self) -> Option<u32> {
        let mut depth = ROOT_BITS;
        let mut wide = 0;
        for &nodes in &self.built[(ROOT_BITS / 8) as usize..] {
            if nodes == 0 || wide + nodes > self.wide_left {
                break;
            }
            wide += nodes;
            depth += 8;
        }
        self.wide_left -= wide;
        (depth > ROOT_BITS).then_some(depth)
    }

    /// The entry for the addresses that share `depth` bits with
    /// `prefixes` (all longer than `depth`, sorted by bits), whose class
    /// without them is `inherited`: a node, or a class if all 256 entries
    /// would be equal.
    fn node(&mut self, depth: u32, prefixes: &[Bits], inherited: u32) -> u32 {
        let mut table = [inherited; 256];
        fill(&mut table, prefixes, depth, 8);
        let deeper: Vec<Bits> = prefixes
            .iter()
            .filter(|p| p.len > depth + 8)
            .copied()
            .collect();
        for group in deeper.chunk_by(|a, b| a.slice(depth, 8) == b.slice(depth, 8)) {
            let byte = group[0].slice(depth, 8);
            table[byte] = self.node(depth + 8, group, table[byte]);
        }
        if table.iter().all(|&entry| entry == table[0]) && table[0] & CHILD == 0 {
            return table[0];
        }
        self.built[(depth / 8) as usize] += 1;
        if depth < self.wide_below {
            self.wide.push(table);
            return CHILD | WIDE | (self.wide.len() - 1) as u32;
        }
        let entries = &mut self.trie.entries;
        let mut node = AddressNode {
            first: entries.len() as u32,
            ..AddressNode::default()
        };
        let mut runs = 0u32;
        for (byte, &entry) in table.iter().enumerate() {
            if byte % 8 == 0 {
                node.before[byte / 8] = runs as u8;
            }
            if byte == 0 || entry != table[byte - 1] {
                node.starts[byte / 8] |= 1 << (byte % 8);
                entries.push(entry);
                runs += 1;
            }
        }
        self.trie.nodes.push(node);
        CHILD | (self.trie.nodes.len() - 1) as u32
    }

    /// The trie, its wide nodes after the runs from the first free block
    /// on, and every entry naming a wide node pointed at its block.
    fn finish(self) -> AddressTrie {
        let mut trie = self.trie;
        let first_wide = trie.entries.len().div_ceil(ENTRIES_PER_BLOCK);
        trie.entries.resize(first_wide * ENTRIES_PER_BLOCK, 0);
        trie.entries.extend(self.wide.iter().flatten());
        for entry in &mut trie.entries {
            if *entry & (CHILD | WIDE) == CHILD | WIDE {
                *entry += first_wide as u32;
            }
        }
        trie
    }
}

/// Writes the class of every prefix of `prefixes` that ends within the
/// `width` bits after `depth` into the entries it spans, shorter first.
fn fill(table: &mut [u32], prefixes: &[Bits], depth: u32, width: u32) {
    let mut ending: Vec<&Bits> = prefixes.iter().filter(|p| p.len <= depth + width).collect();
    ending.sort_by_key(|p| p.len);
    for prefix in ending {
        let span = 1usize << (depth + width - prefix.len);
        let start = prefix.slice(depth, width) & !(span - 1);
        table[start..start + span].fill(prefix.class);
    }
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
trait Prefix: Copy + Ord {
    const ZERO: Self;
    /// Whether `other` lies within this prefix.
    fn covers(&self, other: &Self) -> bool;
}

impl Prefix for Ipv4Net {
    const ZERO: Self = Ipv4Net::new_assert(std::net::Ipv4Addr::UNSPECIFIED, 0);
    fn covers(&self, other: &Self) -> bool {
        self.contains(other)
    }
}

impl Prefix for Ipv6Net {
    const ZERO: Self = Ipv6Net::new_assert(std::net::Ipv6Addr::UNSPECIFIED, 0);
    fn covers(&self, other: &Self) -> bool {
        self.contains(other)
    }
}

/// Every listed prefix of one family (and /0) with its class. The class
/// of an address is that of its longest listed prefix: the conditions that
/// list that prefix or any shorter one covering it.
///
/// One sweep in address order (a prefix before the longer ones it covers)
/// with a stack of the prefixes covering the current one, each with the
/// conditions satisfied inside it.
fn family_prefixes<P: Prefix>(
    conditions: &Conditions<ArcKey<'_>>,
    classes: &mut ClassTable,
    of_family: impl Fn(&IpNet) -> Option<P>,
) -> Vec<(P, u32)> {
    let mut listed: Vec<(P, u32)> = (0u32..)
        .zip(&conditions.distinct)
        .flat_map(|(id, (condition, _))| {
            let nets = condition.0.nets.iter().filter_map(&of_family);
            nets.map(move |net| (net, id))
        })
        .collect();
    listed.push((P::ZERO, u32::MAX));
    listed.sort_unstable();
    listed.dedup();
    let mut prefixes = Vec::with_capacity(listed.len());
    let mut stack: Vec<(P, Vec<u32>)> = Vec::new();
    for group in listed.chunk_by(|a, b| a.0 == b.0) {
        let net = group[0].0;
        while stack.last().is_some_and(|(outer, _)| !outer.covers(&net)) {
            stack.pop();
        }
        let mut satisfied = stack.last().map(|(_, ids)| ids.clone()).unwrap_or_default();
        // `u32::MAX` only marks /0 as listed by nothing.
        satisfied.extend(group.iter().map(|&(_, id)| id).filter(|&id| id != u32::MAX));
        satisfied.sort_unstable();
        satisfied.dedup();
        prefixes.push((net, classes.class_of(&satisfied)));
        stack.push((net, satisfied));
    }
    prefixes
}
