//! Rate limits: per rule and per source, with every packet from a new
//! source.

use filter_agent::{
    rules::compile::compile,
    rules::config::{Action, Limit},
};
use rand::rngs::StdRng;

use crate::{
    load,
    options::Options,
    timing::{Measured, Subject, measure},
    workload,
};

/// One line of the rate-limit table.
#[derive(serde::Serialize)]
pub(crate) struct LimitRow {
    pub(crate) rule: &'static str,
    pub(crate) ns_per_packet: Measured,
}

/// Frames of the rate-limit rows: SYNs to port 80 from random sources.
pub(crate) const FLOOD_FRAMES: usize = 100_000;

/// The same public-service rule without a limit, with a rule-wide limit
/// the flood is far over, and with a per-source limit, on a random-source
/// SYN flood. The kernel repeats a frame, not a source, so the rows of a
/// source the table already holds repeat each frame; the churning flood
/// (every packet a new source, inserted into the full 65,536-entry table,
/// evicting another) takes one BPF_PROG_TEST_RUN per frame, beside the
/// unlimited rule timed the same way (which shows that way's overhead).
pub(crate) fn measure_limits(options: &Options, rng: &mut StdRng) -> anyhow::Result<Vec<LimitRow>> {
    let second = 1_000_000_000;
    let rule_wide = Limit {
        packets: 1_000,
        per_ns: second,
        burst: 100,
        per_source: None,
    };
    let per_source = Limit {
        packets: 100,
        burst: 10,
        per_source: Some((32, 64)),
        ..rule_wide
    };
    let sources = filter_agent::rules::config::DEFAULT_LIMIT_SOURCES;
    let flood = workload::syn_flood(rng, FLOOD_FRAMES);
    let sample = &flood[..60];
    let repeat = options.repeat;
    let cases = cases(rule_wide, per_source, sample, &flood, repeat);
    let filters = cases
        .iter()
        .map(|case| {
            let mut config = workload::public_service(case.limit, sources);
            config.rules[0].action = case.action;
            load(&compile(&config)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let subjects: Vec<Subject<'_>> = cases
        .iter()
        .zip(&filters)
        .map(|(case, filter)| Subject {
            frames: case.frames,
            time: Box::new(move |frame| Ok(filter.time_packet(frame, case.repeat)?)),
        })
        .collect();
    let measured = measure(options.runs, &subjects)?;
    Ok(cases
        .iter()
        .zip(measured)
        .map(|(case, rounds)| LimitRow {
            rule: case.rule,
            ns_per_packet: rounds.summary(),
        })
        .collect())
}

/// The rows: the public rule without a limit (allowing, and denying), with
/// a rule-wide one, with a per-source one for a known source; and, one
/// run per packet, without a limit and per source with every packet new.
fn cases<'a>(
    rule_wide: Limit,
    per_source: Limit,
    sample: &'a [Vec<u8>],
    flood: &'a [Vec<u8>],
    repeat: u32,
) -> [LimitCase<'a>; 6] {
    let case = |rule, limit, action, frames, repeat| LimitCase {
        rule,
        limit,
        action,
        frames,
        repeat,
    };
    let (allow, deny) = (Action::Allow, Action::Deny);
    [
        case("no limit", None, allow, sample, repeat),
        case(
            "no limit, action deny (the cost of a drop)",
            None,
            deny,
            sample,
            repeat,
        ),
        case(
            "limit 1000/s, the flood over it",
            Some(rule_wide),
            allow,
            sample,
            repeat,
        ),
        case(
            "per-source /32, a known source",
            Some(per_source),
            allow,
            sample,
            repeat,
        ),
        case("no limit, one run per packet", None, allow, flood, 1),
        case(
            "per-source /32, each packet a new source",
            Some(per_source),
            allow,
            flood,
            1,
        ),
    ]
}

/// One row of the rate-limit table: the public rule as `action` with
/// `limit`, timed on `frames`, each repeated `repeat` times.
pub(crate) struct LimitCase<'a> {
    pub(crate) rule: &'static str,
    pub(crate) limit: Option<Limit>,
    pub(crate) action: Action,
    pub(crate) frames: &'a [Vec<u8>],
    pub(crate) repeat: u32,
}

/// Measures the rate-limit rows and prints them.
pub(crate) fn run(options: &Options, rng: &mut StdRng) -> anyhow::Result<Vec<LimitRow>> {
    let limits = measure_limits(options, rng)?;
    println!(
        "\nrate limits, one public TCP rule under a random-source SYN flood \
         ({FLOOD_FRAMES} frames, {} sources in the per-source table)",
        filter_agent::rules::config::DEFAULT_LIMIT_SOURCES
    );
    for row in &limits {
        println!("  {:<44} {:>15} ns", row.rule, row.ns_per_packet);
    }
    Ok(limits)
}
