//! The traffic and rule sets both benchmarks use: ClassBench-like ACLs
//! with a packet mix that hits early rules, late rules and none, and pure
//! address lists (block lists) with half the traffic inside them.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
};

use filter_agent::{
    oracle::packet::{self, PacketSpec, Transport, tcp_flag},
    oracle::reference::{self, Outcome},
    rules::config::{
        Action, AddressList, Config, FilterSettings, Fragments, GuardSettings, Limit, Location,
        Mode, Rule,
    },
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::{Rng, rngs::StdRng, seq::IndexedRandom};

/// The IPv4 space the generated rules and random traffic share.
fn pool_address(rng: &mut StdRng) -> Ipv4Addr {
    Ipv4Addr::from(rng.random::<u32>() & 0x3fff_ffff | 0x0a00_0000)
}

/// How the generated rules choose addresses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Addresses {
    /// ClassBench's shapes: some wildcards and /8s, so that nearly every
    /// packet matches some rule among the first hundred.
    ClassBench,
    /// Both addresses always given, /16 or longer: packets built for a late
    /// rule reach it, and random packets match none, as in host ACLs.
    Specific,
}

/// ClassBench-like (acl/fw shapes): prefixes of realistic lengths, well-known
/// ports and port ranges, mostly TCP/UDP, a default deny at the end.
pub fn rule_set(rng: &mut StdRng, count: usize, addresses: Addresses) -> Config {
    let prefix = |rng: &mut StdRng, wildcard: f64| -> Option<Arc<AddressList>> {
        let lengths: &[u8] = match addresses {
            Addresses::ClassBench if rng.random_bool(wildcard) => return None,
            Addresses::ClassBench => &[8, 16, 16, 20, 24, 24, 24, 28, 32, 32],
            Addresses::Specific => &[16, 20, 24, 24, 24, 28, 32, 32],
        };
        let len = *lengths.choose(rng).unwrap();
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
            let dport = destination_ports(rng);
            let sport = rng.random_bool(0.15).then(|| vec![(1024, 65535)]);
            let action = if rng.random_bool(0.7) {
                Action::Allow
            } else {
                Action::Deny
            };
            let mut rule = bare_rule(&format!("r{index}"), action);
            rule.location.line = index + 1;
            Rule {
                proto: Some(proto),
                src: prefix(rng, 0.4),
                dst: prefix(rng, 0.15),
                sport,
                dport,
                ..rule
            }
        })
        .collect();
    Config {
        filter: settings(Action::Deny),
        guard: GuardSettings::default(),
        rules,
        implicit_nd: None,
        upstream: None,
    }
}

/// A ClassBench-like destination port condition: any (3 in 10), a
/// well-known service (4 in 10), a common range (2 in 10) or a random port.
fn destination_ports(rng: &mut StdRng) -> Option<Vec<(u16, u16)>> {
    match rng.random_range(0..10) {
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
    }
}

/// The `[filter]` table with defaults but for the default action.
pub(crate) fn settings(default: Action) -> FilterSettings {
    FilterSettings {
        default,
        mode: Mode::Enforce,
        fragments: Fragments::MatchL3,
        max_map_mib: filter_agent::rules::config::DEFAULT_MAX_MAP_MIB,
        limit_sources: filter_agent::rules::config::DEFAULT_LIMIT_SOURCES,
    }
}

/// A rule with no conditions beyond those given, and no limit.
pub(crate) fn bare_rule(name: &str, action: Action) -> Rule {
    let location = Location {
        file: PathBuf::from("bench"),
        line: 1,
        column: 1,
    };
    Rule::matching_all(name, action, location)
}

/// A public web service: one rule allowing TCP to port 80 from anywhere,
/// with `limit` if given, sources remembered in a table of `sources`.
pub fn public_service(limit: Option<Limit>, sources: u32) -> Config {
    let rule = Rule {
        proto: Some(packet::IPPROTO_TCP),
        dport: Some(vec![(80, 80)]),
        limit,
        ..bare_rule("web", Action::Allow)
    };
    let mut filter = settings(Action::Deny);
    filter.limit_sources = sources;
    Config {
        filter,
        guard: GuardSettings::default(),
        rules: vec![rule],
        implicit_nd: None,
        upstream: None,
    }
}

/// A spoofed SYN flood on port 80: every frame from another random source,
/// IPv4 or (with `v6`) IPv6 from another /64 of 2000::/3.
pub fn syn_flood(rng: &mut StdRng, count: usize, v6: bool) -> Vec<Vec<u8>> {
    (0..count)
        .map(|_| {
            let (src, dst): (IpAddr, IpAddr) = if v6 {
                let src = (0x2000_u128 << 112) | (rng.random::<u128>() >> 3);
                (Ipv6Addr::from(src).into(), "2001:db8::1".parse().unwrap())
            } else {
                let src = Ipv4Addr::from(rng.random::<u32>());
                (src.into(), Ipv4Addr::new(192, 0, 2, 1).into())
            };
            let transport = Transport::Tcp {
                sport: rng.random_range(1024..=65535),
                dport: 80,
                flags: tcp_flag::SYN,
            };
            PacketSpec::new(src, dst, transport).build()
        })
        .collect()
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
pub fn return_traffic(rng: &mut StdRng, count: usize) -> Vec<Vec<u8>> {
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
pub fn packet_mix(rng: &mut StdRng, config: &Config, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| candidate(rng, &config.rules, Target::ALL[i % 3]))
        .collect()
}

/// Like [`packet_mix`], but each frame is checked with the reference model
/// to be decided by what it targets: a rule in the first tenth, one in the
/// last tenth, or no rule at all.
pub fn decided_mix(rng: &mut StdRng, config: &Config, count: usize) -> Vec<Vec<u8>> {
    let rules = config.rules.len();
    (0..count)
        .map(|i| {
            let target = Target::ALL[i % 3];
            let mut frame = candidate(rng, &config.rules, target);
            for _ in 0..1_000 {
                let decided_by = match reference::classify(config, &frame).0 {
                    Outcome::Rule(index) | Outcome::OverLimit(index) => Some(index),
                    Outcome::Reason(_) => None,
                };
                let hit = match (target, decided_by) {
                    (Target::Early, Some(index)) => index < rules.div_ceil(10),
                    (Target::Late, Some(index)) => index >= rules * 9 / 10,
                    (Target::NoRule, None) => true,
                    _ => false,
                };
                if hit {
                    break;
                }
                frame = candidate(rng, &config.rules, target);
            }
            frame
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Target {
    Early,
    Late,
    NoRule,
}

impl Target {
    const ALL: [Self; 3] = [Self::Early, Self::Late, Self::NoRule];
}

fn candidate(rng: &mut StdRng, rules: &[Rule], target: Target) -> Vec<u8> {
    match target {
        Target::Early => {
            let early = rng.random_range(0..rules.len().div_ceil(10));
            frame_for(rng, &rules[early])
        }
        Target::Late => {
            let late = rng.random_range(rules.len() * 9 / 10..rules.len());
            frame_for(rng, &rules[late])
        }
        Target::NoRule => {
            let any = Rule {
                src: None,
                dst: None,
                sport: None,
                dport: None,
                ..rules[0].clone()
            };
            frame_for(rng, &any)
        }
    }
}

/// Picks from `(value, weight)` pairs.
pub(crate) fn weighted<T: Copy>(rng: &mut StdRng, choices: &[(T, u32)]) -> T {
    let total: u32 = choices.iter().map(|&(_, weight)| weight).sum();
    let mut pick = rng.random_range(0..total);
    for &(value, weight) in choices {
        if pick < weight {
            return value;
        }
        pick -= weight;
    }
    unreachable!("pick < total")
}

/// IPv4 prefixes as a block list built from a routing table has them:
/// BGP's length mix (about 60% /24, few shorter than /16), plus 9% single
/// hosts, anywhere in unicast space (1-223.x.x.x).
pub fn prefixes(rng: &mut StdRng, count: usize) -> Vec<IpNet> {
    const LENGTHS: [(u8, u32); 19] = [
        (8, 1),
        (12, 2),
        (14, 4),
        (16, 100),
        (17, 50),
        (18, 100),
        (19, 200),
        (20, 400),
        (21, 400),
        (22, 1000),
        (23, 900),
        (24, 5800),
        (25, 20),
        (26, 20),
        (27, 20),
        (28, 20),
        (29, 20),
        (30, 20),
        (32, 900),
    ];
    (0..count)
        .map(|_| {
            let addr = rng.random_range(0x0100_0000..0xe000_0000u32);
            let net = Ipv4Net::new_assert(Ipv4Addr::from(addr), weighted(rng, &LENGTHS));
            IpNet::V4(net.trunc())
        })
        .collect()
}

/// IPv6 prefixes as the global table has them: allocations (/32) handed
/// out in 2000::/3, and below them /36../64 customer prefixes (half /48).
pub fn ipv6_prefixes(rng: &mut StdRng, count: usize) -> Vec<IpNet> {
    const LENGTHS: [(u8, u32); 7] = [
        (32, 15),
        (36, 5),
        (40, 10),
        (44, 10),
        (48, 45),
        (56, 5),
        (64, 10),
    ];
    let allocations: Vec<u128> = (0..count.div_ceil(8))
        .map(|_| (0x2000u128 << 112 | rng.random::<u128>() >> 3) >> 96 << 96)
        .collect();
    (0..count)
        .map(|_| {
            let allocation = allocations.choose(rng).unwrap();
            let addr = allocation | rng.random::<u128>() >> 32;
            let net = Ipv6Net::new_assert(Ipv6Addr::from(addr), weighted(rng, &LENGTHS));
            IpNet::V6(net.trunc())
        })
        .collect()
}

/// Half the frames from inside listed prefixes, half from anywhere in the
/// family of the list's first prefix.
pub fn set_frames(rng: &mut StdRng, nets: &[IpNet], count: usize) -> Vec<Vec<u8>> {
    let v6 = matches!(nets.first(), Some(IpNet::V6(_)));
    (0..count)
        .map(|i| {
            let src = if i % 2 == 0 {
                packet::address_in(nets.choose(rng).unwrap(), rng.random())
            } else if v6 {
                IpAddr::V6(Ipv6Addr::from(
                    0x2000u128 << 112 | rng.random::<u128>() >> 3,
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
            };
            let dst = if v6 {
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))
            } else {
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
            };
            let transport = Transport::Tcp {
                sport: 40000,
                dport: 443,
                flags: tcp_flag::SYN,
            };
            PacketSpec::new(src, dst, transport).build()
        })
        .collect()
}

/// A rules file in `dir` whose one deny rule's source is the set file
/// `list.txt` holding `nets`, one per line; everything else allowed.
pub fn set_file(dir: &std::path::Path, nets: &[IpNet]) -> std::io::Result<PathBuf> {
    use std::fmt::Write as _;
    let mut list = String::with_capacity(nets.len() * 20);
    for net in nets {
        let _ = writeln!(list, "{net}");
    }
    std::fs::write(dir.join("list.txt"), list)?;
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        "[filter]\ndefault = \"allow\"\n[sets]\nlist = { file = \"list.txt\" }\n\
         [[rule]]\nname = \"listed\"\naction = \"deny\"\nsrc = \"@list\"\n",
    )?;
    Ok(rules)
}

/// One deny rule whose source is the set `nets`; everything else allowed.
pub fn address_list(nets: &[IpNet]) -> Config {
    let list = Arc::new(AddressList {
        set: Some("blocklist".into()),
        nets: nets.to_vec(),
    });
    Config {
        filter: settings(Action::Allow),
        guard: GuardSettings::default(),
        rules: vec![Rule {
            src: Some(list),
            ..bare_rule("blocklist", Action::Deny)
        }],
        implicit_nd: None,
        upstream: None,
    }
}
