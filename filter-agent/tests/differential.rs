//! The XDP program against the reference model: random rule sets, random
//! frames (both families, VLANs, fragments, extension headers, options,
//! truncation at random bytes, corrupted bytes). Verdict and deciding
//! counter must be equal for every frame. Needs root.
//!
//! `DIFFERENTIAL_SEED=N` replays one run; the seed is printed on failure.

mod support;

use std::net::IpAddr;

use filter_agent::{
    kernel::loader::{Filter, LoadOptions, xdp_action},
    oracle::packet::{self, PacketSpec, Transport},
    oracle::reference::{self, GuardView, Outcome},
    rules::compile::compile,
    rules::config::Action,
};
use filter_common::guard;
use ipnet::IpNet;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use support::random::{
    ICMP_VALUES, PORTS, V4_PREFIXES, V6_PREFIXES, many_prefixes_config, random_config, random_step,
    seed_or,
};

const RULE_SETS: usize = 1_000;
const FRAMES_PER_SET: usize = 60;
const XDP_DROP: u32 = xdp_action::DROP;
const XDP_PASS: u32 = xdp_action::PASS;

/// An address inside a random pool prefix (so prefixes of all lengths hit).
fn random_address(rng: &mut StdRng, v6: bool) -> IpAddr {
    let pool = if v6 { V6_PREFIXES } else { V4_PREFIXES };
    let net: IpNet = pool.choose(rng).unwrap().parse().unwrap();
    packet::address_in(&net, rng.random())
}

fn random_port(rng: &mut StdRng) -> u16 {
    let (lo, hi) = *PORTS.choose(rng).unwrap();
    match rng.random_range(0..4) {
        0 => lo.saturating_sub(1),
        1 => hi.saturating_add(1),
        _ => rng.random_range(lo..=hi),
    }
}

fn random_frame(rng: &mut StdRng) -> Vec<u8> {
    if rng.random_bool(0.03) {
        return packet::arp_request();
    }
    let v6 = rng.random_bool(0.45);
    let transport = match rng.random_range(0..10) {
        0..4 => Transport::Tcp {
            sport: random_port(rng),
            dport: random_port(rng),
            flags: rng.random(),
        },
        4..7 => Transport::Udp {
            sport: random_port(rng),
            dport: random_port(rng),
        },
        7..9 => Transport::Icmp {
            icmp_type: *ICMP_VALUES.choose(rng).unwrap(),
            code: *ICMP_VALUES.choose(rng).unwrap(),
        },
        _ => Transport::Other {
            proto: rng.random(),
            payload: vec![rng.random(); 4],
        },
    };
    let mut spec = PacketSpec::new(random_address(rng, v6), random_address(rng, v6), transport);
    spec.vlans = (0..[0, 0, 0, 1, 2, 3].choose(rng).copied().unwrap())
        .map(|_| rng.random_range(1..4095))
        .collect();
    if rng.random_bool(0.1) {
        spec.fragment_offset = rng.random_range(1..100);
    }
    if v6 && rng.random_bool(0.2) {
        let kinds = [
            packet::IPPROTO_HOPOPTS,
            packet::IPPROTO_ROUTING,
            packet::IPPROTO_DSTOPTS,
        ];
        spec.ipv6_extensions = (0..rng.random_range(1..=6))
            .map(|_| *kinds.choose(rng).unwrap())
            .collect();
        spec.ipv6_fragment_header = rng.random_bool(0.3);
    }
    if !v6 && rng.random_bool(0.1) {
        spec.ipv4_options = vec![1; rng.random_range(1..=40)];
    }
    let mut frame = spec.build();
    if rng.random_bool(0.05) {
        let at = rng.random_range(12..frame.len());
        frame[at] = rng.random();
    }
    if rng.random_bool(0.2) {
        // BPF_PROG_TEST_RUN needs at least an Ethernet header.
        frame.truncate(rng.random_range(14..=frame.len()));
    }
    frame
}

/// `DIFFERENTIAL_SEED`, or the clock's nanoseconds, and its generator.
fn seeded() -> (u64, StdRng) {
    let seed = seed_or(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map_or(0, |since| since.as_nanos() as u64)
    });
    (seed, StdRng::seed_from_u64(seed))
}

/// What the frames of some rule sets exercised.
#[derive(Default)]
struct Tally {
    checked: usize,
    /// Frames per guard view (ignored, in range, out of range).
    guard_views: [usize; 3],
    /// Frames a rate limit dropped.
    over_limit: usize,
}

impl Tally {
    fn add(mut self, other: Self) -> Self {
        self.checked += other.checked;
        for (mine, theirs) in self.guard_views.iter_mut().zip(other.guard_views) {
            *mine += theirs;
        }
        self.over_limit += other.over_limit;
        self
    }
}

#[test]
fn kernel_agrees_with_reference() {
    let (seed, _) = seeded();
    // Loading (verifying) a program per set is most of the time: the sets
    // are spread over the CPUs, each from its own generator, so that a
    // failure replays from the seed alone.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let tally = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|first| {
                scope.spawn(move || {
                    (first..RULE_SETS)
                        .step_by(threads)
                        .map(|set| check_set(seed, set))
                        .fold(Tally::default(), Tally::add)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .fold(Tally::default(), Tally::add)
    });
    let Tally {
        checked,
        guard_views,
        over_limit,
    } = tally;
    println!(
        "seed {seed}: {checked} frames over {RULE_SETS} rule sets agree; guard views \
         {guard_views:?}; {over_limit} over a rate limit"
    );
    // Every guard view and the rate limits must have been exercised.
    assert!(guard_views.iter().all(|&n| n > 100), "{guard_views:?}");
    assert!(
        over_limit > 100,
        "only {over_limit} frames were over a rate limit"
    );
}

/// One random rule set, loaded, against the reference on random frames.
fn check_set(seed: u64, set: usize) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ set as u64);
    let mut tally = Tally::default();
    let config = random_config(&mut rng);
    let source_seed = rng.random();
    let options = LoadOptions {
        trace: true,
        source_seed: Some(source_seed),
        ..LoadOptions::default()
    };
    let mut filter = Filter::load_with(&compile(&config).unwrap(), &options)
        .unwrap_or_else(|err| panic!("seed {seed}, set {set}: {err:?}"));
    let mut buckets = reference::Buckets::with_seed(source_seed);
    let mut clock = rng.random_range(0..1_000_000_000);
    for _ in 0..FRAMES_PER_SET {
        let frame = random_frame(&mut rng);
        clock += random_step(&mut rng);
        filter.set_clock(clock).unwrap();
        let (expected_outcome, action) =
            reference::classify_at(&config, &mut buckets, clock, &frame);
        let expected = (
            if action == Action::Deny {
                XDP_DROP
            } else {
                XDP_PASS
            },
            expected_outcome,
        );
        let guard_before = filter.guard_stats().unwrap();
        let got = filter.classify_frame(&frame).unwrap();
        let guard_after = filter.guard_stats().unwrap();
        let guard_moved: Vec<u32> = (0..guard::STAT_COUNT)
            .filter(|&i| guard_before[i as usize].packets != guard_after[i as usize].packets)
            .collect();
        let guard_expected = match reference::parse(&frame) {
            reference::Parsed::Ip(fields) => match reference::guard_inbound(&config.guard, &fields)
            {
                GuardView::Ignored => vec![],
                GuardView::InRange => vec![guard::RETURN_IN_RANGE],
                GuardView::OutOfRange => vec![guard::RETURN_OUT_OF_RANGE],
            },
            _ => vec![],
        };
        tally.guard_views[guard_expected.first().map_or(0, |&i| i as usize + 1)] += 1;
        assert_eq!(
            guard_moved, guard_expected,
            "DIFFERENTIAL_SEED={seed}, set {set}: guard counters\nframe {frame:02x?}\nguard {:?}",
            config.guard
        );
        // What the program recorded is what it counted.
        assert_eq!(
            filter.last_outcome().unwrap(),
            got.1,
            "DIFFERENTIAL_SEED={seed}"
        );
        tally.over_limit += usize::from(matches!(got.1, Outcome::OverLimit(_)));
        assert_eq!(
            got,
            expected,
            "DIFFERENTIAL_SEED={seed}, set {set}\nframe {frame:02x?}\nparsed {:?}\nconfig {config:#?}",
            reference::parse(&frame)
        );
        tally.checked += 1;
    }
    tally
}

/// Rule sets with thousands of address classes, over one and two chunks:
/// the pair summary then groups many classes per entry, and a group that
/// lost a rule would skip the word that decides. Frames are aimed inside
/// the rules' prefixes and ports, so that late rules decide.
#[test]
fn kernel_agrees_with_reference_on_thousands_of_address_classes() {
    let (seed, mut rng) = seeded();
    for (set, count) in [1_500, 6_000].into_iter().enumerate() {
        let config = many_prefixes_config(&mut rng, count);
        let rule_set = compile(&config).unwrap();
        assert!(
            rule_set.pairs.src_shift > 0 && rule_set.pairs.dst_shift > 0,
            "DIFFERENTIAL_SEED={seed}, set {set}: too few address classes to group"
        );
        let filter = Filter::load_with(&rule_set, &LoadOptions::default())
            .unwrap_or_else(|err| panic!("seed {seed}, set {set}: {err:?}"));
        let mut late = 0;
        for _ in 0..1_000 {
            let frame = aimed_frame(&mut rng, &config.rules);
            let (outcome, _) = reference::classify(&config, &frame);
            late += usize::from(matches!(outcome, Outcome::Rule(rule) if rule >= count / 2));
            let got = filter.classify_frame(&frame).unwrap().1;
            assert_eq!(
                got, outcome,
                "DIFFERENTIAL_SEED={seed}, set {set}\nframe {frame:02x?}"
            );
        }
        assert!(late > 100, "set {set}: only {late} frames decided late");
    }
}

/// A TCP or UDP frame from inside a random rule's source and destination
/// (anywhere in its family's pool where it has none) and port lists.
fn aimed_frame(rng: &mut StdRng, rules: &[filter_agent::rules::config::Rule]) -> Vec<u8> {
    let rule = rules.choose(rng).unwrap();
    let v6 = [&rule.src, &rule.dst]
        .iter()
        .find_map(|list| list.as_ref().map(|list| list.nets[0].addr().is_ipv6()))
        .unwrap_or_else(|| rng.random_bool(0.2));
    let mut address =
        |list: &Option<std::sync::Arc<filter_agent::rules::config::AddressList>>| match list {
            Some(list) => packet::address_in(&list.nets[0], rng.random()),
            None => random_address(rng, v6),
        };
    let (src, dst) = (address(&rule.src), address(&rule.dst));
    let mut port = |ports: &Option<Vec<(u16, u16)>>| match ports {
        Some(ports) => rng.random_range(ports[0].0..=ports[0].1),
        None => random_port(rng),
    };
    let (sport, dport) = (port(&rule.sport), port(&rule.dport));
    let transport = if rule.proto == Some(packet::IPPROTO_UDP) {
        Transport::Udp { sport, dport }
    } else {
        Transport::Tcp {
            sport,
            dport,
            flags: packet::tcp_flag::ACK,
        }
    };
    PacketSpec::new(src, dst, transport).build()
}
