//! The rule-set rows: ClassBench-like lists of growing size on a SYN mix
//! and a return mix, beside xdp-filter, the empty program, the guard off
//! and events off. Set up, measured and reported apart.

use std::time::Instant;

use anyhow::{Context as _, bail};
use aya::programs::Xdp;
use filter_agent::{
    kernel::loader::{Filter, time_program},
    oracle::reference,
    rules::compile::{RuleSet, compile},
    rules::config::{Action, Config, GuardAction},
};
use rand::rngs::StdRng;

use crate::{
    BASELINE_OBJECT, load,
    options::Options,
    peer::XdpFilter,
    timing::{Measured, Quartiles, Rounds, Subject, filter_timer, measure},
    workload::{self, Addresses},
};

/// Frames in each mix.
pub(crate) const MIX_FRAMES: usize = 60;

/// One line of the table, as written to the JSON file.
#[derive(serde::Serialize)]
pub(crate) struct Row {
    rules: usize,
    /// The rule set's own mix (early rule, late rule, no rule; mostly SYNs).
    syn_mix: Measured,
    /// Replies (TCP ACKs from 443) to random ports, in and out of the range.
    return_mix: Measured,
    xdp_filter_syn_mix: Option<Measured>,
    xdp_filter_return_mix: Option<Measured>,
    /// Ratios per round: to xdp-filter, to the smallest rule set.
    vs_xdp_filter_syn_mix: Option<Quartiles>,
    vs_xdp_filter_return_mix: Option<Quartiles>,
    vs_smallest_syn_mix: Quartiles,
    vs_smallest_return_mix: Quartiles,
    /// Frames of each mix the rules drop (a drop costs more: the event
    /// budget), of `MIX_FRAMES`.
    dropped_syn_mix: usize,
    dropped_return_mix: usize,
    map_bytes: usize,
    compile_apply_ms: f64,
}

/// The rule-set part of the JSON report.
#[derive(serde::Serialize)]
pub(crate) struct RuleSetsReport {
    empty_program: Measured,
    /// The smallest rule set with `[guard] action = "off"`, on each mix.
    guard_off_syn_mix: Measured,
    guard_off_return_mix: Measured,
    /// Guard on minus off, per round (ns).
    guard_cost_syn_mix: Quartiles,
    guard_cost_return_mix: Quartiles,
    /// The smallest rule set with event sampling off.
    events_off: Measured,
    rules: Vec<Row>,
}

/// A rule set loaded for measurement.
pub(crate) struct Loaded {
    pub(crate) size: usize,
    pub(crate) config: Config,
    pub(crate) filter: Filter,
    /// What was loaded (the worst-case tables' loop model walks it).
    pub(crate) rule_set: RuleSet,
    /// Frames of each mix the rule set drops (of `MIX_FRAMES`).
    dropped: [usize; 2],
    apply_ms: f64,
}

/// The first `size` rules of `list`, loaded; checked against the
/// reference on both `mixes`.
pub(crate) fn load_rule_set(
    list: &Config,
    size: usize,
    mixes: [&[Vec<u8>]; 2],
) -> anyhow::Result<Loaded> {
    let mut config = list.clone();
    config.rules.truncate(size);
    let started = Instant::now();
    let rule_set = compile(&config)?;
    let filter = load(&rule_set)?;
    let apply_ms = started.elapsed().as_secs_f64() * 1e3;
    // The benchmark is only meaningful if the program decides right.
    let mut dropped = [0; 2];
    for (frames, dropped) in mixes.iter().zip(&mut dropped) {
        for frame in frames.iter() {
            let (outcome, action) = reference::classify(&config, frame);
            let (_, got) = filter.classify_frame(frame)?;
            if got != outcome {
                bail!("{size} rules: kernel says {got:?}, reference {outcome:?}");
            }
            *dropped += usize::from(action == Action::Deny);
        }
    }
    Ok(Loaded {
        size,
        config,
        filter,
        dropped,
        rule_set,
        apply_ms,
    })
}

/// Everything the rows time, loaded.
struct Setup {
    loaded: Vec<Loaded>,
    syn_mix: Vec<Vec<u8>>,
    replies: Vec<Vec<u8>>,
    /// xdp-filter with the smallest set's exact-match entries.
    peer: Option<(XdpFilter, Xdp)>,
    /// The smallest set without the guard, and without event sampling.
    unguarded: Filter,
    quiet: Filter,
    /// Holds the empty reference program.
    baseline: aya::Ebpf,
}

/// One ClassBench list, each size its first rules: a frame that a smaller
/// set decides by a rule is decided by the same rule in every larger one.
/// All sizes are timed on the same frames: the SYN mix of the whole list,
/// and replies.
fn set_up(options: &Options, rng: &mut StdRng) -> anyhow::Result<Setup> {
    let sizes = options
        .sizes
        .clone()
        .unwrap_or_else(|| vec![10, 100, 1_000, 10_000]);
    let largest = sizes.iter().copied().max().context("no rule-set sizes")?;
    let list = workload::rule_set(rng, largest, Addresses::ClassBench);
    let syn_mix = workload::packet_mix(rng, &list, MIX_FRAMES);
    let replies = workload::return_traffic(rng, MIX_FRAMES);
    let loaded = sizes
        .iter()
        .map(|&size| load_rule_set(&list, size, [&syn_mix, &replies]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let first = &loaded[0].config;
    let peer = match XdpFilter::load(first) {
        Ok(peer) => Some(peer),
        Err(err) if options.require_peer => return Err(err.context("the peer, xdp-filter")),
        Err(err) => {
            eprintln!("xdp-filter not measured: {err:#}");
            None
        }
    };
    let mut unguarded = first.clone();
    unguarded.guard.action = GuardAction::Off;
    let unguarded = load(&compile(&unguarded)?)?;
    // `--events-per-second 0`.
    let quiet = Filter::load(&compile(first)?)?;
    let mut baseline = aya::Ebpf::load(BASELINE_OBJECT)?;
    let empty: &mut Xdp = baseline
        .program_mut("empty")
        .context("empty program")?
        .try_into()?;
    empty.load()?;
    Ok(Setup {
        loaded,
        syn_mix,
        replies,
        peer,
        unguarded,
        quiet,
        baseline,
    })
}

/// The rounds of every subject, by name.
struct Timings {
    /// Per rule set: (SYN mix, return mix).
    sets: Vec<(Rounds, Rounds)>,
    empty: Rounds,
    guard_off: (Rounds, Rounds),
    events_off: Rounds,
    peer: Option<(Rounds, Rounds)>,
}

fn time(setup: &Setup, options: &Options) -> anyhow::Result<Timings> {
    let repeat = options.repeat;
    let (syn_mix, replies) = (&setup.syn_mix[..], &setup.replies[..]);
    let empty: &Xdp = setup
        .baseline
        .program("empty")
        .context("empty program")?
        .try_into()?;
    let mut subjects: Vec<Subject<'_>> = Vec::new();
    let mut add = |frames, time| subjects.push(Subject { frames, time });
    for set in &setup.loaded {
        add(syn_mix, filter_timer(&set.filter, repeat));
        add(replies, filter_timer(&set.filter, repeat));
    }
    add(
        syn_mix,
        Box::new(|frame| Ok(time_program(empty, frame, repeat)?)),
    );
    add(syn_mix, filter_timer(&setup.unguarded, repeat));
    add(replies, filter_timer(&setup.unguarded, repeat));
    add(syn_mix, filter_timer(&setup.quiet, repeat));
    if let Some((_, program)) = &setup.peer {
        for frames in [syn_mix, replies] {
            add(
                frames,
                Box::new(|frame| Ok(time_program(program, frame, repeat)?)),
            );
        }
    }
    // Taken in the order they were added.
    let mut rounds = measure(options.runs, &subjects)?.into_iter();
    let mut next = || rounds.next().context("a subject was not measured");
    let mut sets = Vec::new();
    for _ in &setup.loaded {
        sets.push((next()?, next()?));
    }
    Ok(Timings {
        sets,
        empty: next()?,
        guard_off: (next()?, next()?),
        events_off: next()?,
        peer: match setup.peer {
            Some(_) => Some((next()?, next()?)),
            None => None,
        },
    })
}

/// Measures the rule-set rows and prints their table and summaries.
pub(crate) fn run(options: &Options, rng: &mut StdRng) -> anyhow::Result<RuleSetsReport> {
    let setup = set_up(options, rng)?;
    let timings = time(&setup, options)?;
    let rows = rows(&setup.loaded, &timings);
    let (smallest_syn, smallest_reply) = &timings.sets[0];
    let report = RuleSetsReport {
        empty_program: timings.empty.summary(),
        guard_off_syn_mix: timings.guard_off.0.summary(),
        guard_off_return_mix: timings.guard_off.1.summary(),
        guard_cost_syn_mix: smallest_syn.paired(&timings.guard_off.0, |a, b| a - b),
        guard_cost_return_mix: smallest_reply.paired(&timings.guard_off.1, |a, b| a - b),
        events_off: timings.events_off.summary(),
        rules: rows,
    };
    print_summary(&report, setup.loaded[0].size);
    Ok(report)
}

/// The table's rows, printed as they are made.
fn rows(loaded: &[Loaded], timings: &Timings) -> Vec<Row> {
    println!(
        "{:>7} | {:>15} {:>13} {:>6} | {:>15} {:>13} {:>6} | {:>8} {:>10}",
        "rules",
        "SYN mix ns",
        "xdp-filter",
        "ratio",
        "replies ns",
        "xdp-filter",
        "ratio",
        "map MiB",
        "apply ms"
    );
    let ratio = |a: f64, b: f64| a / b;
    let (smallest_syn, smallest_reply) = &timings.sets[0];
    let shown =
        |rounds: Option<&Rounds>| rounds.map_or("-".to_owned(), |r| r.summary().to_string());
    let shown_ratio =
        |ratio: Option<Quartiles>| ratio.map_or("-".to_owned(), |r| format!("{:.2}x", r.median));
    let mut rows = Vec::new();
    for (index, (set, (syn, reply))) in loaded.iter().zip(&timings.sets).enumerate() {
        // xdp-filter holds the smallest set's entries only.
        let peer = timings.peer.as_ref().filter(|_| index == 0);
        let vs_peer_syn = peer.map(|(peer_syn, _)| syn.paired(peer_syn, ratio));
        let vs_peer_reply = peer.map(|(_, peer_reply)| reply.paired(peer_reply, ratio));
        println!(
            "{:>7} | {:>15} {:>13} {:>6} | {:>15} {:>13} {:>6} | {:>8.2} {:>10.1}",
            set.size,
            syn.summary().to_string(),
            shown(peer.map(|p| &p.0)),
            shown_ratio(vs_peer_syn),
            reply.summary().to_string(),
            shown(peer.map(|p| &p.1)),
            shown_ratio(vs_peer_reply),
            set.rule_set.map_bytes() as f64 / (1 << 20) as f64,
            set.apply_ms
        );
        rows.push(Row {
            rules: set.size,
            syn_mix: syn.summary(),
            return_mix: reply.summary(),
            xdp_filter_syn_mix: peer.map(|p| p.0.summary()),
            xdp_filter_return_mix: peer.map(|p| p.1.summary()),
            vs_xdp_filter_syn_mix: vs_peer_syn,
            vs_xdp_filter_return_mix: vs_peer_reply,
            vs_smallest_syn_mix: syn.paired(smallest_syn, ratio),
            vs_smallest_return_mix: reply.paired(smallest_reply, ratio),
            dropped_syn_mix: set.dropped[0],
            dropped_return_mix: set.dropped[1],
            map_bytes: set.rule_set.map_bytes(),
            compile_apply_ms: set.apply_ms,
        });
    }
    rows
}

/// The lines under the table: largest vs smallest, drops, and the costs
/// of BPF_PROG_TEST_RUN itself, the guard and events.
fn print_summary(report: &RuleSetsReport, first_size: usize) {
    let (smallest, largest) = (&report.rules[0], &report.rules[report.rules.len() - 1]);
    let quartiles =
        |q: &Quartiles, unit: &str| format!("{:.2}{unit} ({:.2}-{:.2})", q.median, q.low, q.high);
    println!(
        "{} vs {} rules, per round (median, quartiles): {} on the SYN mix, {} on the return mix",
        largest.rules,
        smallest.rules,
        quartiles(&largest.vs_smallest_syn_mix, "x"),
        quartiles(&largest.vs_smallest_return_mix, "x"),
    );
    let dropped: Vec<String> = report
        .rules
        .iter()
        .map(|row| {
            format!(
                "{} rules {}, {}",
                row.rules, row.dropped_syn_mix, row.dropped_return_mix
            )
        })
        .collect();
    println!(
        "frames dropped of {MIX_FRAMES} (SYN mix, return mix): {}",
        dropped.join("; ")
    );
    println!(
        "empty XDP program (the cost of BPF_PROG_TEST_RUN itself): {}",
        report.empty_program
    );
    println!(
        "guard on (above) vs off, {first_size} rules: SYN mix {} vs {}; return mix {} vs {}; \
         per round: {} ns (SYN), {} ns (return)",
        smallest.syn_mix,
        report.guard_off_syn_mix,
        smallest.return_mix,
        report.guard_off_return_mix,
        quartiles(&report.guard_cost_syn_mix, ""),
        quartiles(&report.guard_cost_return_mix, ""),
    );
    println!(
        "events on (above, the default 100/s per CPU) vs off, {first_size} rules: {} vs {}",
        smallest.syn_mix, report.events_off
    );
}
