//! Random rule sets for the differential tests: nested prefixes, port
//! ranges, flags, ICMP values, limits and guard settings.

use std::{path::PathBuf, sync::Arc};

use filter_agent::{
    oracle::packet::{self},
    rules::config::{
        Action, AddressList, Config, FilterSettings, Fragments, GuardAction, GuardSettings, Limit,
        Location, Mode, Rule, TcpFlags,
    },
};
use ipnet::IpNet;
use rand::{Rng, rngs::StdRng, seq::IndexedRandom};

/// A few prefixes per family, nested, so rules overlap and packets hit them.
pub const V4_PREFIXES: &[&str] = &[
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

pub const V6_PREFIXES: &[&str] = &[
    "::/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "2001:db8:1:2::/64",
    "2001:db8:1:2::3/128",
    "fe80::/10",
];

pub const PORTS: &[(u16, u16)] = &[
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

pub const ICMP_VALUES: &[u8] = &[0, 1, 3, 4, 8, 11, 128, 129, 133, 135, 136, 137];

pub const FLAGS: &[u8] = &[0x01, 0x02, 0x04, 0x10];

pub fn random_rule(rng: &mut StdRng, index: usize) -> Rule {
    let proto = match rng.random_range(0..20) {
        0..6 => None,
        6..11 => Some(packet::IPPROTO_TCP),
        11..15 => Some(packet::IPPROTO_UDP),
        15..17 => Some(packet::IPPROTO_ICMP),
        17..19 => Some(packet::IPPROTO_ICMPV6),
        _ => Some(rng.random_range(0..=255)),
    };
    let addresses = random_addresses;
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
    let tcp_flags =
        (proto == Some(packet::IPPROTO_TCP) && rng.random_bool(0.4)).then(|| random_flags(rng));
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

/// Half the time, one to three prefixes of either family.
fn random_addresses(rng: &mut StdRng) -> Option<Arc<AddressList>> {
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
}

/// A flag that must be set, and half the time another that must be clear.
fn random_flags(rng: &mut StdRng) -> TcpFlags {
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
}

/// Rates whose intervals the frames' clock steps straddle; per source with
/// prefixes that the address pool's prefixes share or split.
pub fn random_limit(rng: &mut StdRng) -> Limit {
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
pub fn random_step(rng: &mut StdRng) -> u64 {
    *[0, 100_000, 1_000_000, 5_000_000, 20_000_000, 300_000_000]
        .choose(rng)
        .unwrap()
}

pub fn random_config(rng: &mut StdRng) -> Config {
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
            // Small tables make per-source buckets shared and taken over.
            limit_sources: *[
                1,
                2,
                3,
                16,
                filter_agent::rules::config::DEFAULT_LIMIT_SOURCES,
            ]
            .choose(rng)
            .unwrap(),
        },
        guard: random_guard(rng),
        rules,
        implicit_nd,
        upstream: None,
    }
}

/// Ranges and services that the pool's ports fall inside, outside and on
/// the edges of.
pub fn random_guard(rng: &mut StdRng) -> GuardSettings {
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

/// `DIFFERENTIAL_SEED` if set, else `default`.
pub fn seed_or(default: impl FnOnce() -> u64) -> u64 {
    std::env::var("DIFFERENTIAL_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(default)
}

pub fn location(file: &str, line: usize) -> Location {
    Location {
        file: PathBuf::from(file),
        line,
        column: 1,
    }
}

/// A list shaped like a real ACL: `count` rules with thousands of distinct
/// nested prefixes (a fifth IPv6),
/// so that the address classes number in the thousands and their groups
/// in the pair summary hold many classes each.
pub fn many_prefixes_config(rng: &mut StdRng, count: usize) -> Config {
    let rules = (0..count)
        .map(|index| {
            let v6 = rng.random_bool(0.2);
            let proto = *[None, Some(packet::IPPROTO_TCP), Some(packet::IPPROTO_UDP)]
                .choose(rng)
                .unwrap();
            let ports = |rng: &mut StdRng| {
                (proto.is_some() && rng.random_bool(0.5)).then(|| vec![*PORTS.choose(rng).unwrap()])
            };
            // One address in five a wildcard, never both.
            let wildcard = rng.random_range(0..10);
            Rule {
                proto,
                src: (wildcard != 0).then(|| nested_prefix(rng, v6)),
                dst: (wildcard != 1).then(|| nested_prefix(rng, v6)),
                sport: ports(rng),
                dport: ports(rng),
                ..Rule::matching_all(
                    format!("p{index}"),
                    *[Action::Allow, Action::Deny].choose(rng).unwrap(),
                    location("many", index + 1),
                )
            }
        })
        .collect();
    let mut config = random_config(rng);
    config.filter.default = Action::Allow;
    config.rules = rules;
    config
}

/// A prefix inside one of a few /8s (IPv4) or /32s (IPv6), mostly long, so
/// that prefixes nest and share their upper bits.
fn nested_prefix(rng: &mut StdRng, v6: bool) -> Arc<AddressList> {
    let base: IpNet = if v6 {
        *["2001:db8::/32", "2001:db9::/32"].choose(rng).unwrap()
    } else {
        *["10.0.0.0/8", "172.0.0.0/8", "192.0.0.0/8"]
            .choose(rng)
            .unwrap()
    }
    .parse()
    .unwrap();
    let extra = *[8u8, 12, 16, 20, 22, 24].choose(rng).unwrap();
    let len = (base.prefix_len() + extra).min(base.max_prefix_len());
    let net = IpNet::new(packet::address_in(&base, rng.random()), len)
        .unwrap()
        .trunc();
    Arc::new(AddressList {
        set: None,
        nets: vec![net],
    })
}
