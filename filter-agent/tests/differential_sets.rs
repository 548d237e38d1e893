//! Large address sets against their lists: random messy lists (nested,
//! overlapping, both families) compiled into the trie, probed at every
//! prefix's edges, through the real program. Needs root.

mod support;

use std::{net::IpAddr, sync::Arc};

use filter_agent::{
    kernel::loader::Filter,
    oracle::packet::{self, PacketSpec, Transport},
    oracle::reference::{self, Outcome},
    rules::compile::compile,
    rules::config::{Action, AddressList, Fragments, GuardAction, Rule},
};
use filter_common::{CHILD, WIDE};
use ipnet::IpNet;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use support::random::{location, random_config, seed_or};

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
