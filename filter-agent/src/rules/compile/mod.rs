//! Compiles validated rules into the tables the XDP program looks up.
//!
//! Each packet field (source, destination, protocol/L4/TCP flags, source
//! port, destination port) is mapped to an *equivalence class*: values that
//! the same rules accept share a class. Every class has a bitmap of the rules
//! that accept it. The program looks up five classes and ANDs their bitmaps;
//! the lowest set bit is the first matching rule. The work per packet does
//! not grow with the number of rules, only with the number of 64-rule words
//! that are non-zero in every bitmap (a summary word per chunk skips the
//! rest, and a summary per pair of address class groups the words where no
//! rule takes both addresses: [`PairTable`]).
//!
//! Pure logic: no I/O, unit tested without root.

mod pairs;
mod trie;

use std::collections::HashMap;

use filter_common::{
    BitmapChunk, COARSE_CLOCK_MIN_TOLERANCE_NS, ClassBitmaps, MAX_RULES, PORT_TABLE_SIZE,
    PROTO_TABLE_SIZE, RULES_PER_CHUNK, RateLimit, SourceBucket, WORDS_PER_CHUNK, action,
    address_words, proto_index_parts, source_bucket_count,
};
use thiserror::Error;

pub use pairs::PairTable;
pub use trie::AddressTrie;
use trie::address_dim;

use crate::rules::config::{Action, Config, FilterSettings, GuardSettings, Limit, Rule, TcpFlags};

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
    pub pairs: PairTable,
    /// The rules whose flows skip conntrack (nftables, [`crate::host::notrack`]).
    pub notrack: Vec<Rule>,
    /// The cloud's ACL the audit holds namespaces to (`[upstream]`).
    pub upstream: Option<std::sync::Arc<crate::rules::config::Upstream>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub name: String,
    pub action: Action,
    pub limit: Option<Limit>,
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
    /// program's compressed multibit trie.
    pub trie: AddressTrie,
    pub bitmaps: Vec<BitmapChunk>,
}

impl RuleSet {
    /// Bytes of BPF map values this rule set occupies (keys and kernel
    /// overhead not counted).
    pub fn map_bytes(&self) -> usize {
        // Each class's chunks are one map value of `MAX_CHUNKS` chunks.
        let bitmaps = |bitmaps: &[BitmapChunk]| {
            bitmaps.len() / self.chunks as usize * size_of::<ClassBitmaps>()
        };
        let tables = [&self.proto, &self.sport, &self.dport]
            .iter()
            .map(|dim| dim.table.len() * 4 + bitmaps(&dim.bitmaps))
            .sum::<usize>();
        let addresses = [&self.src, &self.dst]
            .iter()
            .map(|dim| dim.trie.bytes() + bitmaps(&dim.bitmaps))
            .sum::<usize>()
            + self.pairs.summaries.len() * size_of::<filter_common::PairSummary>();
        let limits = self.limits().len() * size_of::<RateLimit>();
        let sources = if self.has_source_limits() {
            source_bucket_count(self.settings.limit_sources) as usize * size_of::<SourceBucket>()
        } else {
            0
        };
        tables + addresses + self.rules.len() * 4 + limits + sources
    }

    /// Each rule's `RULE_ACTIONS` entry: its action, and its slot in
    /// [`RuleSet::limits`] when it has a rate limit.
    pub fn action_entries(&self) -> impl Iterator<Item = u32> + '_ {
        let mut slot = 0;
        self.rules.iter().map(move |rule| {
            let limit = rule.limit.map_or(0, |_| {
                slot += 1;
                slot << action::LIMIT_SHIFT
            });
            rule.action.raw() | limit
        })
    }

    /// The `LIMITS` map: slot 0 unused, then each limited rule's limit in
    /// rule order.
    pub fn limits(&self) -> Vec<RateLimit> {
        let limits = self.rules.iter().filter_map(|rule| rule.limit);
        std::iter::once(RateLimit::default())
            .chain(limits.map(|limit| rate_limit(&limit)))
            .collect()
    }

    pub fn has_source_limits(&self) -> bool {
        let per_source = |rule: &RuleInfo| rule.limit.is_some_and(|l| l.per_source.is_some());
        self.rules.iter().any(per_source)
    }
}

/// A limit as the program keeps it (see `filter_common::RateLimit`).
pub fn rate_limit(limit: &Limit) -> RateLimit {
    let interval_ns = limit.interval_ns();
    let (v4, v6) = limit.per_source.unwrap_or((32, 128));
    let v4 = u32::MAX.checked_shl(32 - u32::from(v4)).unwrap_or(0);
    let v6 = u128::MAX.checked_shl(128 - u32::from(v6)).unwrap_or(0);
    // IPv4 sources are stored IPv4-mapped: the mapping prefix is kept.
    let v4_mapped = (u128::MAX << 32) | u128::from(v4);
    RateLimit {
        interval_ns,
        tolerance_ns: (limit.burst - 1) * interval_ns,
        due_ns: 0,
        per_source: u32::from(limit.per_source.is_some()),
        coarse_clock: u32::from((limit.burst - 1) * interval_ns >= COARSE_CLOCK_MIN_TOLERANCE_NS),
        v4_mask: address_words(v4_mapped.to_be_bytes()),
        v6_mask: address_words(v6.to_be_bytes()),
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
    let pairs = PairTable::build(&src.bitmaps, &dst.bitmaps, chunks);
    Ok(RuleSet {
        upstream: config.upstream.clone(),
        notrack: rules
            .iter()
            .filter(|rule| rule.notrack)
            .map(|&rule| rule.clone())
            .collect(),
        settings: config.filter,
        guard: config.guard.clone(),
        rules: rules
            .iter()
            .map(|rule| RuleInfo {
                name: rule.name.clone(),
                action: rule.action,
                limit: rule.limit,
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
        pairs,
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
    fn class_of(&mut self, satisfied: &[u32]) -> u32 {
        if let Some(&id) = self.ids.get(satisfied) {
            return id;
        }
        let id = self.keys.len() as u32;
        self.keys.push(satisfied.to_vec());
        self.ids.insert(satisfied.to_vec(), id);
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
        let (proto, has_l4, flags) = proto_index_parts(index);
        let satisfied: Vec<u32> = (0u32..)
            .zip(&conditions.distinct)
            .filter(|(_, (condition, _))| {
                condition.proto.is_none_or(|p| p == proto)
                    && (has_l4 || !condition.needs_l4)
                    && condition.tcp_flags.is_none_or(|f| f.matches(flags))
            })
            .map(|(id, _)| id)
            .collect();
        table.push(classes.class_of(&satisfied));
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
    let mut current = classes.class_of(&[]);
    for port in 0..PORT_TABLE_SIZE as usize {
        if !starts[port].is_empty() || !stops[port].is_empty() {
            for &id in &stops[port] {
                active[id as usize] -= 1;
            }
            for &id in &starts[port] {
                active[id as usize] += 1;
            }
            let satisfied: Vec<u32> = (0u32..)
                .zip(&active)
                .filter(|(_, n)| **n > 0)
                .map(|(id, _)| id)
                .collect();
            current = classes.class_of(&satisfied);
        }
        table.push(current);
    }
    let (table, order) = by_frequency(table, classes.keys.len());
    TableDim {
        bitmaps: bitmap.all_chunks(&conditions, &classes, &order),
        table,
    }
}

#[cfg(test)]
mod tests;
