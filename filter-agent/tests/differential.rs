//! The XDP program against the reference model: random rule sets, random
//! frames (both families, VLANs, fragments, extension headers, options,
//! truncation at random bytes, corrupted bytes). Verdict and deciding
//! counter must be equal for every frame. Needs root.
//!
//! `DIFFERENTIAL_SEED=N` replays one run; the seed is printed on failure.

use std::{net::IpAddr, path::PathBuf, sync::Arc};

use filter_agent::{
    kernel::loader::{Filter, xdp_action},
    oracle::packet::{self, PacketSpec, Transport},
    oracle::reference::{self, GuardView, Outcome},
    rules::compile::compile,
    rules::config::{
        Action, AddressList, Config, FilterSettings, Fragments, GuardAction, GuardSettings, Limit,
        Location, Mode, Rule, TcpFlags,
    },
};
use filter_common::{CHILD, WIDE, guard};
use ipnet::IpNet;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

const RULE_SETS: usize = 1_000;
const FRAMES_PER_SET: usize = 60;
const XDP_DROP: u32 = xdp_action::DROP;
const XDP_PASS: u32 = xdp_action::PASS;

/// A few prefixes per family, nested, so rules overlap and packets hit them.
const V4_PREFIXES: &[&str] = &[
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3/32",
    "10.1.2.128/25",
    "192.0.2.0/24",
    "192.0.2.7/32",
    "198.51.100.0/22",
];
const V6_PREFIXES: &[&str] = &[
    "::/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "2001:db8:1:2::/64",
    "2001:db8:1:2::3/128",
    "fe80::/10",
];
const PORTS: &[(u16, u16)] = &[
    (22, 22),
    (53, 53),
    (80, 80),
    (443, 443),
    (0, 1023),
    (1024, 65535),
    (32768, 60999),
    (8000, 8100),
    (65535, 65535),
];
const ICMP_VALUES: &[u8] = &[0, 1, 3, 4, 8, 11, 128, 129, 133, 135, 136, 137];
const FLAGS: &[u8] = &[0x01, 0x02, 0x04, 0x10];

fn random_rule(rng: &mut StdRng, index: usize) -> Rule {
    let proto = match rng.random_range(0..20) {
        0..6 => None,
        6..11 => Some(packet::IPPROTO_TCP),
        11..15 => Some(packet::IPPROTO_UDP),
        15..17 => Some(packet::IPPROTO_ICMP),
        17..19 => Some(packet::IPPROTO_ICMPV6),
        _ => Some(rng.random_range(0..=255)),
    };
    let addresses = |rng: &mut StdRng| -> Option<Arc<AddressList>> {
        rng.random_bool(0.5).then(|| {
            let nets = (0..rng.random_range(1..=3))
                .map(|_| {
                    let pool = if rng.random_bool(0.6) {
                        V4_PREFIXES
                    } else {
                        V6_PREFIXES
                    };
                    pool.choose(rng).unwrap().parse::<IpNet>().unwrap()
                })
                .collect();
            Arc::new(AddressList { set: None, nets })
        })
    };
    let ports = |rng: &mut StdRng| {
        rng.random_bool(0.5).then(|| {
            (0..rng.random_range(1..=2))
                .map(|_| *PORTS.choose(rng).unwrap())
                .collect()
        })
    };
    let icmp = |rng: &mut StdRng| {
        rng.random_bool(0.4).then(|| {
            (0..rng.random_range(1..=2))
                .map(|_| *ICMP_VALUES.choose(rng).unwrap())
                .collect()
        })
    };
    let is_port_proto = matches!(proto, Some(packet::IPPROTO_TCP | packet::IPPROTO_UDP));
    let is_icmp = matches!(proto, Some(packet::IPPROTO_ICMP | packet::IPPROTO_ICMPV6));
    let tcp_flags = (proto == Some(packet::IPPROTO_TCP) && rng.random_bool(0.4)).then(|| {
        let set = *FLAGS.choose(rng).unwrap();
        let clear = *FLAGS
            .iter()
            .filter(|&&f| f != set)
            .collect::<Vec<_>>()
            .choose(rng)
            .unwrap();
        if rng.random_bool(0.5) {
            TcpFlags { set, clear: *clear }
        } else {
            TcpFlags { set, clear: 0 }
        }
    });
    let action = if rng.random_bool(0.5) {
        Action::Allow
    } else {
        Action::Deny
    };
    let limit = (action == Action::Allow && rng.random_bool(0.3)).then(|| random_limit(rng));
    Rule {
        name: format!("r{index}"),
        action,
        proto,
        src: addresses(rng),
        dst: addresses(rng),
        sport: if is_port_proto { ports(rng) } else { None },
        dport: if is_port_proto { ports(rng) } else { None },
        tcp_flags,
        icmp_type: if is_icmp { icmp(rng) } else { None },
        icmp_code: if is_icmp { icmp(rng) } else { None },
        notrack: false,
        limit,
        location: location("random", index + 1),
    }
}

/// Rates whose intervals the frames' clock steps straddle; per source with
/// prefixes that the address pool's prefixes share or split.
fn random_limit(rng: &mut StdRng) -> Limit {
    const SECOND: u64 = 1_000_000_000;
    let (packets, per_ns) = *[
        (10, SECOND),
        (100, SECOND),
        (1000, SECOND),
        (60, 60 * SECOND),
    ]
    .choose(rng)
    .unwrap();
    let per_source = rng.random_bool(0.5).then(|| {
        (
            *[8, 16, 24, 25, 32].choose(rng).unwrap(),
            *[10, 32, 48, 64, 128].choose(rng).unwrap(),
        )
    });
    Limit {
        packets,
        per_ns,
        burst: rng.random_range(1..=4),
        per_source,
    }
}

/// How far the clock moves between two frames: often less than a limit's
/// interval, sometimes several.
fn random_step(rng: &mut StdRng) -> u64 {
    *[0, 100_000, 1_000_000, 5_000_000, 20_000_000, 300_000_000]
        .choose(rng)
        .unwrap()
}

fn random_config(rng: &mut StdRng) -> Config {
    let rules: Vec<Rule> = (0..rng.random_range(0..40))
        .map(|i| random_rule(rng, i))
        .collect();
    // As the config builds it: allow ICMPv6 types 133-137 from anywhere.
    let implicit_nd = rng.random_bool(0.7).then(|| Rule {
        proto: Some(packet::IPPROTO_ICMPV6),
        icmp_type: Some((133..=137).collect()),
        ..Rule::matching_all("nd", Action::Allow, location("random", 0))
    });
    Config {
        filter: FilterSettings {
            default: if rng.random_bool(0.5) {
                Action::Allow
            } else {
                Action::Deny
            },
            mode: Mode::Enforce,
            fragments: *[Fragments::MatchL3, Fragments::Allow, Fragments::Deny]
                .choose(rng)
                .unwrap(),
            max_map_mib: filter_agent::rules::config::DEFAULT_MAX_MAP_MIB,
            limit_sources: filter_agent::rules::config::DEFAULT_LIMIT_SOURCES,
        },
        guard: random_guard(rng),
        rules,
        implicit_nd,
        upstream: None,
    }
}

/// Ranges and services that the pool's ports fall inside, outside and on
/// the edges of.
fn random_guard(rng: &mut StdRng) -> GuardSettings {
    let ranges = [(32768, 60999), (1024, 65535), (8000, 8100), (22, 443)];
    let services = [(22, 22), (53, 53), (8000, 8100), (40000, 40010)];
    GuardSettings {
        action: *[GuardAction::Off, GuardAction::Count, GuardAction::Drop]
            .choose(rng)
            .unwrap(),
        ephemeral: *ranges.choose(rng).unwrap(),
        services: services
            .into_iter()
            .filter(|_| rng.random_bool(0.3))
            .collect(),
    }
}

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

/// `DIFFERENTIAL_SEED` if set, else `default`.
fn seed_or(default: impl FnOnce() -> u64) -> u64 {
    std::env::var("DIFFERENTIAL_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(default)
}

#[test]
fn kernel_agrees_with_reference() {
    let seed = seed_or(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map_or(0, |since| since.as_nanos() as u64)
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let mut checked = 0;
    // Frames per guard view (ignored, in range, out of range): all must occur.
    let mut guard_views = [0usize; 3];
    // Frames a rate limit dropped: limits must be exercised.
    let mut over_limit = 0;
    for set in 0..RULE_SETS {
        let config = random_config(&mut rng);
        let mut filter = Filter::load_traced(&compile(&config).unwrap())
            .unwrap_or_else(|err| panic!("seed {seed}, set {set}: {err:?}"));
        let mut buckets = reference::Buckets::default();
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
                reference::Parsed::Ip(fields) => {
                    match reference::guard_inbound(&config.guard, &fields) {
                        GuardView::Ignored => vec![],
                        GuardView::InRange => vec![guard::RETURN_IN_RANGE],
                        GuardView::OutOfRange => vec![guard::RETURN_OUT_OF_RANGE],
                    }
                }
                _ => vec![],
            };
            guard_views[guard_expected.first().map_or(0, |&i| i as usize + 1)] += 1;
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
            over_limit += usize::from(matches!(got.1, Outcome::OverLimit(_)));
            assert_eq!(
                got,
                expected,
                "DIFFERENTIAL_SEED={seed}, set {set}\nframe {frame:02x?}\nparsed {:?}\nconfig {config:#?}",
                reference::parse(&frame)
            );
            checked += 1;
        }
    }
    println!(
        "seed {seed}: {checked} frames over {RULE_SETS} rule sets agree; guard views \
         {guard_views:?}; {over_limit} over a rate limit"
    );
    assert!(guard_views.iter().all(|&n| n > 100), "{guard_views:?}");
    assert!(
        over_limit > 100,
        "only {over_limit} frames were over a rate limit"
    );
}

/// A list as operators' lists are: random prefixes of both families, and
/// duplicates, prefixes inside listed ones and listed prefixes' siblings
/// (adjacent to them) among them.
fn messy_list(rng: &mut StdRng, count: usize) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = Vec::with_capacity(count);
    while nets.len() < count {
        let net = match (nets.choose(rng).copied(), rng.random_range(0..10)) {
            (Some(net), 0) => net,
            (Some(net), 1 | 2) if net.prefix_len() < net.max_prefix_len() => {
                let len = rng.random_range(net.prefix_len() + 1..=net.max_prefix_len());
                let inside = packet::address_in(&net, random_bits(rng));
                IpNet::new(inside, len).unwrap().trunc()
            }
            (Some(net), 3 | 4) if net.prefix_len() > 0 => {
                let sibling = packet::address_in(&net.supernet().unwrap(), random_bits(rng));
                let sibling = IpNet::new(sibling, net.prefix_len()).unwrap().trunc();
                if sibling == net { continue } else { sibling }
            }
            _ => {
                let v6 = rng.random_bool(0.3);
                let len = if v6 {
                    rng.random_range(16..=128)
                } else {
                    rng.random_range(8..=32)
                };
                IpNet::new(anywhere(rng, v6), len).unwrap().trunc()
            }
        };
        nets.push(net);
    }
    nets
}

fn random_bits(rng: &mut StdRng) -> u128 {
    rng.random()
}

/// Any IPv4 address, or any global unicast IPv6 one (2000::/3).
fn anywhere(rng: &mut StdRng, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6((0x2000u128 << 112 | rng.random::<u128>() >> 3).into())
    } else {
        IpAddr::V4(rng.random::<u32>().into())
    }
}

/// A rule with only a source set.
fn set_rule(name: &str, action: Action, nets: Vec<IpNet>) -> Rule {
    let set = Some(name.into());
    Rule {
        src: Some(Arc::new(AddressList { set, nets })),
        ..Rule::matching_all(name, action, location("sets", 0))
    }
}

fn location(file: &str, line: usize) -> Location {
    Location {
        file: PathBuf::from(file),
        line,
        column: 1,
    }
}

/// The first and last address of `net`, and the addresses just outside it.
fn edges(net: &IpNet) -> Vec<IpAddr> {
    let number = |addr: IpAddr| match addr {
        IpAddr::V4(addr) => u128::from(u32::from(addr)),
        IpAddr::V6(addr) => u128::from(addr),
    };
    let address = |n: u128| match net {
        IpNet::V4(_) => u32::try_from(n).ok().map(|n| IpAddr::V4(n.into())),
        IpNet::V6(_) => Some(IpAddr::V6(n.into())),
    };
    let (first, last) = (number(net.network()), number(net.broadcast()));
    [
        first.checked_sub(1),
        Some(first),
        Some(last),
        last.checked_add(1),
    ]
    .into_iter()
    .flatten()
    .filter_map(address)
    .collect()
}

/// Two large overlapping sets with duplicates, nested and adjacent
/// prefixes: the compiled trie is the same as for the lists merged
/// (ipnet's aggregate), and the program answers like the lists for every
/// prefix's edges and for random addresses.
#[test]
fn large_sets_answer_like_their_lists() {
    let seed = seed_or(|| 42);
    let mut rng = StdRng::seed_from_u64(seed);
    let blocked = messy_list(&mut rng, 9_000);
    // The second set shares a third of the first one's prefixes.
    let mut partners = messy_list(&mut rng, 4_000);
    partners.extend(blocked.iter().step_by(3));
    let config_of = |blocked: Vec<IpNet>, partners: Vec<IpNet>| {
        let mut config = random_config(&mut StdRng::seed_from_u64(seed));
        config.rules = vec![
            set_rule("blocked", Action::Deny, blocked),
            set_rule("partners", Action::Allow, partners),
        ];
        config.implicit_nd = None;
        config.guard.action = GuardAction::Off;
        config.filter.fragments = Fragments::MatchL3;
        config
    };
    let config = config_of(blocked.clone(), partners.clone());
    let compiled = compile(&config).unwrap();
    let merged = config_of(IpNet::aggregate(&blocked), IpNet::aggregate(&partners));
    assert!(IpNet::aggregate(&blocked).len() < blocked.len());
    assert_eq!(compiled.src.trie, compile(&merged).unwrap().src.trie);
    // Both kinds of node are read: wide near the root, compressed below.
    let trie = &compiled.src.trie;
    let wide = trie
        .entries
        .iter()
        .filter(|&&e| e & (CHILD | WIDE) == CHILD | WIDE);
    let wide = wide.count();
    assert!(
        wide > 0 && !trie.nodes.is_empty(),
        "{wide} wide, {} compressed",
        trie.nodes.len()
    );

    let filter = Filter::load_traced(&compiled).unwrap();
    let mut addresses: Vec<IpAddr> = blocked.iter().chain(&partners).flat_map(edges).collect();
    for i in 0..4_000 {
        addresses.push(if i % 2 == 0 {
            let net = blocked.choose(&mut rng).unwrap();
            packet::address_in(net, rng.random())
        } else {
            anywhere(&mut rng, i % 3 == 0)
        });
    }
    let mut decided = [0usize; 3];
    for src in addresses {
        let dst = if src.is_ipv4() {
            "192.0.2.1"
        } else {
            "2001:db8::1"
        };
        let transport = Transport::Tcp {
            sport: 40000,
            dport: 443,
            flags: packet::tcp_flag::SYN,
        };
        let frame = PacketSpec::new(src, dst.parse().unwrap(), transport).build();
        let (expected, _) = reference::classify(&config, &frame);
        let (_, got) = filter.classify_frame(&frame).unwrap();
        assert_eq!(got, expected, "DIFFERENTIAL_SEED={seed}: source {src}");
        decided[match got {
            Outcome::Rule(index) => index,
            _ => 2,
        }] += 1;
    }
    println!("seed {seed}: blocked, partners, neither: {decided:?}");
    assert!(decided.iter().all(|&n| n > 500), "{decided:?}");
}
