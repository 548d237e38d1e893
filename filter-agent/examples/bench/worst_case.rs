//! `--classbench RULES --trace TRACE`, and the default bench's `families`
//! part on sets made in ClassBench's shapes: the first 10, 1,000, 10,000
//! and 16,384 rules of a filter set, each timed on the same frames
//! of its trace, grouped by what the largest set decides for them: early
//! (one of its first 10 rules), late (a rule in its second half) or no
//! rule; beside xdp-filter holding the 10-rule set. Ratios to 10 rules are
//! taken per round.

use std::path::Path;

use anyhow::{Context as _, bail};
use aya::programs::Xdp;
use filter_agent::{kernel::loader::time_program, oracle::reference, rules::config::Config};
use filter_common::{Outcome, reason};
use rand::{SeedableRng as _, rngs::StdRng};

use crate::{
    classbench, families,
    loop_model::{self, Visits},
    options::Options,
    peer::XdpFilter,
    rule_sets::{Loaded, load_rule_set},
    timing::{Measured, Quartiles, Rounds, Subject, filter_timer, measure},
};

/// Frames of each group, at most: the first of the trace.
const GROUP_FRAMES: usize = 60;
/// The groups, in the table's order.
const GROUPS: [&str; 3] = ["early", "late", "unmatched"];

/// One size's row, or xdp-filter's (`rules` 0).
#[derive(serde::Serialize)]
pub(crate) struct WorstRow {
    pub(crate) rules: usize,
    pub(crate) receiver: &'static str,
    /// Per group (early, late, unmatched); none where the trace had no frame.
    pub(crate) ns: [Option<Measured>; 3],
    /// Per group, this row over the 10-rule row, per round.
    pub(crate) vs_smallest: [Option<Quartiles>; 3],
    /// Per group, what the program's loop visits (filter-agent's rows).
    pub(crate) visits: [Option<Visits>; 3],
}

/// Reads the set and the trace, times every size and prints the table.
pub(crate) fn run(options: &Options, rules: &Path, trace: &Path) -> anyhow::Result<Vec<WorstRow>> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let set = classbench::filter_set(&read(rules)?).context(rules.display().to_string())?;
    let frames = classbench::trace(&read(trace)?).context(trace.display().to_string())?;
    println!(
        "{}: {} rules ({} lines the rules file cannot say, left out); {}: {} frames",
        rules.display(),
        set.config.rules.len(),
        set.skipped,
        trace.display(),
        frames.len()
    );
    table(options, &set.config, frames)
}

/// One family's table (families.rs).
#[derive(serde::Serialize)]
pub(crate) struct FamilyRows {
    pub(crate) family: &'static str,
    pub(crate) rows: Vec<WorstRow>,
}

/// The table for a set of each ClassBench family's shape, made here, and
/// a trace made from it.
pub(crate) fn run_families(options: &Options) -> anyhow::Result<Vec<FamilyRows>> {
    families::FAMILIES
        .iter()
        .enumerate()
        .map(|(seed, &(family, profile))| {
            let mut rng = StdRng::seed_from_u64(seed as u64);
            let config = families::filter_set(&mut rng, profile, families::FAMILY_RULES);
            let frames = families::trace(&mut rng, &config, families::FAMILY_RULES);
            println!(
                "\n{family}-shaped set (made here): {} rules",
                config.rules.len()
            );
            let rows = table(options, &config, frames)?;
            Ok(FamilyRows { family, rows })
        })
        .collect()
}

/// Times the first 10, 1,000, 10,000 and 16,384 rules of `set` (or
/// `--sizes`) on `frames` and prints the table.
fn table(options: &Options, set: &Config, frames: Vec<Vec<u8>>) -> anyhow::Result<Vec<WorstRow>> {
    let count = set.rules.len();
    let mut sizes: Vec<usize> = options
        .sizes
        .clone()
        .unwrap_or_else(|| vec![10, 1_000, 10_000, 16_384])
        .into_iter()
        .map(|size| size.min(count))
        .collect();
    sizes.dedup();
    let largest = *sizes.last().context("no sizes")?;
    let mut full = set.clone();
    full.rules.truncate(largest);
    let groups = group(&full, frames);
    let every: Vec<Vec<u8>> = groups.iter().flatten().cloned().collect();
    let loaded = sizes
        .iter()
        .map(|&size| load_rule_set(set, size, [&every, &[]]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let peer = match XdpFilter::load(&loaded[0].config) {
        Ok(peer) => Some(peer),
        Err(err) if options.require_peer => return Err(err.context("the peer, xdp-filter")),
        Err(err) => {
            eprintln!("xdp-filter not measured: {err:#}");
            None
        }
    };
    let rounds = time(options, &loaded, peer.as_ref().map(|(_, xdp)| xdp), &groups)?;
    let visits = loaded
        .iter()
        .map(|set| model(set, &groups))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(report(&loaded, peer.is_some(), &rounds, &visits))
}

/// The loop model's counts for one size's groups.
fn model(set: &Loaded, groups: &[Vec<Vec<u8>>; 3]) -> anyhow::Result<[Option<Visits>; 3]> {
    let mut visits = [None; 3];
    for (visits, frames) in visits.iter_mut().zip(groups) {
        if !frames.is_empty() {
            let counted = loop_model::visits(&set.rule_set, &set.config, frames);
            *visits = Some(counted.with_context(|| format!("{} rules", set.size))?);
        }
    }
    Ok(visits)
}

/// The trace's frames by what `config` decides: early, late, unmatched.
fn group(config: &Config, frames: Vec<Vec<u8>>) -> [Vec<Vec<u8>>; 3] {
    let rules = config.rules.len();
    let mut groups: [Vec<Vec<u8>>; 3] = Default::default();
    for frame in frames {
        let index = match reference::classify(config, &frame).0 {
            Outcome::Rule(rule) if rule < 10 => 0,
            Outcome::Rule(rule) if rule >= rules / 2 => 1,
            Outcome::Reason(reason::DEFAULT_ALLOW) => 2,
            _ => continue,
        };
        if groups[index].len() < GROUP_FRAMES {
            groups[index].push(frame);
        }
    }
    groups
}

/// Rounds per (row, group), rows as in `loaded` then xdp-filter.
fn time(
    options: &Options,
    loaded: &[Loaded],
    peer: Option<&Xdp>,
    groups: &[Vec<Vec<u8>>; 3],
) -> anyhow::Result<Vec<[Option<Rounds>; 3]>> {
    let repeat = options.repeat;
    let mut subjects: Vec<Subject<'_>> = Vec::new();
    for set in loaded {
        for frames in groups.iter().filter(|frames| !frames.is_empty()) {
            subjects.push(Subject {
                frames,
                time: filter_timer(&set.filter, repeat),
            });
        }
    }
    if let Some(xdp) = peer {
        for frames in groups.iter().filter(|frames| !frames.is_empty()) {
            subjects.push(Subject {
                frames,
                time: Box::new(move |frame| Ok(time_program(xdp, frame, repeat)?)),
            });
        }
    }
    if subjects.is_empty() {
        bail!("the trace has no frame decided early, late or by no rule");
    }
    let mut measured = measure(options.runs, &subjects)?.into_iter();
    let rows = loaded.len() + usize::from(peer.is_some());
    Ok((0..rows)
        .map(|_| {
            let mut row: [Option<Rounds>; 3] = Default::default();
            for (group, frames) in groups.iter().enumerate() {
                if !frames.is_empty() {
                    row[group] = measured.next();
                }
            }
            row
        })
        .collect())
}

/// The rows, printed as a table, then the loop model's counts.
fn report(
    loaded: &[Loaded],
    peer: bool,
    rounds: &[[Option<Rounds>; 3]],
    visits: &[[Option<Visits>; 3]],
) -> Vec<WorstRow> {
    println!(
        "{:>7} {:>11} | {:>28} | {:>28} | {:>28}",
        "rules", "", GROUPS[0], GROUPS[1], GROUPS[2]
    );
    let smallest = &rounds[0];
    let receivers = loaded
        .iter()
        .map(|set| (set.size, "filter-agent"))
        .chain(peer.then_some((loaded[0].size, "xdp-filter")));
    let mut rows = Vec::new();
    for ((rules, receiver), row) in receivers.zip(rounds) {
        let ns = row.each_ref().map(|r| r.as_ref().map(Rounds::summary));
        let vs_smallest = std::array::from_fn(|group| {
            let (row, base) = (row[group].as_ref()?, smallest[group].as_ref()?);
            Some(row.paired(base, |a, b| a / b))
        });
        let cells: Vec<String> = (0..3)
            .map(|group| match (ns[group], vs_smallest[group]) {
                (Some(ns), Some(ratio)) => format!("{ns} {:.2}x", ratio.median),
                _ => "-".to_owned(),
            })
            .collect();
        println!(
            "{rules:>7} {receiver:>11} | {:>28} | {:>28} | {:>28}",
            cells[0], cells[1], cells[2]
        );
        rows.push(WorstRow {
            rules,
            receiver,
            ns,
            vs_smallest,
            visits: visits.get(rows.len()).copied().unwrap_or_default(),
        });
    }
    print_visits(loaded, visits);
    rows
}

/// Per size and group: the share of frames the pair summary ends, then
/// chunks entered and words ANDed per frame.
fn print_visits(loaded: &[Loaded], visits: &[[Option<Visits>; 3]]) {
    println!("  loop model, per frame: ended at the pair summary, chunks, words");
    for (set, row) in loaded.iter().zip(visits) {
        let cells: Vec<String> = row
            .iter()
            .map(|visits| match visits {
                Some(v) => format!(
                    "{:.0}% {:.2} {:.2}",
                    v.ended_at_pair * 100.0,
                    v.chunks,
                    v.words
                ),
                None => "-".to_owned(),
            })
            .collect();
        println!(
            "{:>7} {:>11} | {:>28} | {:>28} | {:>28}",
            set.size, "", cells[0], cells[1], cells[2]
        );
    }
}
