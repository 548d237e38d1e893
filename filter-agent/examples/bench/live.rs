//! `cargo xtask bench --live`: whole-path cost with live packets, against
//! what operators would pick instead (nftables, iptables with NOTRACK,
//! ipset), each given the same rules and the same packets in one run; and a
//! random-source SYN flood on a rule with and without a per-source limit.
//!
//! Two namespaces joined by veth. The sender runs a one-instruction XDP_TX
//! program with BPF_PROG_TEST_RUN live frames (what xdp-trafficgen does),
//! or, where the kernel refuses those, writes the frames to an AF_PACKET
//! socket; every frame leaves the sender's veth and is received, filtered
//! and delivered to the stack by the receiver's. The receiver holds one
//! configuration at a time. Cost is the busy CPU time of the whole machine
//! (/proc/stat, both cores) per packet sent, and every packet sent must show
//! up in the configuration's own counters, so nothing is lost unnoticed.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, ensure};
use aya::{Ebpf, programs::Xdp};
use filter_agent::rules::config::{Config, DEFAULT_LIMIT_SOURCES};
use filter_common::sender::FRAME_BYTES;
use ipnet::IpNet;
use rand::{SeedableRng, rngs::StdRng};
use testbed::{Netns, Pair};

mod receiver;
mod rulesets;
mod socket;
mod transmit;

use crate::{BASELINE_OBJECT, limits, timing::pin_to_cpu, workload};
use receiver::{Installed, Receiver};
use transmit::{Sample, Sender, if_index, sending_path};

pub struct LiveOptions {
    pub runs: usize,
    /// Length of one measured run.
    pub seconds: f64,
    pub sizes: Vec<usize>,
    pub json: Option<PathBuf>,
}

/// One line of the table, as written to the JSON file.
#[derive(serde::Serialize)]
struct LiveRow {
    workload: &'static str,
    /// None for "no filter".
    rules: Option<usize>,
    receiver: &'static str,
    /// Busy CPU time (both cores) per packet, median over the runs.
    ns_per_packet: f64,
    packets_per_second: f64,
    /// This receiver's ns/packet over filter-agent's for the same rules.
    ratio_to_filter_agent: Option<f64>,
    setup_seconds: f64,
    packets_per_run: u64,
    /// The share of the packets that rate limits dropped (median).
    over_limit_share: f64,
}

/// The same rules and frames for every receiver.
struct Workload {
    name: &'static str,
    size: usize,
    config: Config,
    /// Only for address lists, which sets and ipset can hold.
    prefixes: Option<Vec<IpNet>>,
    /// Only for floods: `config` with a per-source limit on its rule.
    limited: Option<Config>,
    frames: Vec<Vec<u8>>,
}

impl Workload {
    /// Who receives it: filter-agent first (the others' ratios are to it),
    /// then what an operator would use instead; for a flood, the same rule
    /// with a per-source limit.
    fn receivers(&self) -> Vec<Receiver> {
        let others = if self.limited.is_some() {
            [Receiver::FilterAgentLimited].as_slice()
        } else if self.prefixes.is_some() {
            &[Receiver::NftSet, Receiver::Ipset]
        } else {
            &[Receiver::NftLinear, Receiver::IptablesNotrack]
        };
        [&[Receiver::FilterAgent], others].concat()
    }
}

const NFT_TABLE: &str = "fa_bench";
const ALLOW_CHAIN: &str = "fa-allow";
const IPSET_NAME: &str = "blocklist";
/// Frames per BPF_PROG_TEST_RUN batch (the kernel's default is 64 too).
const BATCH: u32 = 64;

pub fn run(options: &LiveOptions) -> anyhow::Result<()> {
    let pair = quiet_pair()?;
    let macs = (
        mac(&pair.server, &pair.server_if)?,
        mac(&pair.client, &pair.client_if)?,
    );

    let path = sending_path(&pair, macs)?;
    let mut receiver_baseline = Ebpf::load(BASELINE_OBJECT)?;
    let empty: &mut Xdp = receiver_baseline
        .program_mut("empty")
        .context("empty program")?
        .try_into()?;
    empty.load()?;

    if options.seconds < 0.5 {
        println!(
            "(runs under 0.5 s: /proc/stat counts CPU time in 10 ms ticks, so the \
             figures below only show that the harness works)"
        );
    }
    let mut rng = StdRng::seed_from_u64(11);
    let mut rows = Vec::new();
    println!(
        "{:<9} {:>6}  {:<18} {:>10} {:>9} {:>14} {:>8} {:>10}",
        "workload",
        "rules",
        "receiver",
        "ns/packet",
        "Mpps",
        "x filter-agent",
        "setup s",
        "over limit"
    );
    let mut previous_kind = "";
    for workload in &workloads(&mut rng, &options.sizes) {
        let frames: Vec<Vec<u8>> = workload
            .frames
            .iter()
            .map(|frame| addressed(frame, macs))
            .collect::<anyhow::Result<_>>()?;
        let sender = Sender::new(&frames, path)?;
        let mut receivers = workload.receivers();
        // The unfiltered path once per kind of workload: it does not
        // depend on the rules, only on the frames.
        if workload.name != previous_kind && workload.limited.is_none() {
            receivers.insert(0, Receiver::NoFilter);
            previous_kind = workload.name;
        }
        let measured = measure(&pair, &sender, empty, workload, &receivers, options)?;
        rows.extend(report_rows(workload.name, measured, receivers));
    }
    if let Some(path) = &options.json {
        let report = serde_json::json!({
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
            "cpus": std::thread::available_parallelism()?.get(),
            "runs": options.runs,
            "seconds_per_run": options.seconds,
            "sender": format!("{path:?}"),
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("written to {}", path.display());
    }
    Ok(())
}

/// The pair the live runs use, both stacks quiet (no addresses, no ARP, no
/// IPv6) so that the receiver's counters see exactly the frames sent.
fn quiet_pair() -> anyhow::Result<Pair> {
    let pair = Pair::create("lb")?;
    // Both stacks stay quiet (no addresses, no ARP, no IPv6), so that the
    // receiver's counters see exactly the frames sent.
    for (netns, iface) in [
        (&pair.client, &pair.client_if),
        (&pair.server, &pair.server_if),
    ] {
        netns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        netns.ip(&["addr", "flush", "dev", iface])?;
        netns.ip(&["link", "set", "dev", iface, "arp", "off"])?;
    }
    // What a filter accepts ends at a blackhole route: the stack's work
    // after the filter is small, silent and the same for every receiver
    // (no ICMP errors, whose rate limits would make it vary).
    pair.server.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    pair.server
        .sysctl(&format!("net.ipv4.conf.{}.rp_filter", pair.server_if), "0")?;
    pair.server.ip(&["route", "add", "blackhole", "default"])?;
    Ok(pair)
}

/// One workload's rows, each with its ratio to filter-agent, printed.
fn report_rows(name: &str, measured: Vec<LiveRow>, receivers: Vec<Receiver>) -> Vec<LiveRow> {
    let mut rows = Vec::new();
    let ours = measured
        .iter()
        .find(|row| row.receiver == Receiver::FilterAgent.label())
        .map(|row| row.ns_per_packet)
        .filter(|&ns| ns > 0.0);
    for (row, receiver) in measured.into_iter().zip(receivers) {
        let ratio = ours
            .filter(|_| !matches!(receiver, Receiver::FilterAgent | Receiver::NoFilter))
            .map(|ours| row.ns_per_packet / ours);
        let rules_text = row.rules.map_or("-".to_owned(), |rules| rules.to_string());
        println!(
            "{:<9} {rules_text:>6}  {:<18} {:>10.0} {:>9.3} {:>14} {:>8.2} {:>9.1}%",
            name,
            receiver.label(),
            row.ns_per_packet,
            row.packets_per_second / 1e6,
            ratio.map_or("-".to_owned(), |ratio| format!("{ratio:.2}")),
            row.setup_seconds,
            row.over_limit_share * 100.0,
        );
        rows.push(LiveRow {
            ratio_to_filter_agent: ratio,
            ..row
        });
    }
    rows
}

/// ClassBench-like ACLs, then address lists, of every size; then the
/// random-source floods.
fn workloads(rng: &mut StdRng, sizes: &[usize]) -> Vec<Workload> {
    let mut workloads = Vec::new();
    for &size in sizes {
        let config = workload::rule_set(rng, size, workload::Addresses::Specific);
        let frames = workload::decided_mix(rng, &config, 60);
        workloads.push(Workload {
            name: "acl",
            size,
            config,
            prefixes: None,
            limited: None,
            frames,
        });
    }
    for &size in sizes {
        let nets = workload::prefixes(rng, size);
        let frames = workload::set_frames(rng, &nets, 60);
        workloads.push(Workload {
            name: "addresses",
            size,
            config: workload::address_list(&nets),
            prefixes: Some(nets),
            limited: None,
            frames,
        });
    }
    workloads.extend([false, true].map(|v6| flood(rng, v6)));
    workloads
}

/// A random-source SYN flood on a public web rule, the same rule with a
/// per-source limit beside it: every frame from another source, more
/// sources than the limit has buckets, so every bucket is taken.
fn flood(rng: &mut StdRng, v6: bool) -> Workload {
    let (_, per_source) = limits::limits();
    let buckets = DEFAULT_LIMIT_SOURCES;
    Workload {
        name: if v6 { "flood v6" } else { "flood v4" },
        size: 1,
        config: workload::public_service(None, buckets),
        prefixes: None,
        limited: Some(workload::public_service(Some(per_source), buckets)),
        frames: workload::syn_flood(rng, limits::FLOOD_FRAMES, v6),
    }
}

/// Measures every receiver on `workload`, `options.runs` rounds; each
/// round sets up every receiver in turn, sends one run through it, checks
/// its counters against what was sent and takes it down again, so that
/// drift of a shared VM hits all receivers alike.
fn measure(
    pair: &Pair,
    sender: &Sender,
    empty: &mut Xdp,
    workload: &Workload,
    receivers: &[Receiver],
    options: &LiveOptions,
) -> anyhow::Result<Vec<LiveRow>> {
    let mut samples: Vec<Vec<Sample>> = receivers.iter().map(|_| Vec::new()).collect();
    let mut counts = vec![None; receivers.len()];
    let mut setup_seconds = vec![0.0; receivers.len()];
    for _ in 0..options.runs {
        for (index, &receiver) in receivers.iter().enumerate() {
            let started = Instant::now();
            let installed = Installed::new(pair, empty, workload, receiver)?;
            setup_seconds[index] = started.elapsed().as_secs_f64();
            let count = &mut counts[index];
            let sample = pair
                .client
                .run(|| -> anyhow::Result<Sample> {
                    pin_to_cpu(0);
                    let ifindex = if_index(&pair.client_if)?;
                    // The first round finds the count that takes about a run.
                    let count = match count {
                        Some(count) => *count,
                        None => *count.insert(sender.calibrate(ifindex, options.seconds)?),
                    };
                    let (before, over_limit) = (installed.classified()?, installed.over_limit()?);
                    let since = || Ok(installed.classified()? - before);
                    let mut sample = sender.run(ifindex, count, since)?;
                    let classified = installed.classified()? - before;
                    ensure!(
                        classified == sample.packets,
                        "sent {} packets but the receiver classified {classified}",
                        sample.packets
                    );
                    sample.over_limit = installed.over_limit()? - over_limit;
                    Ok(sample)
                })?
                .with_context(|| format!("{} rules, {}", workload.size, receiver.label()))?;
            samples[index].push(sample);
        }
    }
    Ok(receivers
        .iter()
        .zip(samples)
        .zip(setup_seconds)
        .map(|((receiver, samples), setup_seconds)| LiveRow {
            workload: workload.name,
            rules: (*receiver != Receiver::NoFilter).then_some(workload.size),
            receiver: receiver.label(),
            ns_per_packet: median(samples.iter().map(|s| s.cpu_ns as f64 / s.packets as f64)),
            packets_per_second: median(samples.iter().map(|s| 1e9 / s.sender_ns_per_packet)),
            ratio_to_filter_agent: None,
            setup_seconds,
            packets_per_run: samples.first().map_or(0, |s| s.packets),
            over_limit_share: median(
                samples
                    .iter()
                    .map(|s| s.over_limit as f64 / s.packets as f64),
            ),
        })
        .collect())
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The interface's MAC address inside `netns`.
fn mac(netns: &Netns, iface: &str) -> anyhow::Result<[u8; 6]> {
    let output = netns.ip(&["-j", "link", "show", "dev", iface])?;
    let link: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let text = link[0]["address"].as_str().context("no MAC address")?;
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// `frame` from the sender's MAC to the receiver's, so that the receiving
/// stack takes it as its own (the IP layer drops frames for other hosts
/// before iptables sees them), padded to the sender's fixed frame length.
fn addressed(frame: &[u8], (destination, source): ([u8; 6], [u8; 6])) -> anyhow::Result<Vec<u8>> {
    ensure!(frame.len() <= FRAME_BYTES, "a {}-byte frame", frame.len());
    let mut frame = frame.to_vec();
    frame[..6].copy_from_slice(&destination);
    frame[6..12].copy_from_slice(&source);
    frame.resize(FRAME_BYTES, 0);
    Ok(frame)
}
