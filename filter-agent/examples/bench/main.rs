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

mod live;
mod stall;
mod workload;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::Xdp;
use filter_agent::{
    compile::{RuleSet, compile},
    config::geoip,
    config::{Action, Config, GuardAction, Limit},
    loader::{Filter, LoadOptions, fill_trie, program_verdict, time_program, xdp_action},
    packet, reference,
};
use ipnet::IpNet;
use rand::{SeedableRng, rngs::StdRng};
use workload::Addresses;

/// One line of the table, as written to the JSON file.
#[derive(serde::Serialize)]
struct Row {
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

/// One line of the address-set table: filter-agent's trie beside the
/// kernel's LPM trie holding the same prefixes.
#[derive(serde::Serialize)]
struct SetRow {
    set: String,
    prefixes: usize,
    /// The whole filter program on the set's frames.
    filter: Measured,
    /// One lookup: the reference programs over the empty program.
    trie_lookup_ns: f64,
    kernel_lpm_lookup_ns: f64,
    /// Map values of the trie, and the kernel's charge (memlock) for each.
    map_bytes: usize,
    trie_memlock_bytes: u64,
    kernel_lpm_memlock_bytes: u64,
    /// Set file to attached-ready program: read + parse, compile, load.
    parse_s: f64,
    compile_s: f64,
    load_s: f64,
    kernel_lpm_load_s: f64,
}

/// One line of the rate-limit table.
#[derive(serde::Serialize)]
struct LimitRow {
    rule: &'static str,
    ns_per_packet: Measured,
}

#[derive(serde::Serialize)]
struct Report {
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
static BASELINE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));

struct Options {
    /// `--live`: the live-traffic benchmark instead.
    live: bool,
    /// Length of one live run.
    seconds: f64,
    runs: usize,
    repeat: u32,
    /// Rule-set sizes (defaults differ between the two benchmarks).
    sizes: Option<Vec<usize>>,
    set_sizes: Vec<usize>,
    v6_set_sizes: Vec<usize>,
    json: Option<PathBuf>,
    /// `--require-peer`: fail, rather than leave its column empty, when
    /// xdp-filter cannot be measured (the smoke test in `cargo xtask test`).
    require_peer: bool,
}

/// "10,100,1000" -> [10, 100, 1000]
fn numbers(list: &str) -> anyhow::Result<Vec<usize>> {
    Ok(list.split(',').map(str::parse).collect::<Result<_, _>>()?)
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        live: false,
        seconds: 1.0,
        runs: 7,
        repeat: 20_000,
        sizes: None,
        set_sizes: vec![100_000, 1_000_000],
        v6_set_sizes: vec![200_000],
        json: None,
        require_peer: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--live" => options.live = true,
            "--seconds" => options.seconds = value()?.parse()?,
            "--runs" => options.runs = value()?.parse()?,
            "--repeat" => options.repeat = value()?.parse()?,
            "--json" => options.json = Some(value()?.into()),
            "--sizes" => options.sizes = Some(numbers(&value()?)?),
            "--set-sizes" => options.set_sizes = numbers(&value()?)?,
            "--v6-set-sizes" => options.v6_set_sizes = numbers(&value()?)?,
            "--require-peer" => options.require_peer = true,
            "--bench" => {} // added by `cargo bench`-style runners
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(options)
}

/// Times one frame through one program.
type Timer<'a> = Box<dyn Fn(&[u8]) -> anyhow::Result<Duration> + 'a>;

/// A program to time, and the frames to time it on.
struct Subject<'a> {
    frames: &'a [Vec<u8>],
    time: Timer<'a>,
}

/// A row's result: the median over rounds of the mean ns/packet, and the
/// spread of the rounds (interquartile range over the median).
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Measured {
    ns: f64,
    spread: f64,
}

impl std::fmt::Display for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = format!("{:.1} ±{:.1}%", self.ns, self.spread * 100.0);
        f.pad(&text)
    }
}

/// The spread a row must get under before the rounds stop.
const MAX_SPREAD: f64 = 0.05;

/// Mean ns/packet over each subject's frames, one per round: `runs`
/// rounds, then `runs` more while any row's spread is over `MAX_SPREAD`
/// (at most `4 * runs` in all; the spread is reported either way). Every
/// round times every subject, so drift on a shared VM hits all of them
/// alike instead of whichever happened to run during it.
fn measure(runs: usize, subjects: &[Subject<'_>]) -> anyhow::Result<Vec<Rounds>> {
    let mut rounds: Vec<Rounds> = vec![Rounds(Vec::new()); subjects.len()];
    loop {
        for _ in 0..runs {
            for (subject, rounds) in subjects.iter().zip(&mut rounds) {
                let mut total = 0.0;
                for frame in subject.frames {
                    total += (subject.time)(frame)?.as_nanos() as f64;
                }
                rounds.0.push(total / subject.frames.len() as f64);
            }
        }
        let stable = rounds.iter().all(|row| row.summary().spread < MAX_SPREAD);
        if stable || rounds[0].0.len() >= 4 * runs {
            return Ok(rounds);
        }
    }
}

/// One subject's mean ns/packet in each round.
#[derive(Clone)]
struct Rounds(Vec<f64>);

impl Rounds {
    fn summary(&self) -> Measured {
        let quartiles = Quartiles::of(self.0.clone());
        Measured {
            ns: quartiles.median,
            spread: (quartiles.high - quartiles.low) / quartiles.median,
        }
    }

    /// `pair` of this subject's and `other`'s mean in each round: measured
    /// moments apart, the two share the round's drift, which a comparison
    /// of their medians over all rounds does not cancel.
    fn paired(&self, other: &Rounds, pair: impl Fn(f64, f64) -> f64) -> Quartiles {
        Quartiles::of(
            self.0
                .iter()
                .zip(&other.0)
                .map(|(&a, &b)| pair(a, b))
                .collect(),
        )
    }
}

/// The median and the quartiles around it.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Quartiles {
    median: f64,
    low: f64,
    high: f64,
}

impl Quartiles {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let at = |fraction: f64| values[((values.len() - 1) as f64 * fraction).round() as usize];
        Quartiles {
            median: at(0.5),
            low: at(0.25),
            high: at(0.75),
        }
    }
}

/// BPF_PROG_TEST_RUN runs on the calling CPU: stay on one.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; the calls only read `set`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// xdp-filter loaded on a throwaway veth with exact-match entries taken
/// from `config` (its lookups are exact-match only), pinned so that it can
/// be test-run like our program.
struct XdpFilter {
    netns: testbed::Netns,
    pin: PathBuf,
    /// libxdp creates this on bpffs; removed again if it was not there.
    libxdp_dir_existed: bool,
}

const LIBXDP_DIR: &str = "/sys/fs/bpf/xdp";

impl XdpFilter {
    fn load(config: &Config) -> anyhow::Result<(Self, Xdp)> {
        let libxdp_dir_existed = std::path::Path::new(LIBXDP_DIR).exists();
        let netns = testbed::Netns::create(&format!("fa-bench-{}", std::process::id()))?;
        netns.ip(&["link", "add", "xf0", "type", "veth", "peer", "name", "xf1"])?;
        netns.ip(&["link", "set", "xf0", "up"])?;
        let run = |args: &[&str]| -> anyhow::Result<String> {
            // nsenter keeps our mount namespace (and so bpffs, which xdp-filter
            // needs); `ip netns exec` would remount /sys without it.
            let output = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", netns.name()))
                .arg("xdp-filter")
                .args(args)
                .output()
                .context("running xdp-filter (xdp-tools)")?;
            if !output.status.success() {
                bail!(
                    "xdp-filter {args:?}: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        };
        run(&["load", "xf0", "--mode", "skb", "--policy", "deny"])?;
        for rule in &config.rules {
            if let Some(ranges) = &rule.dport {
                let proto = if rule.proto == Some(packet::IPPROTO_UDP) {
                    "udp"
                } else {
                    "tcp"
                };
                run(&["port", &ranges[0].0.to_string(), "--proto", proto])?;
            }
            if let Some(list) = &rule.src {
                run(&["ip", &list.nets[0].addr().to_string(), "--mode", "src"])?;
            }
        }
        let id = netns
            .ip(&["-d", "link", "show", "xf0"])
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())?
            .split_whitespace()
            .skip_while(|word| *word != "id")
            .nth(1)
            .context("no XDP program id on the xdp-filter interface")?
            .to_owned();
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/fa-bench-xdp-filter-{}",
            std::process::id()
        ));
        let status = Command::new("bpftool")
            .args(["prog", "pin", "id", &id])
            .arg(&pin)
            .status()?;
        if !status.success() {
            bail!("bpftool prog pin id {id} failed");
        }
        let program = Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface)?;
        Ok((
            Self {
                netns,
                pin,
                libxdp_dir_existed,
            },
            program,
        ))
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns.name()))
            .args(["xdp-filter", "unload", "--all"])
            .output();
        if !self.libxdp_dir_existed {
            // Only succeeds when empty: never removes anything else's pins.
            let _ = std::fs::remove_dir(LIBXDP_DIR);
        }
    }
}

/// A set of prefixes behind one deny rule, read from a set file, against
/// the same prefixes in a kernel LPM trie; each also with a program that
/// only looks the source up, for the cost of the lookup itself.
fn measure_set(
    options: &Options,
    rng: &mut StdRng,
    name: &str,
    nets: &[IpNet],
) -> anyhow::Result<SetRow> {
    let v6 = matches!(nets.first(), Some(IpNet::V6(_)));
    let frames = workload::set_frames(rng, nets, 60);
    let dir = tempfile::tempdir()?;
    let path = workload::set_file(dir.path(), nets)?;
    let started = Instant::now();
    let config = filter_agent::config::load(&path)?;
    let parse_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let rule_set = compile(&config)?;
    let compile_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let filter = load(&rule_set)?;
    let load_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let (lpm_map, lpm_program, trie_program) = if v6 {
        ("PREFIXES6", "lpm6", "trie6")
    } else {
        ("PREFIXES", "lpm", "trie4")
    };
    let trie = &rule_set.src.trie;
    let listed_class = trie.lookup(nets[0].network());
    let mut baseline = aya::EbpfLoader::new()
        .override_global("LISTED_CLASS", &listed_class, true)
        .map_max_entries(lpm_map, nets.len() as u32)
        .map_max_entries("TRIE_ENTRIES", trie.entry_blocks())
        .map_max_entries("TRIE_NODES", trie.node_blocks())
        .load(BASELINE_OBJECT)?;
    let map = baseline.map_mut(lpm_map).context("LPM map")?;
    if v6 {
        fill_lpm::<16>(map, nets)?;
    } else {
        fill_lpm::<4>(map, nets)?;
    }
    let lpm = load_program(&mut baseline, lpm_program)?;
    let kernel_lpm_load_s = started.elapsed().as_secs_f64();
    let kernel_lpm_memlock_bytes = memlock(baseline.map(lpm_map).context("LPM map")?)?;
    fill_trie(&mut baseline, ["TRIE_ENTRIES", "TRIE_NODES"], trie)?;
    let trie_memlock_bytes = ["TRIE_ENTRIES", "TRIE_NODES"]
        .iter()
        .map(|name| memlock(baseline.map(name).context("trie map")?))
        .sum::<anyhow::Result<u64>>()?;
    let lookup = load_program(&mut baseline, trie_program)?;
    let empty = load_program(&mut baseline, "empty")?;
    let [lpm, lookup, empty] = [lpm, lookup, empty].map(|name| {
        let program: &Xdp = baseline.program(name).unwrap().try_into().unwrap();
        program
    });
    // The numbers mean something only if all three agree.
    for frame in &frames {
        let (_, outcome) = filter.classify_frame(frame)?;
        let listed = matches!(outcome, reference::Outcome::Rule(_));
        for program in [lpm, lookup] {
            let dropped = program_verdict(program, frame)? == xdp_action::DROP;
            if dropped != listed {
                bail!("{name}: the LPM trie, filter-agent's trie and the filter disagree");
            }
        }
    }

    let repeat = options.repeat;
    let timers: [Timer<'_>; 4] = [
        Box::new(|frame| Ok(filter.time_packet(frame, repeat)?)),
        Box::new(|frame| Ok(time_program(lookup, frame, repeat)?)),
        Box::new(|frame| Ok(time_program(lpm, frame, repeat)?)),
        Box::new(|frame| Ok(time_program(empty, frame, repeat)?)),
    ];
    let subjects = timers.map(|time| Subject {
        frames: &frames,
        time,
    });
    let measured = measure(options.runs, &subjects)?;
    Ok(SetRow {
        set: name.to_owned(),
        prefixes: nets.len(),
        filter: measured[0].summary(),
        trie_lookup_ns: measured[1].paired(&measured[3], |a, b| a - b).median,
        kernel_lpm_lookup_ns: measured[2].paired(&measured[3], |a, b| a - b).median,
        map_bytes: trie.bytes(),
        trie_memlock_bytes,
        kernel_lpm_memlock_bytes,
        parse_s,
        compile_s,
        load_s,
        kernel_lpm_load_s,
    })
}

/// Loads one of the reference programs; returns its name.
fn load_program<'a>(ebpf: &mut aya::Ebpf, name: &'a str) -> anyhow::Result<&'a str> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .context(name.to_owned())?
        .try_into()?;
    program.load()?;
    Ok(name)
}

/// `nets` (all of one family, `LEN` address bytes) into an LPM trie map.
fn fill_lpm<const LEN: usize>(map: &mut aya::maps::Map, nets: &[IpNet]) -> anyhow::Result<()> {
    let mut trie = aya::maps::LpmTrie::<_, [u8; LEN], u32>::try_from(map)?;
    for net in nets {
        let bytes = match net.network() {
            IpAddr::V4(addr) => addr.octets().to_vec(),
            IpAddr::V6(addr) => addr.octets().to_vec(),
        };
        let key =
            aya::maps::lpm_trie::Key::new(u32::from(net.prefix_len()), bytes.try_into().unwrap());
        trie.insert(&key, 1, 0)?;
    }
    Ok(())
}

/// What the kernel charges for a map (`memlock` in its fdinfo).
fn memlock(map: &aya::maps::Map) -> anyhow::Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let data = match map {
        aya::maps::Map::Array(data) | aya::maps::Map::LpmTrie(data) => data,
        _ => bail!("not an array or LPM trie"),
    };
    let fd = data.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .context("no memlock in fdinfo")?
        .trim()
        .parse()
        .context("memlock")
}

/// Frames of the rate-limit rows: SYNs to port 80 from random sources.
const FLOOD_FRAMES: usize = 100_000;

/// The same public-service rule without a limit, with a rule-wide limit
/// the flood is far over, and with a per-source limit, on a random-source
/// SYN flood. The kernel repeats a frame, not a source, so the rows of a
/// source the table already holds repeat each frame; the churning flood
/// (every packet a new source, inserted into the full 65,536-entry table,
/// evicting another) takes one BPF_PROG_TEST_RUN per frame, beside the
/// unlimited rule timed the same way (which shows that way's overhead).
fn measure_limits(options: &Options, rng: &mut StdRng) -> anyhow::Result<Vec<LimitRow>> {
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
    let sources = filter_agent::config::DEFAULT_LIMIT_SOURCES;
    let flood = workload::syn_flood(rng, FLOOD_FRAMES);
    let sample = &flood[..60];
    let repeat = options.repeat;
    let case = |rule, limit, action, frames, repeat| LimitCase {
        rule,
        limit,
        action,
        frames,
        repeat,
    };
    let (allow, deny) = (Action::Allow, Action::Deny);
    let cases = [
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
        case("no limit, one run per packet", None, allow, &flood, 1),
        case(
            "per-source /32, each packet a new source",
            Some(per_source),
            allow,
            &flood,
            1,
        ),
    ];
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

/// One row of the rate-limit table: the public rule as `action` with
/// `limit`, timed on `frames`, each repeated `repeat` times.
struct LimitCase<'a> {
    rule: &'static str,
    limit: Option<Limit>,
    action: Action,
    frames: &'a [Vec<u8>],
    repeat: u32,
}

/// Times `filter` on a frame, `repeat` runs.
fn filter_timer(filter: &Filter, repeat: u32) -> Timer<'_> {
    Box::new(move |frame| Ok(filter.time_packet(frame, repeat)?))
}

/// Loads `rules` as the agent runs them by default: events on, at the
/// default rate (drops pay for the rate-limit check).
fn load(rules: &RuleSet) -> anyhow::Result<Filter> {
    let options = LoadOptions {
        event_rate: filter_common::event::DEFAULT_RATE,
        ..LoadOptions::default()
    };
    Ok(Filter::load_with(rules, &options)?)
}

/// A rule set loaded for measurement.
struct Loaded {
    size: usize,
    config: Config,
    filter: Filter,
    /// Frames of each mix the rule set drops (of `MIX_FRAMES`).
    dropped: [usize; 2],
    map_bytes: usize,
    apply_ms: f64,
}

/// Frames in each mix.
const MIX_FRAMES: usize = 60;

/// The first `size` rules of `list`, loaded; checked against the
/// reference on both `mixes`.
fn load_rule_set(list: &Config, size: usize, mixes: [&[Vec<u8>]; 2]) -> anyhow::Result<Loaded> {
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
        filter_agent::config::DEFAULT_LIMIT_SOURCES
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
