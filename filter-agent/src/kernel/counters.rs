//! Reading what the program counted: per-CPU counters summed in one place,
//! and the pinned rule table that carries each rule's count across rule
//! swaps and restarts (what `stats`, the metrics and the agent's exit log
//! show).

use std::{collections::HashMap, hash::Hash, path::Path};

use aya::{
    Pod,
    maps::{Array, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
};
use filter_common::{Counter, names};

use crate::{
    kernel::layout::{self, Pinned, Shape},
    kernel::pins::{self, PinError},
    rules::compile::RuleInfo,
    rules::config::Action,
};

/// Bytes of a rule's name in [`RuleRecord`]: the longest name the rules
/// file accepts and a terminating zero.
const NAME_BYTES: usize = crate::rules::config::MAX_RULE_NAME + 1;

/// One CPU's slots added up.
fn total(values: &PerCpuValues<Counter>) -> Counter {
    let mut total = Counter::default();
    values.iter().for_each(|value| total.add(value));
    total
}

/// Every slot of a per-CPU array of counters, summed over CPUs.
pub fn array_totals(map: &Map) -> Result<Vec<Counter>, MapError> {
    let array = PerCpuArray::<_, Counter>::try_from(map)?;
    array.iter().map(|values| Ok(total(&values?))).collect()
}

/// Every entry of a per-CPU hash of counters, summed over CPUs, most
/// packets first.
pub fn hash_totals<K: Pod + Eq + Hash>(map: &Map) -> Result<Vec<(K, Counter)>, MapError> {
    let hash = PerCpuHashMap::<_, K, Counter>::try_from(map)?;
    let mut entries: Vec<(K, Counter)> = hash
        .iter()
        // An LRU entry can be evicted between the key walk and the lookup.
        .filter_map(Result::ok)
        .map(|(key, values)| (key, total(&values)))
        .collect();
    entries.sort_by_key(|(_, counter)| std::cmp::Reverse(counter.packets));
    Ok(entries)
}

/// What a rule counted: the packets it decided (`RULE_STATS`) and those
/// its rate limit dropped (`RULE_OVER_LIMIT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounts {
    pub decided: Counter,
    pub over_limit: Counter,
}

impl RuleCounts {
    pub fn add(&mut self, other: &RuleCounts) {
        self.decided.add(&other.decided);
        self.over_limit.add(&other.over_limit);
    }
}

/// One entry of the pinned rule table. `base` holds what the rule counted
/// under earlier rule sets (its name is the identity), so that counts
/// continue across reloads: total = base + the per-CPU `RULE_STATS` and
/// `RULE_OVER_LIMIT` slots.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RuleRecord {
    pub name: [u8; NAME_BYTES],
    pub action: u32,
    /// 1 when the rule has a rate limit.
    pub limited: u32,
    pub base: RuleCounts,
}

const _: () = assert!(size_of::<RuleRecord>() == NAME_BYTES + 8 + 32);
// SAFETY: `repr(C)`, integers and a byte array, no padding (size asserted).
unsafe impl Pod for RuleRecord {}

/// The pinned rule table's shape (its entries follow the rule set).
pub const RULE_TABLE: Shape = Shape {
    map_type: aya::maps::MapType::Array as u32,
    key_size: size_of::<u32>() as u32,
    value_size: size_of::<RuleRecord>() as u32,
    max_entries: None,
};

impl RuleRecord {
    fn new(rule: &RuleInfo, base: RuleCounts) -> Self {
        let mut name = [0u8; NAME_BYTES];
        let bytes = rule.name.as_bytes();
        let len = bytes.len().min(NAME_BYTES - 1);
        name[..len].copy_from_slice(&bytes[..len]);
        Self {
            name,
            action: rule.action.raw(),
            limited: u32::from(rule.limit.is_some()),
            base,
        }
    }

    pub fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(NAME_BYTES);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// A rule's name, action and total counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleTotal {
    pub name: String,
    pub action: Action,
    /// Whether it has a rate limit (`counts.over_limit` can move).
    pub limited: bool,
    pub counts: RuleCounts,
}

/// Everything `stats` shows for one interface.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub rules: Vec<RuleTotal>,
    /// Indexed by `filter_common::reason`.
    pub reasons: Vec<Counter>,
    /// The pins' layout and the rules' generation.
    pub layout: Pinned,
}

/// Reads the rules and counters pinned in `dir`.
pub fn read_snapshot(dir: &Path) -> Result<Snapshot, PinError> {
    if !dir.join(pins::RULES).exists() {
        return Err(PinError::NotPinned(dir.to_owned()));
    }
    Ok(Snapshot {
        rules: pinned_rule_totals(dir)?,
        reasons: pinned_array_totals(dir, names::STATS)?,
        layout: layout::read(dir)?.ok_or_else(|| PinError::NotPinned(dir.to_owned()))?,
    })
}

fn pinned_array_totals(dir: &Path, name: &str) -> Result<Vec<Counter>, PinError> {
    array_totals(&pins::open_map(dir, name)?).map_err(|source| read_error(dir, name, source))
}

fn pinned_rule_totals(dir: &Path) -> Result<Vec<RuleTotal>, PinError> {
    let read = |source| read_error(dir, pins::RULES, source);
    let map = pins::open_map(dir, pins::RULES)?;
    let records = Array::<_, RuleRecord>::try_from(&map).map_err(read)?;
    let records = records
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    let decided = pinned_array_totals(dir, names::RULE_STATS)?;
    // Pinned by agents since rate limits came; zeros for an older one's.
    let over_limit = pinned_array_totals(dir, names::RULE_OVER_LIMIT).unwrap_or_default();
    Ok(records
        .iter()
        .zip(decided)
        .enumerate()
        .map(|(index, (record, decided))| {
            let over_limit = over_limit.get(index).copied().unwrap_or_default();
            let mut total = record.base;
            total.add(&RuleCounts {
                decided,
                over_limit,
            });
            RuleTotal {
                name: record.name(),
                action: if record.action == filter_common::action::DENY {
                    Action::Deny
                } else {
                    Action::Allow
                },
                limited: record.limited != 0,
                counts: total,
            }
        })
        .collect())
}

/// Each rule's total as pinned in `dir` now, by name: what the rules that
/// keep their name carry over to the next rule set.
pub fn carried_over(dir: &Path) -> HashMap<String, RuleCounts> {
    match pinned_rule_totals(dir) {
        Ok(totals) => totals.into_iter().map(|t| (t.name, t.counts)).collect(),
        Err(_) => HashMap::new(),
    }
}

/// Pins the rule table for `rules` in `dir`, with bases from `previous`
/// ([`carried_over`] before the new program's rule counters replaced the
/// old one's). Returns the bases.
pub fn publish_rule_table(
    rules: &[RuleInfo],
    previous: &HashMap<String, RuleCounts>,
    dir: &Path,
) -> Result<Vec<RuleCounts>, PinError> {
    let write = |source| read_error(dir, pins::RULES, source);
    let entries = (rules.len() as u32).max(1);
    let mut table = Array::<MapData, RuleRecord>::create(entries, 0).map_err(write)?;
    let mut bases = Vec::with_capacity(rules.len());
    for (index, rule) in rules.iter().enumerate() {
        let base = previous.get(&rule.name).copied().unwrap_or_default();
        table
            .set(index as u32, RuleRecord::new(rule, base), 0)
            .map_err(write)?;
        bases.push(base);
    }
    pins::replace(&dir.join(pins::RULES), |staged| table.pin(staged))?;
    Ok(bases)
}

fn read_error(dir: &Path, name: &str, source: MapError) -> PinError {
    PinError::Read {
        path: dir.join(name),
        source,
    }
}
