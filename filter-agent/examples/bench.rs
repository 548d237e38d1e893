//! `cargo xtask bench`: ns/packet of the real program (BPF_PROG_TEST_RUN)
//! for ClassBench-like rule sets of growing size, side by side with
//! xdp-filter (Debian's xdp-tools) on the same frames, in one run.
//!
//! Usage: bench [--runs N] [--repeat N] [--json PATH] [--sizes 10,100,...]
//!              [--set-sizes 100000,...]

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::Xdp;
use filter_agent::{
    compile::{RuleSet, compile},
    config::{
        Action, AddressList, Config, FilterSettings, Fragments, GuardAction, GuardSettings,
        Location, Mode, Rule,
    },
    loader::{Filter, LoadOptions, time_program},
    packet::{self, PacketSpec, Transport, tcp_flag},
    reference,
};
use ipnet::{IpNet, Ipv4Net};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

/// One line of the table, as written to the JSON file.
#[derive(serde::Serialize)]
struct Row {
    rules: usize,
    ns_per_packet: f64,
    xdp_filter_ns_per_packet: Option<f64>,
    map_bytes: usize,
    compile_apply_ms: f64,
}

/// One line of the address-set table.
#[derive(serde::Serialize)]
struct SetRow {
    prefixes: usize,
    ns_per_packet: f64,
    kernel_lpm_ns_per_packet: f64,
    load_s: f64,
    kernel_lpm_load_s: f64,
    map_bytes: usize,
}

#[derive(serde::Serialize)]
struct Report {
    empty_program_ns: f64,
    /// The smallest rule set with `[guard] action = "off"`.
    guard_off_ns: f64,
    /// The smallest rule set with event sampling off.
    events_off_ns: f64,
    /// The smallest rule set on return traffic, with and without the guard.
    replies_guard_on_ns: f64,
    replies_guard_off_ns: f64,
    rules: Vec<Row>,
    sets: Vec<SetRow>,
}

/// The `empty` and `lpm` reference programs (filter-ebpf/src/baseline.rs).
static BASELINE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));

struct Options {
    runs: usize,
    repeat: u32,
    sizes: Vec<usize>,
    set_sizes: Vec<usize>,
    json: Option<PathBuf>,
}

/// "10,100,1000" -> [10, 100, 1000]
fn numbers(list: &str) -> anyhow::Result<Vec<usize>> {
    Ok(list.split(',').map(str::parse).collect::<Result<_, _>>()?)
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        runs: 7,
        repeat: 20_000,
        sizes: vec![10, 100, 1_000, 10_000],
        set_sizes: vec![100_000, 1_000_000],
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => options.runs = value()?.parse()?,
            "--repeat" => options.repeat = value()?.parse()?,
            "--json" => options.json = Some(value()?.into()),
            "--sizes" => options.sizes = numbers(&value()?)?,
            "--set-sizes" => options.set_sizes = numbers(&value()?)?,
            "--bench" => {} // added by `cargo bench`-style runners
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(options)
}

/// The IPv4 space the generated rules and random traffic share.
fn pool_address(rng: &mut StdRng) -> Ipv4Addr {
    Ipv4Addr::from(rng.random::<u32>() & 0x3fff_ffff | 0x0a00_0000)
}

/// ClassBench-like (acl/fw shapes): prefixes of realistic lengths, well-known
/// ports and port ranges, mostly TCP/UDP, a default deny at the end.
fn rule_set(rng: &mut StdRng, count: usize) -> Config {
    let prefix = |rng: &mut StdRng, wildcard: f64| -> Option<Arc<AddressList>> {
        if rng.random_bool(wildcard) {
            return None;
        }
        let len = *[8u8, 16, 16, 20, 24, 24, 24, 28, 32, 32]
            .choose(rng)
            .unwrap();
        let addr = pool_address(rng);
        let net = IpNet::V4(Ipv4Net::new(addr, len).unwrap().trunc());
        Some(Arc::new(AddressList {
            set: None,
            nets: vec![net],
        }))
    };
    let rules = (0..count)
        .map(|index| {
            let proto = *[
                packet::IPPROTO_TCP,
                packet::IPPROTO_TCP,
                packet::IPPROTO_TCP,
                packet::IPPROTO_UDP,
            ]
            .choose(rng)
            .unwrap();
            let dport = match rng.random_range(0..10) {
                0..3 => None,
                3..7 => {
                    let port = *[22u16, 25, 53, 80, 110, 123, 143, 443, 993, 3306, 5432, 8080]
                        .choose(rng)
                        .unwrap();
                    Some(vec![(port, port)])
                }
                7..9 => Some(vec![
                    *[(1024, 65535), (6000, 6063), (32768, 60999), (0, 1023)]
                        .choose(rng)
                        .unwrap(),
                ]),
                _ => {
                    let port = rng.random();
                    Some(vec![(port, port)])
                }
            };
            let sport = rng.random_bool(0.15).then(|| vec![(1024, 65535)]);
            Rule {
                name: format!("r{index}"),
                action: if rng.random_bool(0.7) {
                    Action::Allow
                } else {
                    Action::Deny
                },
                proto: Some(proto),
                src: prefix(rng, 0.4),
                dst: prefix(rng, 0.15),
                sport,
                dport,
                tcp_flags: None,
                icmp_type: None,
                icmp_code: None,
                location: Location {
                    file: PathBuf::from("bench"),
                    line: index + 1,
                    column: 1,
                },
            }
        })
        .collect();
    Config {
        filter: FilterSettings {
            default: Action::Deny,
            mode: Mode::Enforce,
            fragments: Fragments::MatchL3,
        },
        guard: GuardSettings::default(),
        rules,
        implicit_nd: None,
    }
}

/// A frame that `rule` accepts (inside its prefixes and port ranges).
fn frame_for(rng: &mut StdRng, rule: &Rule) -> Vec<u8> {
    // The rule's prefix, or the 10.0.0.0/10 the generated rules draw from.
    let address = |rng: &mut StdRng, list: &Option<Arc<AddressList>>| {
        let any: IpNet = "10.0.0.0/10".parse().unwrap();
        packet::address_in(
            list.as_ref().map_or(&any, |list| &list.nets[0]),
            rng.random(),
        )
    };
    let port = |rng: &mut StdRng, ranges: &Option<Vec<(u16, u16)>>| match ranges {
        Some(ranges) => rng.random_range(ranges[0].0..=ranges[0].1),
        None => rng.random(),
    };
    let (sport, dport) = (port(rng, &rule.sport), port(rng, &rule.dport));
    let transport = match rule.proto {
        Some(packet::IPPROTO_UDP) => Transport::Udp { sport, dport },
        _ => Transport::Tcp {
            sport,
            dport,
            flags: tcp_flag::SYN,
        },
    };
    PacketSpec::new(address(rng, &rule.src), address(rng, &rule.dst), transport).build()
}

/// Replies to this host's connections (TCP with ACK from a service port,
/// to any port): the traffic the guard inspects most closely.
fn return_traffic(rng: &mut StdRng, count: usize) -> Vec<Vec<u8>> {
    let any: IpNet = "10.0.0.0/10".parse().unwrap();
    (0..count)
        .map(|_| {
            let transport = Transport::Tcp {
                sport: 443,
                dport: rng.random_range(1024..=65535),
                flags: tcp_flag::ACK,
            };
            let (src, dst) = (
                packet::address_in(&any, rng.random()),
                packet::address_in(&any, rng.random()),
            );
            PacketSpec::new(src, dst, transport).build()
        })
        .collect()
}

/// A third each: matching an early rule, a late rule, and random traffic.
fn packet_mix(rng: &mut StdRng, config: &Config, count: usize) -> Vec<Vec<u8>> {
    let rules = &config.rules;
    (0..count)
        .map(|i| match i % 3 {
            0 => {
                let early = rng.random_range(0..rules.len().div_ceil(10));
                frame_for(rng, &rules[early])
            }
            1 => {
                let late = rng.random_range(rules.len() * 9 / 10..rules.len());
                frame_for(rng, &rules[late])
            }
            _ => {
                let any = Rule {
                    src: None,
                    dst: None,
                    sport: None,
                    dport: None,
                    ..rules[0].clone()
                };
                frame_for(rng, &any)
            }
        })
        .collect()
}

/// Times one frame through one program.
type Timer<'a> = Box<dyn Fn(&[u8]) -> anyhow::Result<Duration> + 'a>;

/// A program to time, and the frames to time it on.
struct Subject<'a> {
    frames: &'a [Vec<u8>],
    time: Timer<'a>,
}

/// Mean ns/packet over each subject's frames, median over `runs` rounds.
/// Every round times every subject, so drift on a shared VM hits all of
/// them alike instead of whichever happened to run during it.
fn measure(runs: usize, subjects: &[Subject<'_>]) -> anyhow::Result<Vec<f64>> {
    let mut means = vec![Vec::with_capacity(runs); subjects.len()];
    for _ in 0..runs {
        for (subject, means) in subjects.iter().zip(&mut means) {
            let mut total = 0.0;
            for frame in subject.frames {
                total += (subject.time)(frame)?.as_nanos() as f64;
            }
            means.push(total / subject.frames.len() as f64);
        }
    }
    Ok(means
        .into_iter()
        .map(|mut means| {
            means.sort_by(f64::total_cmp);
            means[means.len() / 2]
        })
        .collect())
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

/// Random IPv4 prefixes, mostly /24 as in real block lists.
fn prefixes(rng: &mut StdRng, count: usize) -> Vec<Ipv4Net> {
    (0..count)
        .map(|_| {
            let len = *[16u8, 20, 22, 24, 24, 24, 24, 24, 28, 32]
                .choose(rng)
                .unwrap();
            Ipv4Net::new(Ipv4Addr::from(rng.random::<u32>()), len)
                .unwrap()
                .trunc()
        })
        .collect()
}

/// Half the frames from inside listed prefixes, half from anywhere.
fn set_frames(rng: &mut StdRng, nets: &[Ipv4Net], count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let src = if i % 2 == 0 {
                packet::address_in(&IpNet::V4(*nets.choose(rng).unwrap()), rng.random())
            } else {
                IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
            };
            let transport = Transport::Tcp {
                sport: 40000,
                dport: 443,
                flags: tcp_flag::SYN,
            };
            PacketSpec::new(src, Ipv4Addr::new(192, 0, 2, 1).into(), transport).build()
        })
        .collect()
}

/// A set of `count` prefixes behind one deny rule, against the same
/// prefixes in a kernel LPM trie.
fn measure_set(options: &Options, rng: &mut StdRng, count: usize) -> anyhow::Result<SetRow> {
    let nets = prefixes(rng, count);
    let frames = set_frames(rng, &nets, 60);
    let list = Arc::new(AddressList {
        set: Some("bench".into()),
        nets: nets.iter().map(|&net| IpNet::V4(net)).collect(),
    });
    let mut config = rule_set(rng, 1);
    config.filter.default = Action::Allow;
    config.rules[0] = Rule {
        src: Some(list),
        dst: None,
        proto: None,
        sport: None,
        dport: None,
        action: Action::Deny,
        ..config.rules[0].clone()
    };
    let started = Instant::now();
    let rule_set = compile(&config)?;
    let filter = load(&rule_set)?;
    let load_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut baseline = aya::EbpfLoader::new()
        .map_max_entries("PREFIXES", count as u32)
        .load(BASELINE_OBJECT)?;
    let map = baseline.map_mut("PREFIXES").context("PREFIXES map")?;
    let mut trie = aya::maps::LpmTrie::<_, [u8; 4], u32>::try_from(map)?;
    for net in &nets {
        let key =
            aya::maps::lpm_trie::Key::new(u32::from(net.prefix_len()), net.network().octets());
        trie.insert(&key, 1, 0)?;
    }
    let lpm: &mut Xdp = baseline
        .program_mut("lpm")
        .context("lpm program")?
        .try_into()?;
    lpm.load()?;
    let kernel_lpm_load_s = started.elapsed().as_secs_f64();
    let lpm: &Xdp = baseline.program("lpm").context("lpm program")?.try_into()?;

    let repeat = options.repeat;
    let measured = measure(
        options.runs,
        &[
            Subject {
                frames: &frames,
                time: Box::new(|frame| Ok(filter.time_packet(frame, repeat)?)),
            },
            Subject {
                frames: &frames,
                time: Box::new(|frame| Ok(time_program(lpm, frame, repeat)?)),
            },
        ],
    )?;
    Ok(SetRow {
        prefixes: count,
        ns_per_packet: measured[0],
        kernel_lpm_ns_per_packet: measured[1],
        load_s,
        kernel_lpm_load_s,
        map_bytes: rule_set.map_bytes(),
    })
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
    frames: Vec<Vec<u8>>,
    filter: Filter,
    map_bytes: usize,
    apply_ms: f64,
}

fn load_rule_set(rng: &mut StdRng, size: usize) -> anyhow::Result<Loaded> {
    let config = rule_set(rng, size);
    let frames = packet_mix(rng, &config, 60);
    let started = Instant::now();
    let rule_set = compile(&config)?;
    let filter = load(&rule_set)?;
    let apply_ms = started.elapsed().as_secs_f64() * 1e3;
    // The benchmark is only meaningful if the program decides right.
    for frame in &frames {
        let (outcome, _) = reference::classify(&config, frame);
        let (_, got) = filter.classify_frame(frame)?;
        if got != outcome {
            bail!("{size} rules: kernel says {got:?}, reference {outcome:?}");
        }
    }
    Ok(Loaded {
        size,
        config,
        frames,
        filter,
        map_bytes: rule_set.map_bytes(),
        apply_ms,
    })
}

fn main() -> anyhow::Result<()> {
    let options = options()?;
    pin_to_cpu(0);
    let mut rng = StdRng::seed_from_u64(7);
    let loaded = options
        .sizes
        .iter()
        .map(|&size| load_rule_set(&mut rng, size))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let first = loaded.first().context("no rule-set sizes")?;
    // xdp-filter with the smallest set's exact-match entries, on its frames.
    let xdp_filter = XdpFilter::load(&first.config)
        .map_err(|err| eprintln!("xdp-filter not measured: {err:#}"))
        .ok();
    // The smallest set again, without the guard, for its per-packet cost.
    let mut unguarded = first.config.clone();
    unguarded.guard.action = GuardAction::Off;
    let unguarded = load(&compile(&unguarded)?)?;
    let replies = return_traffic(&mut rng, 60);
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
    let mut subjects: Vec<Subject<'_>> = loaded
        .iter()
        .map(|set| Subject {
            frames: &set.frames,
            time: Box::new(|frame| Ok(set.filter.time_packet(frame, repeat)?)),
        })
        .collect();
    subjects.push(Subject {
        frames: &first.frames,
        time: Box::new(|frame| Ok(time_program(empty, frame, repeat)?)),
    });
    subjects.push(Subject {
        frames: &first.frames,
        time: Box::new(|frame| Ok(unguarded.time_packet(frame, repeat)?)),
    });
    subjects.push(Subject {
        frames: &first.frames,
        time: Box::new(|frame| Ok(quiet.time_packet(frame, repeat)?)),
    });
    subjects.push(Subject {
        frames: &replies,
        time: Box::new(|frame| Ok(first.filter.time_packet(frame, repeat)?)),
    });
    subjects.push(Subject {
        frames: &replies,
        time: Box::new(|frame| Ok(unguarded.time_packet(frame, repeat)?)),
    });
    if let Some((_, program)) = &xdp_filter {
        subjects.push(Subject {
            frames: &first.frames,
            time: Box::new(|frame| Ok(time_program(program, frame, repeat)?)),
        });
    }
    let measured = measure(options.runs, &subjects)?;
    let empty_ns = measured[loaded.len()];
    let guard_off_ns = measured[loaded.len() + 1];
    let events_off_ns = measured[loaded.len() + 2];
    let (replies_guard_on_ns, replies_guard_off_ns) =
        (measured[loaded.len() + 3], measured[loaded.len() + 4]);
    let xdp_filter_ns = xdp_filter.as_ref().map(|_| measured[loaded.len() + 5]);

    println!(
        "{:>7} {:>16} {:>14} {:>12} {:>18}",
        "rules", "filter-agent ns", "xdp-filter ns", "map MiB", "compile+apply ms"
    );
    let mut rows = Vec::new();
    for (index, (set, ns)) in loaded.iter().zip(&measured).enumerate() {
        let peer = xdp_filter_ns.filter(|_| index == 0);
        let peer_text = peer.map_or("-".to_owned(), |ns| format!("{ns:.1}"));
        let map_mib = set.map_bytes as f64 / (1 << 20) as f64;
        println!(
            "{:>7} {ns:>16.1} {peer_text:>14} {map_mib:>12.2} {:>18.1}",
            set.size, set.apply_ms
        );
        rows.push(Row {
            rules: set.size,
            ns_per_packet: *ns,
            xdp_filter_ns_per_packet: peer,
            map_bytes: set.map_bytes,
            compile_apply_ms: set.apply_ms,
        });
    }
    println!("empty XDP program (the cost of BPF_PROG_TEST_RUN itself): {empty_ns:.1} ns");
    println!(
        "guard on (above) vs off, {} rules: {:.1} vs {guard_off_ns:.1} ns; \
         on return traffic (TCP ACK to random ports): {replies_guard_on_ns:.1} vs {replies_guard_off_ns:.1} ns",
        first.size, measured[0]
    );
    println!(
        "events on (above, the default 100/s per CPU) vs off, {} rules: {:.1} vs {events_off_ns:.1} ns",
        first.size, measured[0]
    );
    drop(subjects);
    drop(loaded);

    println!(
        "\n{:>9} {:>16} {:>14} {:>12} {:>14} {:>9}",
        "prefixes", "filter-agent ns", "kernel LPM ns", "load s", "LPM load s", "map MiB"
    );
    let mut sets = Vec::new();
    for &count in &options.set_sizes {
        let row = measure_set(&options, &mut rng, count)?;
        println!(
            "{:>9} {:>16.1} {:>14.1} {:>12.2} {:>14.2} {:>9.1}",
            row.prefixes,
            row.ns_per_packet,
            row.kernel_lpm_ns_per_packet,
            row.load_s,
            row.kernel_lpm_load_s,
            row.map_bytes as f64 / (1 << 20) as f64
        );
        sets.push(row);
    }
    if let Some(path) = options.json {
        let report = Report {
            empty_program_ns: empty_ns,
            guard_off_ns,
            events_off_ns,
            replies_guard_on_ns,
            replies_guard_off_ns,
            rules: rows,
            sets,
        };
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("written to {}", path.display());
    }
    Ok(())
}
