//! `cargo xtask bench`: ns/packet of the real program (BPF_PROG_TEST_RUN)
//! for ClassBench-like rule sets of growing size on a SYN mix and a return
//! mix, side by side with xdp-filter (Debian's xdp-tools) on the same
//! frames, in one run; address sets against the kernel LPM trie (lookup,
//! memory, file to kernel, a swap under live traffic: stall.rs).
//!
//! With `--live`, whole-path cost with live packets against nftables,
//! iptables and ipset instead (see live.rs).
//!
//! Usage: bench [--runs N] [--repeat N] [--json PATH] [--sizes 10,100,...]
//!              [--set-sizes 100000,...] [--v6-set-sizes 200000,...]
//!        bench --live [--runs N] [--seconds S] [--json PATH] [--sizes 1,100,...]

mod limits;
mod live;
mod options;
mod peer;
mod sets;
mod stall;
mod timing;
mod workload;

use std::{path::Path, time::Instant};

use anyhow::{Context as _, bail};
use aya::programs::Xdp;
use filter_agent::{
    kernel::loader::{Filter, LoadOptions, time_program},
    oracle::reference,
    rules::compile::{RuleSet, compile},
    rules::config::geoip,
    rules::config::{Action, Config, GuardAction},
};
use ipnet::IpNet;
use limits::{FLOOD_FRAMES, LimitRow, measure_limits};
use options::options;
use peer::XdpFilter;
use rand::{SeedableRng, rngs::StdRng};
use sets::{SetRow, measure_set};
use timing::{Measured, Quartiles, Rounds, Subject, filter_timer, measure, pin_to_cpu};
use workload::Addresses;

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

#[derive(serde::Serialize)]
pub(crate) struct Report {
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
    limits: Vec<LimitRow>,
    sets: Vec<SetRow>,
    /// Replacing the largest IPv4 set under live traffic.
    stall: Option<stall::StallRow>,
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

/// A rule set loaded for measurement.
pub(crate) struct Loaded {
    size: usize,
    config: Config,
    filter: Filter,
    /// Frames of each mix the rule set drops (of `MIX_FRAMES`).
    dropped: [usize; 2],
    map_bytes: usize,
    apply_ms: f64,
}

/// Frames in each mix.
pub(crate) const MIX_FRAMES: usize = 60;

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
        map_bytes: rule_set.map_bytes(),
        apply_ms,
    })
}

/// The exit code of a run that could not measure anything on this kernel
/// (automake's "skipped").
const SKIPPED: u8 = 77;

fn main() -> anyhow::Result<std::process::ExitCode> {
    let options = options()?;
    if options.live {
        let live = live::run(&live::LiveOptions {
            runs: options.runs,
            seconds: options.seconds,
            sizes: options.sizes.unwrap_or_else(|| vec![1, 100, 1_000, 10_000]),
            json: options.json,
        });
        return match live {
            Err(err) if err.downcast_ref::<live::LiveFramesRefused>().is_some() => {
                println!("bench --live: skipped: {err}");
                Ok(std::process::ExitCode::from(SKIPPED))
            }
            other => other.map(|()| std::process::ExitCode::SUCCESS),
        };
    }
    pin_to_cpu(0);
    let mut rng = StdRng::seed_from_u64(7);
    let sizes = options
        .sizes
        .clone()
        .unwrap_or_else(|| vec![10, 100, 1_000, 10_000]);
    // One ClassBench list, each size its first rules: a frame that a
    // smaller set decides by a rule is decided by the same rule in every
    // larger one. All sizes are timed on the same frames: the SYN mix of
    // the whole list, and replies.
    let largest = sizes.iter().copied().max().context("no rule-set sizes")?;
    let list = workload::rule_set(&mut rng, largest, Addresses::ClassBench);
    let syn_mix = workload::packet_mix(&mut rng, &list, MIX_FRAMES);
    let replies = workload::return_traffic(&mut rng, MIX_FRAMES);
    let loaded = sizes
        .iter()
        .map(|&size| load_rule_set(&list, size, [&syn_mix, &replies]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let first = &loaded[0];
    // xdp-filter with the smallest set's exact-match entries, on its frames.
    let xdp_filter = match XdpFilter::load(&first.config) {
        Ok(peer) => Some(peer),
        Err(err) if options.require_peer => return Err(err.context("the peer, xdp-filter")),
        Err(err) => {
            eprintln!("xdp-filter not measured: {err:#}");
            None
        }
    };
    // The smallest set again, without the guard, for its per-packet cost.
    let mut unguarded = first.config.clone();
    unguarded.guard.action = GuardAction::Off;
    let unguarded = load(&compile(&unguarded)?)?;
    // And with event sampling off (`--events-per-second 0`).
    let quiet = Filter::load(&compile(&first.config)?)?;
    let mut baseline = aya::Ebpf::load(BASELINE_OBJECT)?;
    let empty: &mut Xdp = baseline
        .program_mut("empty")
        .context("empty program")?
        .try_into()?;
    empty.load()?;
    let empty: &Xdp = baseline
        .program("empty")
        .context("empty program")?
        .try_into()?;

    let repeat = options.repeat;
    // Every rule set on both mixes, then the reference rows.
    let mut subjects: Vec<Subject<'_>> = Vec::new();
    for set in &loaded {
        subjects.push(Subject {
            frames: &syn_mix,
            time: filter_timer(&set.filter, repeat),
        });
        subjects.push(Subject {
            frames: &replies,
            time: filter_timer(&set.filter, repeat),
        });
    }
    let extra = |frames, time| Subject { frames, time };
    subjects.push(extra(
        &syn_mix,
        Box::new(|frame| Ok(time_program(empty, frame, repeat)?)),
    ));
    subjects.push(extra(&syn_mix, filter_timer(&unguarded, repeat)));
    subjects.push(extra(&replies, filter_timer(&unguarded, repeat)));
    subjects.push(extra(&syn_mix, filter_timer(&quiet, repeat)));
    if let Some((_, program)) = &xdp_filter {
        for frames in [&syn_mix, &replies] {
            subjects.push(extra(
                frames,
                Box::new(|frame| Ok(time_program(program, frame, repeat)?)),
            ));
        }
    }
    let measured = measure(options.runs, &subjects)?;
    let rest = &measured[2 * loaded.len()..];
    let (empty_ns, guard_off, replies_guard_off, events_off) =
        (&rest[0], &rest[1], &rest[2], &rest[3]);
    let peer = xdp_filter.as_ref().map(|_| (&rest[4], &rest[5]));
    let (smallest_syn, smallest_reply) = (&measured[0], &measured[1]);
    let ratio = |a: f64, b: f64| a / b;

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
    let show = Measured::to_string;
    let mut rows = Vec::new();
    for (index, set) in loaded.iter().enumerate() {
        let (syn, reply) = (&measured[2 * index], &measured[2 * index + 1]);
        let peer = peer.filter(|_| index == 0);
        let vs_peer_syn = peer.map(|(peer_syn, _)| syn.paired(peer_syn, ratio));
        let vs_peer_reply = peer.map(|(_, peer_reply)| reply.paired(peer_reply, ratio));
        let shown = |rounds: Option<&Rounds>| rounds.map_or("-".to_owned(), |r| show(&r.summary()));
        let shown_ratio = |ratio: Option<Quartiles>| {
            ratio.map_or("-".to_owned(), |r| format!("{:.2}x", r.median))
        };
        println!(
            "{:>7} | {:>15} {:>13} {:>6} | {:>15} {:>13} {:>6} | {:>8.2} {:>10.1}",
            set.size,
            show(&syn.summary()),
            shown(peer.map(|p| p.0)),
            shown_ratio(vs_peer_syn),
            show(&reply.summary()),
            shown(peer.map(|p| p.1)),
            shown_ratio(vs_peer_reply),
            set.map_bytes as f64 / (1 << 20) as f64,
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
            map_bytes: set.map_bytes,
            compile_apply_ms: set.apply_ms,
        });
    }
    let (smallest, largest) = (&rows[0], &rows[rows.len() - 1]);
    let quartiles =
        |q: &Quartiles, unit: &str| format!("{:.2}{unit} ({:.2}-{:.2})", q.median, q.low, q.high);
    println!(
        "{} vs {} rules, per round (median, quartiles): {} on the SYN mix, {} on the return mix",
        largest.rules,
        smallest.rules,
        quartiles(&largest.vs_smallest_syn_mix, "x"),
        quartiles(&largest.vs_smallest_return_mix, "x"),
    );
    let dropped: Vec<String> = rows
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
        show(&empty_ns.summary())
    );
    let guard_cost_syn_mix = smallest_syn.paired(guard_off, |a, b| a - b);
    let guard_cost_return_mix = smallest_reply.paired(replies_guard_off, |a, b| a - b);
    println!(
        "guard on (above) vs off, {} rules: SYN mix {} vs {}; return mix {} vs {}; \
         per round: {} ns (SYN), {} ns (return)",
        first.size,
        show(&smallest.syn_mix),
        show(&guard_off.summary()),
        show(&smallest.return_mix),
        show(&replies_guard_off.summary()),
        quartiles(&guard_cost_syn_mix, ""),
        quartiles(&guard_cost_return_mix, ""),
    );
    println!(
        "events on (above, the default 100/s per CPU) vs off, {} rules: {} vs {}",
        first.size,
        show(&smallest.syn_mix),
        show(&events_off.summary())
    );
    drop(subjects);
    drop(loaded);

    let limits = measure_limits(&options, &mut rng)?;
    println!(
        "\nrate limits, one public TCP rule under a random-source SYN flood \
         ({FLOOD_FRAMES} frames, {} sources in the per-source table)",
        filter_agent::rules::config::DEFAULT_LIMIT_SOURCES
    );
    for row in &limits {
        println!("  {:<44} {:>15} ns", row.rule, row.ns_per_packet);
    }

    let mut cases: Vec<(String, Vec<IpNet>)> = options
        .set_sizes
        .iter()
        .map(|&count| (format!("IPv4 {count}"), workload::prefixes(&mut rng, count)))
        .collect();
    for &count in &options.v6_set_sizes {
        cases.push((
            format!("IPv6 {count}"),
            workload::ipv6_prefixes(&mut rng, count),
        ));
    }
    // Real data: Debian's GeoIP country table, whole and its largest
    // country, IPv4.
    match geoip::Countries::read(Path::new(geoip::DEFAULT_DIR)) {
        Ok(countries) => {
            let v4 = |nets: &[IpNet]| -> Vec<IpNet> {
                let v4 = nets.iter().filter(|net| matches!(net, IpNet::V4(_)));
                v4.copied().collect()
            };
            let all: Vec<IpNet> = countries.iter().flat_map(|(_, nets)| v4(nets)).collect();
            cases.push(("GeoIP, all".to_owned(), all));
            let (code, nets) = countries
                .iter()
                .max_by_key(|(_, nets)| v4(nets).len())
                .context("an empty GeoIP table")?;
            cases.push((format!("GeoIP, {code}"), v4(nets)));
        }
        Err(err) => eprintln!("country sets not measured: {err}"),
    }
    println!(
        "\n{:<14} {:>9} | {:>7} {:>7} | {:>7} {:>7} | {:>8} {:>8} {:>8} | {:>7} {:>7} | {:>7}",
        "set",
        "prefixes",
        "trie ns",
        "LPM ns",
        "trie MiB",
        "LPM MiB",
        "parse s",
        "compile",
        "load s",
        "total s",
        "LPM s",
        "filter"
    );
    let mut sets = Vec::new();
    for (name, nets) in &cases {
        let row = measure_set(&options, &mut rng, name, nets)?;
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        println!(
            "{:<14} {:>9} | {:>7.1} {:>7.1} | {:>8.1} {:>7.1} | {:>8.2} {:>8.2} {:>8.2} | {:>7.2} {:>7.2} | {:>7.1}",
            row.set,
            row.prefixes,
            row.trie_lookup_ns,
            row.kernel_lpm_lookup_ns,
            mib(row.trie_memlock_bytes),
            mib(row.kernel_lpm_memlock_bytes),
            row.parse_s,
            row.compile_s,
            row.load_s,
            row.parse_s + row.compile_s + row.load_s,
            row.kernel_lpm_load_s,
            row.filter.ns,
        );
        sets.push(row);
    }
    // The largest IPv4 set replaced by itself with one prefix changed.
    let largest = cases
        .iter()
        .filter(|(name, _)| name.starts_with("IPv4"))
        .max_by_key(|(_, nets)| nets.len());
    let stall = match largest {
        Some((_, nets)) => {
            let mut changed = nets.clone();
            changed[0] = "192.0.2.0/24".parse()?;
            let row = stall::measure(nets, &changed)?;
            println!(
                "\nreplacing {} prefixes under live traffic ({} echoes of {} datagrams): longest gap \
                 {:.1} ms steady, {:.1} ms during the swap ({:.2} s: compile, load, link update), \
                 {:.1} ms while the old set is freed; freeing a kernel LPM trie of the same \
                 prefixes: {:.1} ms",
                row.prefixes,
                row.received,
                row.sent,
                row.steady_ms,
                row.swap_ms,
                row.swap_s,
                row.teardown_ms,
                row.kernel_lpm_teardown_ms
            );
            Some(row)
        }
        None => None,
    };
    if let Some(path) = options.json {
        let report = Report {
            empty_program: empty_ns.summary(),
            guard_off_syn_mix: guard_off.summary(),
            guard_off_return_mix: replies_guard_off.summary(),
            guard_cost_syn_mix,
            guard_cost_return_mix,
            events_off: events_off.summary(),
            rules: rows,
            limits,
            sets,
            stall,
        };
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("written to {}", path.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}
