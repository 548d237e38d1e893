//! `cargo xtask bench`: ns/packet of the real program (BPF_PROG_TEST_RUN)
//! for ClassBench-like rule sets of growing size on a SYN mix and a return
//! mix, side by side with xdp-filter (Debian's xdp-tools) on the same
//! frames, in one run (rule_sets.rs); rate limits under a flood
//! (limits.rs); address sets against the kernel LPM trie (lookup, memory,
//! file to kernel, a swap under live traffic: sets.rs, stall.rs); early,
//! late and unmatched frames on sets of ClassBench's acl, fw and ipc
//! shapes (families.rs, worst_case.rs).
//!
//! With `--live`, whole-path cost with live packets against nftables,
//! iptables and ipset instead (live.rs). `bench --help` lists the options.

mod classbench;
mod families;
mod limits;
mod live;
mod loop_model;
mod options;
mod peer;
mod rule_sets;
mod sets;
mod stall;
mod timing;
mod workload;
mod worst_case;

use clap::Parser as _;
use filter_agent::{
    kernel::loader::{Filter, LoadOptions},
    rules::compile::RuleSet,
};
use options::Part;
use rand::{SeedableRng, rngs::StdRng};

/// The whole JSON report of one run.
#[derive(serde::Serialize)]
struct Report {
    #[serde(flatten)]
    rule_sets: Option<rule_sets::RuleSetsReport>,
    limits: Vec<limits::LimitRow>,
    sets: Vec<sets::SetRow>,
    /// Replacing the largest IPv4 set under live traffic.
    stall: Option<stall::StallRow>,
    /// Early, late and unmatched frames on sets of each ClassBench family's shape.
    families: Vec<worst_case::FamilyRows>,
}

/// The `empty` and `lpm` reference programs (filter-ebpf/src/baseline.rs).
pub(crate) static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));

/// Loads `rules` as the agent runs them by default: events on, at the
/// default rate (drops pay for the rate-limit check).
pub(crate) fn load(rules: &RuleSet) -> anyhow::Result<Filter> {
    let options = LoadOptions {
        event_rate: filter_common::event::DEFAULT_RATE,
        ..LoadOptions::default()
    };
    Ok(Filter::load_with(rules, &options)?)
}

fn main() -> anyhow::Result<()> {
    let options = options::Options::parse();
    if options.live {
        return live(options);
    }
    timing::pin_to_cpu(0);
    if let (Some(rules), Some(trace)) = (&options.classbench, &options.trace) {
        let rows = worst_case::run(&options, rules, trace)?;
        if let Some(path) = &options.json {
            let report = serde_json::json!({ "classbench": rows });
            std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
            println!("written to {}", path.display());
        }
        return Ok(());
    }
    // One seed, drawn from in this order: the figures of two runs compare.
    let mut rng = StdRng::seed_from_u64(7);
    let rule_sets = if options.measures(Part::RuleSets) {
        Some(rule_sets::run(&options, &mut rng)?)
    } else {
        None
    };
    let limits = if options.measures(Part::Limits) {
        limits::run(&options, &mut rng)?
    } else {
        Vec::new()
    };
    let (sets, stall) = if options.measures(Part::Sets) {
        sets::run(&options, &mut rng)?
    } else {
        (Vec::new(), None)
    };
    let families = if options.measures(Part::Families) {
        worst_case::run_families(&options)?
    } else {
        Vec::new()
    };
    let report = Report {
        rule_sets,
        limits,
        sets,
        stall,
        families,
    };
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("written to {}", path.display());
    }
    Ok(())
}

/// `--live`.
fn live(options: options::Options) -> anyhow::Result<()> {
    live::run(&live::LiveOptions {
        runs: options.runs,
        seconds: options.seconds,
        sizes: options.sizes.unwrap_or_else(|| vec![1, 100, 1_000, 10_000]),
        json: options.json,
    })
}
