//! Compiles validated rules into the tables the XDP program looks up.
//!
//! Each packet field (source, destination, protocol/L4/TCP flags, source
//! port, destination port) is mapped to an *equivalence class*: values that
//! the same rules accept share a class. Every class has a bitmap of the rules
//! that accept it. The program looks up five classes and ANDs their bitmaps;
//! the lowest set bit is the first matching rule. The work per packet does
//! not grow with the number of rules, only with the number of 64-rule words
//! that are non-zero in every bitmap (a summary word per chunk skips the
//! rest).
//!
//! Pure logic: no I/O, unit tested without root.

use std::{collections::HashMap, sync::Arc};

use filter_common::{
    AddressBlock, BitmapChunk, CHILD, MAX_RULES, PORT_TABLE_SIZE, PROTO_TABLE_SIZE, ROOT_BLOCKS,
    RULES_PER_CHUNK, V6_ROOT, WORDS_PER_CHUNK, proto_index,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

use crate::config::{Action, AddressList, Config, FilterSettings, GuardSettings, Rule, TcpFlags};

/// Everything the program needs for one rule set.
#[derive(Clone, Debug)]
pub struct RuleSet {
    pub settings: FilterSettings,
    pub guard: GuardSettings,
    /// In kernel order (the index is the rule's bit and counter slot).
    pub rules: Vec<RuleInfo>,
    /// Bitmap chunks per class.
    pub chunks: u32,
    pub proto: TableDim,
    pub sport: TableDim,
    pub dport: TableDim,
    pub src: AddressDim,
    pub dst: AddressDim,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub name: String,
    pub action: Action,
}

/// A field looked up in a flat table (protocol index or port).
#[derive(Clone, Debug)]
pub struct TableDim {
    /// Class per table index. Class 0 is the most common one, so entries
    /// equal to 0 need not be written (maps start zeroed).
    pub table: Vec<u32>,
    /// `chunks` bitmap chunks per class, class after class.
    pub bitmaps: Vec<BitmapChunk>,
}

/// An address field, looked up by longest prefix match.
#[derive(Clone, Debug)]
pub struct AddressDim {
    /// Every listed prefix (and /0) with its class, expanded into the
    /// program's multibit trie.
    pub blocks: Vec<AddressBlock>,
    pub bitmaps: Vec<BitmapChunk>,
}

impl RuleSet {
    /// Bytes of BPF map values this rule set occupies (keys and kernel
    /// overhead not counted).
    pub fn map_bytes(&self) -> usize {
        let chunk = size_of::<BitmapChunk>();
        let tables = [&self.proto, &self.sport, &self.dport]
            .iter()
            .map(|dim| dim.table.len() * 4 + dim.bitmaps.len() * chunk)
            .sum::<usize>();
        let addresses = [&self.src, &self.dst]
            .iter()
            .map(|dim| dim.blocks.len() * size_of::<AddressBlock>() + dim.bitmaps.len() * chunk)
            .sum::<usize>();
        tables + addresses + self.rules.len() * 4
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("{count} rules (with the implicit ones) exceed the limit of {MAX_RULES}")]
    TooManyRules { count: usize },
    #[error(
        "the {field} prefixes{} need about {estimate_mib} MiB of maps, more than [filter] \
         max_map_mib = {limit_mib}; shorten the list or raise the limit",
        set.as_ref().map_or_else(String::new, |set| format!(" (set {set:?} the largest)"))
    )]
    MapMemory {
        field: &'static str,
        set: Option<String>,
        estimate_mib: u64,
        limit_mib: u32,
    },
}

pub fn compile(config: &Config) -> Result<RuleSet, CompileError> {
    let rules: Vec<&Rule> = config.effective_rules().collect();
    if rules.len() > MAX_RULES as usize {
        return Err(CompileError::TooManyRules { count: rules.len() });
    }
    let chunks = (rules.len() as u32).div_ceil(RULES_PER_CHUNK).max(1);
    let bitmap = BitmapBuilder { chunks };
    // Both address fields share the budget; the rest is small.
    let limit_mib = config.filter.max_map_mib;
    let mut budget = (limit_mib as usize) << 20;
    let src = address_dim(&rules, &bitmap, "src", &mut budget, |rule| {
        rule.src.as_ref()
    })
    .map_err(|err| err.with_limit(limit_mib))?;
    let dst = address_dim(&rules, &bitmap, "dst", &mut budget, |rule| {
        rule.dst.as_ref()
    })
    .map_err(|err| err.with_limit(limit_mib))?;
    Ok(RuleSet {
        settings: config.filter,
        guard: config.guard.clone(),
        rules: rules
            .iter()
            .map(|rule| RuleInfo {
                name: rule.name.clone(),
                action: rule.action,
            })
            .collect(),
        chunks,
        proto: proto_dim(&rules, &bitmap),
        sport: port_dim(&rules, &bitmap, |rule| {
            rule.sport.clone().or_else(|| singletons(&rule.icmp_type))
        }),
        dport: port_dim(&rules, &bitmap, |rule| {
            rule.dport.clone().or_else(|| singletons(&rule.icmp_code))
        }),
        src,
        dst,
    })
}

impl CompileError {
    fn with_limit(mut self, limit: u32) -> Self {
        if let CompileError::MapMemory { limit_mib, .. } = &mut self {
            *limit_mib = limit;
        }
        self
    }
}

/// ICMP type and code travel in the port fields of the lookup.
fn singletons(values: &Option<Vec<u8>>) -> Option<Vec<(u16, u16)>> {
    values.as_ref().map(|values| {
        values
            .iter()
            .map(|&v| (u16::from(v), u16::from(v)))
            .collect()
    })
}

/// Rules grouped by their condition on one field.
struct Conditions<K> {
    /// Distinct conditions, with the rules that have each.
    distinct: Vec<(K, Vec<usize>)>,
    /// Rules with no condition on this field.
    any: Vec<usize>,
}

impl<K: Eq + std::hash::Hash + Clone> Conditions<K> {
    fn group<'r>(rules: &[&'r Rule], condition: impl Fn(&'r Rule) -> Option<K>) -> Self {
        let mut index: HashMap<K, usize> = HashMap::new();
        let mut distinct: Vec<(K, Vec<usize>)> = Vec::new();
        let mut any = Vec::new();
        for (position, rule) in rules.iter().enumerate() {
            match condition(rule) {
                None => any.push(position),
                Some(key) => {
                    let slot = *index.entry(key.clone()).or_insert_with(|| {
                        distinct.push((key, Vec::new()));
                        distinct.len() - 1
                    });
                    distinct[slot].1.push(position);
                }
            }
        }
        Self { distinct, any }
    }
}

/// Interns sets of satisfied conditions as classes.
struct ClassTable {
    ids: HashMap<Vec<u32>, u32>,
    keys: Vec<Vec<u32>>,
}

impl ClassTable {
    fn new() -> Self {
        Self {
            ids: HashMap::new(),
            keys: Vec::new(),
        }
    }

    /// `satisfied` must be sorted.
    fn class_of(&mut self, satisfied: Vec<u32>) -> u32 {
        if let Some(&id) = self.ids.get(&satisfied) {
            return id;
        }
        let id = self.keys.len() as u32;
        self.keys.push(satisfied.clone());
        self.ids.insert(satisfied, id);
        id
    }
}

struct BitmapBuilder {
    chunks: u32,
}

impl BitmapBuilder {
    /// The chunks of one class: rules with no condition plus the rules of
    /// every satisfied condition.
    fn class_chunks<K>(&self, conditions: &Conditions<K>, satisfied: &[u32]) -> Vec<BitmapChunk> {
        let empty = BitmapChunk {
            summary: 0,
            words: [0; WORDS_PER_CHUNK],
        };
        let mut chunks = vec![empty; self.chunks as usize];
        let rules = satisfied
            .iter()
            .flat_map(|&condition| &conditions.distinct[condition as usize].1)
            .chain(&conditions.any);
        for &rule in rules {
            let chunk = &mut chunks[rule / RULES_PER_CHUNK as usize];
            let word = (rule % RULES_PER_CHUNK as usize) / 64;
            chunk.words[word] |= 1 << (rule % 64);
            chunk.summary |= 1 << word;
        }
        chunks
    }

    fn all_chunks<K>(
        &self,
        conditions: &Conditions<K>,
        classes: &ClassTable,
        order: &[u32],
    ) -> Vec<BitmapChunk> {
        order
            .iter()
            .flat_map(|&class| self.class_chunks(conditions, &classes.keys[class as usize]))
            .collect()
    }
}

/// Renumbers a table's classes by how often they occur (most common first)
/// and returns the table and the class order for the bitmaps.
fn by_frequency(table: Vec<u32>, classes: usize) -> (Vec<u32>, Vec<u32>) {
    let mut counts = vec![0usize; classes];
    for &class in &table {
        counts[class as usize] += 1;
    }
    let mut order: Vec<u32> = (0..classes as u32).collect();
    order.sort_by_key(|&class| (std::cmp::Reverse(counts[class as usize]), class));
    let mut renumber = vec![0u32; classes];
    for (new, &old) in order.iter().enumerate() {
        renumber[old as usize] = new as u32;
    }
    (
        table
            .into_iter()
            .map(|class| renumber[class as usize])
            .collect(),
        order,
    )
}

/// Condition on (protocol, L4 header present, TCP flags).
#[derive(Clone, PartialEq, Eq, Hash)]
struct ProtoCondition {
    proto: Option<u8>,
    needs_l4: bool,
    tcp_flags: Option<TcpFlags>,
}

fn proto_dim(rules: &[&Rule], bitmap: &BitmapBuilder) -> TableDim {
    let conditions = Conditions::group(rules, |rule| {
        let condition = ProtoCondition {
            proto: rule.proto,
            needs_l4: rule.needs_l4(),
            tcp_flags: rule.tcp_flags,
        };
        (condition.proto.is_some() || condition.needs_l4).then_some(condition)
    });
    let mut classes = ClassTable::new();
    let mut table = Vec::with_capacity(PROTO_TABLE_SIZE as usize);
    for index in 0..PROTO_TABLE_SIZE {
        let (proto, has_l4, flags) = ((index >> 9) as u8, index & 0x100 != 0, index as u8);
        debug_assert_eq!(proto_index(proto, has_l4, flags), index);
        let satisfied = (0u32..)
            .zip(&conditions.distinct)
            .filter(|(_, (condition, _))| {
                condition.proto.is_none_or(|p| p == proto)
                    && (has_l4 || !condition.needs_l4)
                    && condition.tcp_flags.is_none_or(|f| f.matches(flags))
            })
            .map(|(id, _)| id)
            .collect();
        table.push(classes.class_of(satisfied));
    }
    let (table, order) = by_frequency(table, classes.keys.len());
    TableDim {
        bitmaps: bitmap.all_chunks(&conditions, &classes, &order),
        table,
    }
}

fn port_dim(
    rules: &[&Rule],
    bitmap: &BitmapBuilder,
    ranges: impl Fn(&Rule) -> Option<Vec<(u16, u16)>>,
) -> TableDim {
    let conditions = Conditions::group(rules, |rule| {
        ranges(rule).map(|mut ranges| {
            ranges.sort_unstable();
            ranges
        })
    });
    // Sweep over the port space: at each boundary, conditions start or stop.
    let mut starts: Vec<Vec<u32>> = vec![Vec::new(); PORT_TABLE_SIZE as usize + 1];
    let mut stops: Vec<Vec<u32>> = vec![Vec::new(); PORT_TABLE_SIZE as usize + 1];
    for (id, (ranges, _)) in (0u32..).zip(&conditions.distinct) {
        for &(lo, hi) in ranges {
            starts[lo as usize].push(id);
            stops[hi as usize + 1].push(id);
        }
    }
    let mut active = vec![0u32; conditions.distinct.len()];
    let mut classes = ClassTable::new();
    let mut table = Vec::with_capacity(PORT_TABLE_SIZE as usize);
    let mut current = classes.class_of(Vec::new());
    for port in 0..PORT_TABLE_SIZE as usize {
        if !starts[port].is_empty() || !stops[port].is_empty() {
            for &id in &stops[port] {
                active[id as usize] -= 1;
            }
            for &id in &starts[port] {
                active[id as usize] += 1;
            }
            let satisfied = (0u32..)
                .zip(&active)
                .filter(|(_, n)| **n > 0)
                .map(|(id, _)| id)
                .collect();
            current = classes.class_of(satisfied);
        }
        table.push(current);
    }
    let (table, order) = by_frequency(table, classes.keys.len());
    TableDim {
        bitmaps: bitmap.all_chunks(&conditions, &classes, &order),
        table,
    }
}

/// The address dimension of `field` (named `name`), within `budget` bytes
/// of trie blocks (which it spends).
fn address_dim<'r>(
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;

    fn compile_text(rules: &str) -> RuleSet {
        let text = format!("[filter]\ndefault = \"deny\"\n{rules}");
        compile(&config::parse(Path::new("r.toml"), &text).unwrap()).unwrap()
    }

    fn bits(dim_bitmaps: &[BitmapChunk], class: u32, chunks: u32) -> Vec<usize> {
        let chunks = &dim_bitmaps[(class * chunks) as usize..((class + 1) * chunks) as usize];
        let mut rules = Vec::new();
        for (c, chunk) in chunks.iter().enumerate() {
            for (w, word) in chunk.words.iter().enumerate() {
                assert_eq!(chunk.summary >> w & 1 == 1, *word != 0, "summary bit {w}");
                rules.extend(
                    (0..64)
                        .filter(|b| word >> b & 1 == 1)
                        .map(|b| c * 4096 + w * 64 + b),
                );
            }
        }
        rules
    }

    #[test]
    fn ports_get_classes_per_interval() {
        let set = compile_text(
            "[[rule]]\nname = \"ssh\"\naction = \"allow\"\nproto = \"tcp\"\ndport = 22\n\
             [[rule]]\nname = \"high\"\naction = \"allow\"\nproto = \"udp\"\ndport = \"1024-65535\"\n\
             [[rule]]\nname = \"all\"\naction = \"deny\"\n",
        );
        // The implicit ND rule comes first.
        let names: Vec<&str> = set.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, [config::IMPLICIT_ND_RULE, "ssh", "high", "all"]);
        let class = |port: usize| set.dport.table[port];
        assert_eq!(bits(&set.dport.bitmaps, class(22), 1), [0, 1, 3]);
        assert_eq!(bits(&set.dport.bitmaps, class(1024), 1), [0, 2, 3]);
        assert_eq!(bits(&set.dport.bitmaps, class(23), 1), [0, 3]);
        assert_eq!(class(23), class(0));
        // The most common class is 0, so most table entries need no write.
        assert_eq!(class(40000), 0);
    }

    #[test]
    fn proto_classes_respect_l4_and_flags() {
        let set = compile_text(
            "[[rule]]\nname = \"syn\"\naction = \"deny\"\nproto = \"tcp\"\ntcp_flags = \"syn,!ack\"\n\
             [[rule]]\nname = \"tcp\"\naction = \"allow\"\nproto = \"tcp\"\n",
        );
        let lookup = |proto, l4, flags| {
            bits(
                &set.proto.bitmaps,
                set.proto.table[proto_index(proto, l4, flags) as usize],
                1,
            )
        };
        assert_eq!(lookup(6, true, 0x02), [1, 2]);
        assert_eq!(lookup(6, true, 0x12), [2]);
        // A non-first fragment: only rules without L4 conditions.
        assert_eq!(lookup(6, false, 0), [2]);
        assert_eq!(lookup(58, true, 0), [0]);
        assert_eq!(lookup(17, true, 0), Vec::<usize>::new());
    }

    #[test]
    fn address_classes_follow_longest_prefix() {
        let set = compile_text(
            "[sets]\nnets = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n\
             [[rule]]\nname = \"host\"\naction = \"allow\"\nsrc = \"10.1.2.3\"\n\
             [[rule]]\nname = \"net\"\naction = \"deny\"\nsrc = \"@nets\"\n\
             [[rule]]\nname = \"v6\"\naction = \"deny\"\ndst = \"2001:db8::1\"\n",
        );
        // Classes as the program finds them: through the trie.
        let src = |text: &str| trie_lookup(&set.src.blocks, text.parse().unwrap());
        // Rules 0 (ND) and 3 (no src) match every source.
        assert_eq!(bits(&set.src.bitmaps, src("10.1.2.3"), 1), [0, 1, 2, 3]);
        assert_eq!(bits(&set.src.bitmaps, src("10.200.0.1"), 1), [0, 2, 3]);
        assert_eq!(bits(&set.src.bitmaps, src("192.0.2.1"), 1), [0, 3]);
        assert_eq!(bits(&set.src.bitmaps, src("2001:db8:5::1"), 1), [0, 2, 3]);
        assert_eq!(bits(&set.src.bitmaps, src("2001:db9::1"), 1), [0, 3]);
        // dst: only rule 3 lists one, a v6 host; v4 destinations never match it.
        let dst = |text: &str| trie_lookup(&set.dst.blocks, text.parse().unwrap());
        assert_eq!(bits(&set.dst.bitmaps, dst("10.1.2.3"), 1), [0, 1, 2]);
        assert_eq!(bits(&set.dst.bitmaps, dst("2001:db8::1"), 1), [0, 1, 2, 3]);
        assert_eq!(bits(&set.dst.bitmaps, dst("2001:db8::2"), 1), [0, 1, 2]);
    }

    /// The lookup the program does, in user space.
    fn trie_lookup(blocks: &[AddressBlock], addr: std::net::IpAddr) -> u32 {
        let (root, bytes) = match addr {
            std::net::IpAddr::V4(a) => (0, a.octets().to_vec()),
            std::net::IpAddr::V6(a) => (V6_ROOT as usize, a.octets().to_vec()),
        };
        let mut entry = blocks[root + usize::from(bytes[0])][usize::from(bytes[1])];
        for &byte in &bytes[2..] {
            if entry & CHILD == 0 {
                break;
            }
            entry = blocks[(entry & !CHILD) as usize][usize::from(byte)];
        }
        entry
    }

    #[test]
    fn trie_agrees_with_longest_prefix_match() {
        let v4: Vec<(Ipv4Net, u32)> = [
            "0.0.0.0/0",
            "10.0.0.0/7",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/23",
            "10.1.2.128/25",
            "10.1.2.3/32",
            "10.1.200.0/21",
            "192.168.0.0/30",
        ]
        .iter()
        .zip(1..)
        .map(|(text, class)| (text.parse().unwrap(), class))
        .collect();
        let v6: Vec<(Ipv6Net, u32)> = [
            "::/0",
            "2001:db8::/32",
            "2001:db8:0:1::/64",
            "2001:db8::1/128",
            "2001:db8::/33",
            "fe80::/10",
        ]
        .iter()
        .zip(100..)
        .map(|(text, class)| (text.parse().unwrap(), class))
        .collect();
        let blocks = address_blocks(&v4, &v6, usize::MAX).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..20_000 {
            // Addresses near the prefixes, and random ones.
            let (addr, expected): (std::net::IpAddr, u32) = if round % 2 == 0 {
                let base = v4[(next() % v4.len() as u64) as usize].0;
                let addr = std::net::Ipv4Addr::from(
                    u32::from(base.network()) ^ (next() as u32 >> (next() % 33).min(31)),
                );
                let best = v4
                    .iter()
                    .filter(|(n, _)| n.contains(&addr))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .unwrap();
                (addr.into(), best.1)
            } else {
                let base = v6[(next() % v6.len() as u64) as usize].0;
                let noise =
                    (u128::from(next()) << 64 | u128::from(next())) >> (next() % 129).min(127);
                let addr = std::net::Ipv6Addr::from(u128::from(base.network()) ^ noise);
                let best = v6
                    .iter()
                    .filter(|(n, _)| n.contains(&addr))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .unwrap();
                (addr.into(), best.1)
            };
            assert_eq!(trie_lookup(&blocks, addr), expected, "{addr}");
        }
    }

    #[test]
    fn many_rules_use_several_chunks() {
        let rules: String = (0..5000)
            .map(|i| {
                format!(
                    "[[rule]]\nname = \"r{i}\"\naction = \"allow\"\nproto = \"tcp\"\ndport = {}\n",
                    i % 60000
                )
            })
            .collect();
        let set = compile_text(&rules);
        assert_eq!(set.chunks, 2);
        let class = set.dport.table[4500];
        assert_eq!(bits(&set.dport.bitmaps, class, 2), [0, 4501]);
        assert!(set.map_bytes() < 64 << 20);
    }

    #[test]
    fn sets_beyond_the_map_limit_are_named_with_their_estimate() {
        // 3,000 /32s in as many /16s: two trie blocks (2 KiB) each.
        let nets: Vec<String> = (0..3000u32)
            .map(|i| format!("\"{}.{}.1.1\"", 1 + i / 256, i % 256))
            .collect();
        let text = format!(
            "[filter]\ndefault = \"allow\"\nmax_map_mib = 1\n[sets]\nwide = [{}]\n\
             [[rule]]\nname = \"block\"\naction = \"deny\"\nsrc = \"@wide\"\n",
            nets.join(", ")
        );
        let config = crate::config::parse(std::path::Path::new("r.toml"), &text).unwrap();
        let err = compile(&config).unwrap_err();
        assert!(
            matches!(&err, CompileError::MapMemory { field: "src", set: Some(set), estimate_mib: 6..=7, limit_mib: 1 } if set == "wide"),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("the src prefixes (set \"wide\" the largest) need about")
        );
        let roomy = text.replace("max_map_mib = 1", "max_map_mib = 8");
        let config = crate::config::parse(std::path::Path::new("r.toml"), &roomy).unwrap();
        assert!(compile(&config).unwrap().map_bytes() > 1 << 20);
    }

    #[test]
    fn the_rule_limit_counts_the_implicit_rule() {
        let rules: String = (0..MAX_RULES - 1)
            .map(|i| {
                format!(
                    "[[rule]]\nname = \"r{i}\"\naction = \"allow\"\nproto = \"tcp\"\ndport = {}\n",
                    i % 60000 + 1
                )
            })
            .collect();
        let text = format!("[filter]\ndefault = \"deny\"\n{rules}");
        let config = config::parse(Path::new("r.toml"), &text).unwrap();
        assert_eq!(compile(&config).unwrap().rules.len(), MAX_RULES as usize);
    }

    #[test]
    fn too_many_rules_is_an_error() {
        let rules: String = (0..MAX_RULES)
            .map(|i| format!("[[rule]]\nname = \"r{i}\"\naction = \"allow\"\n"))
            .collect();
        let text = format!("[filter]\ndefault = \"deny\"\n{rules}");
        let config = config::parse(Path::new("r.toml"), &text).unwrap();
        assert_eq!(
            compile(&config).unwrap_err(),
            CompileError::TooManyRules {
                count: MAX_RULES as usize + 1
            }
        );
    }
}
