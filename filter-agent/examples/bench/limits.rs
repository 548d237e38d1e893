//! Rate limits: per rule, and per source with every packet from a new
//! source (IPv4 and IPv6), each beside the same rule without a limit.

use filter_agent::{
    rules::compile::compile,
    rules::config::{Action, DEFAULT_LIMIT_SOURCES, Limit},
};
use rand::rngs::StdRng;

use crate::{
    load,
    options::Options,
    timing::{Measured, Quartiles, Subject, measure},
    workload,
};

/// One line of the rate-limit table.
#[derive(serde::Serialize)]
pub(crate) struct LimitRow {
    pub(crate) rule: String,
    /// `[filter] limit_sources`.
    pub(crate) buckets: u32,
    pub(crate) ns_per_packet: Measured,
    /// Per round, this row over the row it is compared with.
    pub(crate) vs_unlimited: Option<Quartiles>,
}

/// Frames of each flood: SYNs to port 80, each from a random source.
pub(crate) const FLOOD_FRAMES: usize = 100_000;

/// Larger bucket tables the IPv4 flood is also timed with: the cost of a
/// flood is the bucket it misses in the cache.
const LARGER_TABLES: [u32; 2] = [65_536, 262_144];

/// One row: the public rule as `action` with `limit` and `buckets`, timed
/// on `frames`, each repeated `repeat` times; `baseline` is the row it is
/// compared with.
struct LimitCase<'a> {
    rule: String,
    limit: Option<Limit>,
    action: Action,
    buckets: u32,
    frames: &'a [Vec<u8>],
    repeat: u32,
    baseline: Option<usize>,
}

/// The limits the rows use: 1,000/s for the rule, and 100/s per /32 or
/// /64 source.
pub(crate) fn limits() -> (Limit, Limit) {
    let rule_wide = Limit {
        packets: 1_000,
        per_ns: 1_000_000_000,
        burst: 100,
        per_source: None,
    };
    let per_source = Limit {
        packets: 100,
        burst: 10,
        per_source: Some((32, 64)),
        ..rule_wide
    };
    (rule_wide, per_source)
}

/// The rows. The kernel repeats a frame, not a source, so the rows on
/// `sample` time each frame `repeat` times; a flood (every packet a new
/// source, every bucket taken after the first round) takes one
/// BPF_PROG_TEST_RUN per frame, beside the unlimited rule timed the same
/// way (which shows that way's overhead).
fn cases<'a>(
    sample: &'a [Vec<u8>],
    floods: &'a [Vec<Vec<u8>>; 2],
    repeat: u32,
) -> Vec<LimitCase<'a>> {
    let (rule_wide, per_source) = limits();
    let (allow, deny) = (Action::Allow, Action::Deny);
    let case = |rule: &str, limit, action, frames, repeat, baseline| LimitCase {
        rule: rule.to_string(),
        limit,
        action,
        buckets: DEFAULT_LIMIT_SOURCES,
        frames,
        repeat,
        baseline,
    };
    let mut cases = vec![
        case("no limit", None, allow, sample, repeat, None),
        case(
            "no limit, action deny (the cost of a drop)",
            None,
            deny,
            sample,
            repeat,
            Some(0),
        ),
        case(
            "limit 1000/s, the flood over it",
            Some(rule_wide),
            allow,
            sample,
            repeat,
            Some(0),
        ),
        case(
            "per-source /32, a known source",
            Some(per_source),
            allow,
            sample,
            repeat,
            Some(0),
        ),
    ];
    for (flood, (family, prefix)) in floods.iter().zip([("IPv4", 32), ("IPv6", 64)]) {
        let unlimited = cases.len();
        let row = format!("{family} flood, no limit, one run per packet");
        cases.push(case(&row, None, allow, flood, 1, None));
        let row = format!("{family} flood, per-source /{prefix}, each packet new");
        cases.push(case(
            &row,
            Some(per_source),
            allow,
            flood,
            1,
            Some(unlimited),
        ));
    }
    for buckets in LARGER_TABLES {
        let row = format!("IPv4 flood, per-source /32, {buckets} buckets");
        let mut larger = case(&row, Some(per_source), allow, &floods[0], 1, Some(4));
        larger.buckets = buckets;
        cases.push(larger);
    }
    cases
}

/// Measures the rate-limit rows.
pub(crate) fn measure_limits(options: &Options, rng: &mut StdRng) -> anyhow::Result<Vec<LimitRow>> {
    let floods = [
        workload::syn_flood(rng, FLOOD_FRAMES, false),
        workload::syn_flood(rng, FLOOD_FRAMES, true),
    ];
    let cases = cases(&floods[0][..60], &floods, options.repeat);
    let filters = cases
        .iter()
        .map(|case| {
            let mut config = workload::public_service(case.limit, case.buckets);
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
        .zip(&measured)
        .map(|(case, rounds)| LimitRow {
            rule: case.rule.clone(),
            buckets: case.buckets,
            ns_per_packet: rounds.summary(),
            vs_unlimited: case
                .baseline
                .map(|baseline| rounds.paired(&measured[baseline], |row, base| row / base)),
        })
        .collect())
}

/// Measures the rate-limit rows and prints them.
pub(crate) fn run(options: &Options, rng: &mut StdRng) -> anyhow::Result<Vec<LimitRow>> {
    let limits = measure_limits(options, rng)?;
    println!(
        "\nrate limits, one public TCP rule under a random-source SYN flood \
         ({FLOOD_FRAMES} frames a flood; {DEFAULT_LIMIT_SOURCES} per-source buckets unless named)"
    );
    for row in &limits {
        let ratio = row.vs_unlimited.map_or(String::new(), |q| {
            format!("  {:.2}x ({:.2}-{:.2})", q.median, q.low, q.high)
        });
        println!("  {:<48} {:>15} ns{ratio}", row.rule, row.ns_per_packet);
    }
    Ok(limits)
}
