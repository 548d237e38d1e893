//! `cargo xtask bench --live`: whole-path cost with live packets, against
//! what operators would pick instead (nftables, iptables with NOTRACK,
//! ipset), each given the same rules and the same packets in one run.
//!
//! Two namespaces joined by veth. The sender runs a one-instruction XDP_TX
//! program with BPF_PROG_TEST_RUN live frames (what xdp-trafficgen does), so
//! every frame leaves the sender's veth and is received, filtered and
//! delivered to the stack by the receiver's. The receiver holds one
//! configuration at a time. Cost is the busy CPU time of the whole machine
//! (/proc/stat, both cores) per packet sent, and every packet sent must show
//! up in the configuration's own counters, so nothing is lost unnoticed.

use std::{fmt::Write as _, path::PathBuf, time::Duration, time::Instant};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, xdp::XdpMode},
};
use filter_agent::{
    compile::compile,
    config::{Action, Config, Rule},
    loader::{AttachMode, Filter, LoadOptions},
    packet,
};
use filter_common::sender::{self, FRAME_BYTES};
use ipnet::{IpNet, Ipv4Net};
use rand::{SeedableRng, rngs::StdRng};
use testbed::{Netns, Pair};

use crate::{BASELINE_OBJECT, pin_to_cpu, workload};

pub struct LiveOptions {
    pub runs: usize,
    /// Length of one measured run.
    pub seconds: f64,
    pub sizes: Vec<usize>,
    pub json: Option<PathBuf>,
}

/// What sits on the receiving veth.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Receiver {
    /// No filter: what receiving and dropping in the stack costs anyway.
    NoFilter,
    FilterAgent,
    /// One nftables rule per rule, netdev ingress hook.
    NftLinear,
    /// One nftables interval set (address lists only).
    NftSet,
    /// One iptables rule per rule, raw PREROUTING, accepted traffic NOTRACK.
    IptablesNotrack,
    /// One ipset hash:net behind one iptables raw rule (address lists only).
    Ipset,
}

impl Receiver {
    fn label(self) -> &'static str {
        match self {
            Self::NoFilter => "no filter",
            Self::FilterAgent => "filter-agent",
            Self::NftLinear => "nftables",
            Self::NftSet => "nftables set",
            Self::IptablesNotrack => "iptables NOTRACK",
            Self::Ipset => "ipset",
        }
    }
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
}

/// The same rules and frames for every receiver.
struct Workload {
    name: &'static str,
    size: usize,
    config: Config,
    /// Only for address lists, which sets and ipset can hold.
    prefixes: Option<Vec<IpNet>>,
    frames: Vec<Vec<u8>>,
}

const NFT_TABLE: &str = "fa_bench";
const ALLOW_CHAIN: &str = "fa-allow";
const IPSET_NAME: &str = "blocklist";
/// Frames per BPF_PROG_TEST_RUN batch (the kernel's default is 64 too).
const BATCH: u32 = 64;

pub fn run(options: &LiveOptions) -> anyhow::Result<()> {
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
    let macs = (
        mac(&pair.server, &pair.server_if)?,
        mac(&pair.client, &pair.client_if)?,
    );

    refuses_live_frames(&pair, macs)?;
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
        "{:<9} {:>6}  {:<17} {:>10} {:>9} {:>14} {:>8}",
        "workload", "rules", "receiver", "ns/packet", "Mpps", "x filter-agent", "setup s"
    );
    let mut previous_kind = "";
    for workload in &workloads(&mut rng, &options.sizes) {
        let frames: Vec<Vec<u8>> = workload
            .frames
            .iter()
            .map(|frame| addressed(frame, macs))
            .collect::<anyhow::Result<_>>()?;
        let sender = Sender::new(&frames)?;
        let mut receivers = vec![Receiver::FilterAgent];
        if workload.prefixes.is_some() {
            receivers.extend([Receiver::NftSet, Receiver::Ipset]);
        } else {
            receivers.extend([Receiver::NftLinear, Receiver::IptablesNotrack]);
        }
        // The unfiltered path once per kind of workload: it does not
        // depend on the rules, only on the frames.
        if workload.name != previous_kind {
            receivers.insert(0, Receiver::NoFilter);
            previous_kind = workload.name;
        }
        let measured = measure(&pair, &sender, empty, workload, &receivers, options)?;
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
                "{:<9} {rules_text:>6}  {:<17} {:>10.0} {:>9.3} {:>14} {:>8.2}",
                workload.name,
                receiver.label(),
                row.ns_per_packet,
                row.packets_per_second / 1e6,
                ratio.map_or("-".to_owned(), |ratio| format!("{ratio:.2}")),
                row.setup_seconds,
            );
            rows.push(LiveRow {
                ratio_to_filter_agent: ratio,
                ..row
            });
        }
    }
    if let Some(path) = &options.json {
        let report = serde_json::json!({
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
            "cpus": std::thread::available_parallelism()?.get(),
            "runs": options.runs,
            "seconds_per_run": options.seconds,
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("written to {}", path.display());
    }
    Ok(())
}

/// ClassBench-like ACLs, then address lists, of every size.
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
            frames,
        });
    }
    workloads
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
                    let before = installed.classified()?;
                    let sample = sender.run(ifindex, count)?;
                    let classified = installed.classified()? - before;
                    ensure!(
                        classified == sample.packets,
                        "sent {} packets but the receiver classified {classified}",
                        sample.packets
                    );
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
            packets_per_second: median(samples.iter().map(|s| 1e9 / s.kernel_ns_per_packet)),
            ratio_to_filter_agent: None,
            setup_seconds,
            packets_per_run: samples.first().map_or(0, |s| s.packets),
        })
        .collect())
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A receiver configuration in place on the receiving veth; removed on drop
/// (the namespace's deletion would remove it too, even after a panic).
struct Installed<'a> {
    receiver: Receiver,
    netns: &'a Netns,
    iface: &'a str,
    filter: Option<Filter>,
    /// The XDP_PASS program that veth needs to accept XDP_TX frames, for
    /// every receiver except filter-agent (which is an XDP program itself).
    empty_link: Option<aya::programs::xdp::XdpLinkId>,
    empty: &'a mut Xdp,
}

impl<'a> Installed<'a> {
    fn new(
        pair: &'a Pair,
        empty: &'a mut Xdp,
        workload: &Workload,
        receiver: Receiver,
    ) -> anyhow::Result<Self> {
        let (netns, iface) = (&pair.server, pair.server_if.as_str());
        let mut installed = Self {
            receiver,
            netns,
            iface,
            filter: None,
            empty_link: None,
            empty,
        };
        if receiver == Receiver::FilterAgent {
            let rules = compile(&workload.config)?;
            let options = LoadOptions {
                event_rate: filter_common::event::DEFAULT_RATE,
                ..LoadOptions::default()
            };
            let mut filter = Filter::load_with(&rules, &options)?;
            netns.run(|| filter.attach(iface, AttachMode::Native))??;
            installed.filter = Some(filter);
            return Ok(installed);
        }
        let program = &mut *installed.empty;
        installed.empty_link = Some(netns.run(|| program.attach(iface, XdpMode::Driver))??);
        match receiver {
            Receiver::NoFilter | Receiver::FilterAgent => {}
            Receiver::NftLinear => nft(netns, &nft_linear(&workload.config, iface)?)?,
            Receiver::NftSet => nft(netns, &nft_set(prefixes(workload)?, iface))?,
            Receiver::IptablesNotrack => {
                iptables_restore(netns, &iptables_notrack(&workload.config)?)?
            }
            Receiver::Ipset => {
                let script = ipset(prefixes(workload)?);
                netns.exec_with_input("ipset", &["-exist", "restore"], &script)?;
                iptables_restore(netns, &iptables_ipset())?;
            }
        }
        Ok(installed)
    }

    /// Packets this configuration has counted so far.
    fn classified(&self) -> anyhow::Result<u64> {
        match self.receiver {
            Receiver::FilterAgent => {
                // Every packet is counted once: by its rule, or by a reason.
                let filter = self.filter.as_ref().context("filter not loaded")?;
                let (reasons, rules) = (filter.counters()?, filter.rule_counters()?);
                Ok(reasons.iter().chain(&rules).map(|c| c.packets).sum())
            }
            Receiver::NoFilter => rx_packets(self.netns, self.iface),
            Receiver::NftLinear | Receiver::NftSet => {
                let listing = self
                    .netns
                    .exec("nft", &["list", "table", "netdev", NFT_TABLE])?;
                Ok(sum_after(
                    &String::from_utf8_lossy(&listing.stdout),
                    "packets ",
                ))
            }
            Receiver::IptablesNotrack | Receiver::Ipset => {
                let saved = self
                    .netns
                    .exec("iptables-legacy-save", &["-c", "-t", "raw"])?;
                Ok(prerouting_packets(&String::from_utf8_lossy(&saved.stdout)))
            }
        }
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        if let Some(link) = self.empty_link.take() {
            let _ = self.empty.detach(link);
        }
        // Dropping the filter detaches it.
        self.filter = None;
        let _ = match self.receiver {
            Receiver::NftLinear | Receiver::NftSet => self
                .netns
                .exec("nft", &["delete", "table", "netdev", NFT_TABLE])
                .map(drop),
            Receiver::IptablesNotrack | Receiver::Ipset => {
                let _ = self.netns.exec("iptables-legacy", &["-t", "raw", "-F"]);
                let _ = self.netns.exec("iptables-legacy", &["-t", "raw", "-X"]);
                self.netns
                    .exec("ipset", &["-exist", "destroy", IPSET_NAME])
                    .map(drop)
            }
            Receiver::NoFilter | Receiver::FilterAgent => Ok(()),
        };
    }
}

fn prefixes(workload: &Workload) -> anyhow::Result<&[IpNet]> {
    workload
        .prefixes
        .as_deref()
        .context("sets hold address lists only")
}

/// Packets received by `iface` (the kernel's interface statistics).
fn rx_packets(netns: &Netns, iface: &str) -> anyhow::Result<u64> {
    let output = netns.ip(&["-s", "-j", "link", "show", "dev", iface])?;
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    stats[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx packet count in `ip -s -j link`")
}

/// The sum of the numbers that follow each `marker` in `text`.
fn sum_after(text: &str, marker: &str) -> u64 {
    text.split(marker)
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Packets counted by raw PREROUTING's rules and policy, from
/// `iptables-save -c`: `[packets:bytes]` on every rule and the policy line.
fn prerouting_packets(saved: &str) -> u64 {
    saved
        .lines()
        .filter(|line| line.contains("PREROUTING"))
        .filter_map(|line| {
            let counters = line.split('[').nth(1)?.split(':').next()?;
            counters.parse::<u64>().ok()
        })
        .sum()
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

/// Some kernels (sandboxed ones) refuse to send packets from
/// BPF_PROG_TEST_RUN at all; nothing here can run then.
#[derive(Debug)]
pub struct LiveFramesRefused(std::io::Error);

impl std::fmt::Display for LiveFramesRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this kernel refuses XDP live frames (BPF_PROG_TEST_RUN with \
             BPF_F_TEST_XDP_LIVE_FRAMES: {}), the only way this harness sends packets",
            self.0
        )
    }
}

impl std::error::Error for LiveFramesRefused {}

/// Sends one batch of a frame: a kernel that refuses live frames with
/// EPERM is [`LiveFramesRefused`], any other failure stays what it is.
fn refuses_live_frames(pair: &Pair, macs: ([u8; 6], [u8; 6])) -> anyhow::Result<()> {
    let frame = addressed(&[0; FRAME_BYTES], macs)?;
    let sender = Sender::new(&[frame])?;
    let sent = pair
        .client
        .run(|| sender.send(if_index(&pair.client_if)?, BATCH))?;
    match sent {
        Ok(_) => Ok(()),
        Err(err) => {
            let refused = err
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .find(|io| io.raw_os_error() == Some(libc::EPERM));
            match refused {
                Some(io) => Err(LiveFramesRefused(std::io::Error::from_raw_os_error(
                    io.raw_os_error().unwrap_or(libc::EPERM),
                ))
                .into()),
                None => Err(err),
            }
        }
    }
}

fn if_index(iface: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: `name` is a valid NUL-terminated string for the whole call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(index != 0, "no interface {iface}");
    Ok(index)
}

/// What one run sent, and what it cost.
struct Sample {
    packets: u64,
    /// Busy time of the whole machine during the run.
    cpu_ns: u64,
    /// The kernel's own timing of its send loop.
    kernel_ns_per_packet: f64,
}

/// The `transmit` program with the frames it sends in turn.
struct Sender {
    ebpf: Ebpf,
    frames: u32,
}

impl Sender {
    fn new(frames: &[Vec<u8>]) -> anyhow::Result<Self> {
        let count = u32::try_from(frames.len())?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(sender::FRAMES, count)
            .load(BASELINE_OBJECT)?;
        let map = ebpf.map_mut(sender::FRAMES).context("FRAMES map")?;
        let mut array = Array::<_, [u8; FRAME_BYTES]>::try_from(map)?;
        for (index, frame) in (0..).zip(frames) {
            array.set(index, <[u8; FRAME_BYTES]>::try_from(frame.as_slice())?, 0)?;
        }
        let transmit: &mut Xdp = ebpf
            .program_mut("transmit")
            .context("transmit program")?
            .try_into()?;
        transmit.load()?;
        Ok(Self {
            ebpf,
            frames: count,
        })
    }

    /// Sends `count` frames out of `ifindex` (live frames: the XDP_TX
    /// verdict is carried out), `BATCH` at a time; returns the kernel's
    /// time per frame.
    fn send(&self, ifindex: u32, count: u32) -> anyhow::Result<f64> {
        let transmit: &Xdp = self
            .ebpf
            .program("transmit")
            .context("transmit program")?
            .try_into()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex. Live frames need data_end and the
        // interface the frames "arrived" on (and so are transmitted from).
        let mut context = [0u8; 24];
        context[4..8].copy_from_slice(&(FRAME_BYTES as u32).to_ne_bytes());
        context[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let template = [0u8; FRAME_BYTES];
        let result = transmit.test_run(TestRunOptions {
            data_in: Some(&template),
            ctx_in: Some(&context),
            repeat: count,
            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
            ..TestRunOptions::new()
        })?;
        Ok(result.duration.as_nanos() as f64)
    }

    /// Frames per run, so that a run takes about `seconds`: a whole number
    /// of rounds over the mix, at least one batch of each frame.
    fn calibrate(&self, ifindex: u32, seconds: f64) -> anyhow::Result<u32> {
        let probe = self.frames * BATCH;
        let ns_per_packet = self.send(ifindex, probe)?;
        let rounds = (seconds * 1e9 / ns_per_packet / f64::from(self.frames)) as u32;
        Ok(rounds.clamp(BATCH, u32::MAX / self.frames) * self.frames)
    }

    fn run(&self, ifindex: u32, count: u32) -> anyhow::Result<Sample> {
        let cpu_before = busy_cpu_ns()?;
        let kernel_ns_per_packet = self.send(ifindex, count)?;
        // Softirq work the last batch scheduled may run just after the
        // call; give it a moment so that its time and counts land here.
        std::thread::sleep(Duration::from_millis(20));
        Ok(Sample {
            packets: u64::from(count),
            cpu_ns: busy_cpu_ns()? - cpu_before,
            kernel_ns_per_packet,
        })
    }
}

/// Busy time of all CPUs together (/proc/stat: user, nice, system, irq
/// and softirq; not idle, iowait or the hypervisor's steal), in ns.
fn busy_cpu_ns() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(ticks.len() >= 8, "unexpected /proc/stat: {line}");
    let busy: u64 = ticks[..7].iter().sum::<u64>() - ticks[3] - ticks[4];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(busy * 1_000_000_000 / hz)
}

fn nft(netns: &Netns, script: &str) -> anyhow::Result<()> {
    netns.exec_with_input("nft", &["-f", "-"], script)?;
    Ok(())
}

fn iptables_restore(netns: &Netns, script: &str) -> anyhow::Result<()> {
    netns.exec_with_input("iptables-legacy-restore", &[], script)?;
    Ok(())
}

/// The single IPv4 prefix of an address condition (all the generated rule
/// sets use).
fn single_net(list: &filter_agent::config::AddressList) -> anyhow::Result<Ipv4Net> {
    match list.nets.as_slice() {
        [IpNet::V4(net)] => Ok(*net),
        _ => bail!("only rules with one IPv4 prefix per address translate"),
    }
}

/// The single port range of a port condition.
fn single_range(ranges: &[(u16, u16)]) -> anyhow::Result<(u16, u16)> {
    match ranges {
        [range] => Ok(*range),
        _ => bail!("only rules with one port range translate"),
    }
}

fn protocol_name(proto: u8) -> anyhow::Result<&'static str> {
    match proto {
        packet::IPPROTO_TCP => Ok("tcp"),
        packet::IPPROTO_UDP => Ok("udp"),
        other => bail!("protocol {other} does not translate"),
    }
}

/// The parts of `rule` the translations handle: what the generated
/// rule sets use.
fn translatable(rule: &Rule) -> anyhow::Result<()> {
    ensure!(
        rule.tcp_flags.is_none() && rule.icmp_type.is_none() && rule.icmp_code.is_none(),
        "rule {}: TCP flags and ICMP do not translate",
        rule.name
    );
    ensure!(
        rule.proto.is_some() || (rule.sport.is_none() && rule.dport.is_none()),
        "rule {}: ports without a protocol do not translate",
        rule.name
    );
    Ok(())
}

/// How nftables and iptables spell the conditions the rule sets use.
struct Syntax {
    src: &'static str,
    dst: &'static str,
    proto: &'static str,
    sport: &'static str,
    dport: &'static str,
    /// Between the ends of a port range.
    range: char,
}

const NFT: Syntax = Syntax {
    src: "ip saddr",
    dst: "ip daddr",
    proto: "ip protocol",
    sport: "th sport",
    dport: "th dport",
    range: '-',
};

const IPTABLES: Syntax = Syntax {
    src: "-s",
    dst: "-d",
    proto: "-p",
    sport: "--sport",
    dport: "--dport",
    range: ':',
};

/// `rule`'s conditions in `syntax`, separated by spaces.
fn conditions(rule: &Rule, syntax: &Syntax) -> anyhow::Result<String> {
    translatable(rule)?;
    let mut parts = Vec::new();
    for (keyword, list) in [(syntax.src, &rule.src), (syntax.dst, &rule.dst)] {
        if let Some(list) = list {
            parts.push(format!("{keyword} {}", single_net(list)?));
        }
    }
    if let Some(proto) = rule.proto {
        parts.push(format!("{} {}", syntax.proto, protocol_name(proto)?));
    }
    for (keyword, ranges) in [(syntax.sport, &rule.sport), (syntax.dport, &rule.dport)] {
        if let Some(ranges) = ranges {
            let (low, high) = single_range(ranges)?;
            parts.push(format!("{keyword} {low}{}{high}", syntax.range));
        }
    }
    Ok(parts.join(" "))
}

/// `config` as an nftables netdev ingress chain, rule by rule.
fn nft_linear(config: &Config, iface: &str) -> anyhow::Result<String> {
    let mut script = format!(
        "table netdev {NFT_TABLE} {{\n chain ingress {{\n  \
         type filter hook ingress device \"{iface}\" priority 0; policy accept;\n"
    );
    for rule in &config.rules {
        let conditions = conditions(rule, &NFT)?;
        writeln!(
            script,
            "  {conditions} counter {}",
            nft_verdict(rule.action)
        )?;
    }
    writeln!(
        script,
        "  counter {}\n }}\n}}",
        nft_verdict(config.filter.default)
    )?;
    Ok(script)
}

fn nft_verdict(action: Action) -> &'static str {
    match action {
        Action::Allow => "accept",
        Action::Deny => "drop",
    }
}

/// An address list as one nftables interval set, dropped on a source match.
fn nft_set(nets: &[IpNet], iface: &str) -> String {
    let mut script = format!(
        "table netdev {NFT_TABLE} {{\n set {IPSET_NAME} {{\n  type ipv4_addr; flags interval; \
         auto-merge;\n  elements = {{ "
    );
    let elements: Vec<String> = nets.iter().map(ToString::to_string).collect();
    script.push_str(&elements.join(", "));
    write!(
        script,
        " }}\n }}\n chain ingress {{\n  \
         type filter hook ingress device \"{iface}\" priority 0; policy accept;\n  \
         ip saddr @{IPSET_NAME} counter drop\n  counter accept\n }}\n}}\n"
    )
    .expect("writing to a String");
    script
}

/// `config` as iptables raw PREROUTING rules: accepted packets are marked
/// NOTRACK (and so skip conntrack), denied ones dropped.
fn iptables_notrack(config: &Config) -> anyhow::Result<String> {
    let mut script = raw_table_header();
    for rule in &config.rules {
        let conditions = conditions(rule, &IPTABLES)?;
        writeln!(
            script,
            "-A PREROUTING {conditions} -j {}",
            iptables_target(rule.action)
        )?;
    }
    writeln!(
        script,
        "-A PREROUTING -j {}\nCOMMIT",
        iptables_target(config.filter.default)
    )?;
    Ok(script)
}

/// The raw table with the chain that accepted packets jump to.
fn raw_table_header() -> String {
    format!(
        "*raw\n:PREROUTING ACCEPT [0:0]\n:{ALLOW_CHAIN} - [0:0]\n\
         -A {ALLOW_CHAIN} -j CT --notrack\n-A {ALLOW_CHAIN} -j ACCEPT\n"
    )
}

fn iptables_target(action: Action) -> &'static str {
    match action {
        Action::Allow => ALLOW_CHAIN,
        Action::Deny => "DROP",
    }
}

/// An address list as an ipset (hash:net), for `ipset restore`.
fn ipset(nets: &[IpNet]) -> String {
    let mut script = format!(
        "create {IPSET_NAME} hash:net family inet maxelem {}\n",
        nets.len().max(65_536)
    );
    for net in nets {
        writeln!(script, "add {IPSET_NAME} {net}").expect("writing to a String");
    }
    script
}

/// iptables raw rules that drop sources in the ipset, NOTRACK the rest.
fn iptables_ipset() -> String {
    format!(
        "{}-A PREROUTING -m set --match-set {IPSET_NAME} src -j DROP\n\
         -A PREROUTING -j {ALLOW_CHAIN}\nCOMMIT\n",
        raw_table_header()
    )
}
