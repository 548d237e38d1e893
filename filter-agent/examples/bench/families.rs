//! Rule sets and traces with the shape of ClassBench's acl, fw and ipc
//! families, so that the default bench shows, on a fresh machine, what
//! the real sets show (`--classbench` times a real set instead).
//!
//! A family's profile (acl.rs, fw.rs, ipc.rs) was counted on the set
//! ClassBench's generator made from the family's first seed
//! (`db_generator -bc SEED 20000 2 0.5 -0.1`), the rules the rules file can
//! say: per sixteenth of the list, the 20 most common rule shapes (prefix
//! lengths, port condition classes and protocol, together, which keeps how
//! they go together: a rule with any source names a service port, one with
//! any destination a reply's) with their counts; the 12 exact ports and 8
//! ranges most used, with the count of the rest; how often a prefix repeats
//! one earlier in the list; how many /8s prefixes of /8 or longer fall in.
//! The sets and their traces are not in the repository (see
//! docs/benchmarks.md); the tests below hold the figures the made sets are
//! checked against.

mod acl;
mod fw;
mod ipc;

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use filter_agent::rules::config::{Action, AddressList, Config, GuardSettings, Rule};
use ipnet::{IpNet, Ipv4Net};
use rand::{
    Rng,
    rngs::StdRng,
    seq::{IndexedRandom, SliceRandom},
};

use crate::{
    classbench,
    workload::{bare_rule, settings, weighted},
};

/// The families, by name.
pub(crate) const FAMILIES: [(&str, &Profile); 3] = [
    ("acl", &acl::PROFILE),
    ("fw", &fw::PROFILE),
    ("ipc", &ipc::PROFILE),
];

/// Rules made per family: as many as ClassBench's sets hold, so that the
/// frames of the rules past the largest size timed are decided by none.
pub(crate) const FAMILY_RULES: usize = 20_000;

/// How often a new prefix shares upper bits beyond its /8 with one made
/// before (ClassBench grows its prefixes from one tree).
const NESTED: f64 = 0.8;

/// Sixteenths of the list: ClassBench's sets change shape along it.
const SEGMENTS: usize = 16;

/// A family's shape (see above).
pub(crate) struct Profile {
    /// Per sixteenth of the list, rule shapes with their counts.
    segments: [&'static [(Shape, u32)]; SEGMENTS],
    dports: Common<u16>,
    sports: Common<u16>,
    ranges: Common<(u16, u16)>,
    /// How often a (source, destination) prefix repeats one already made.
    reuse: [f64; 2],
    /// How many /8s the (source, destination) prefixes fall in.
    roots: [u32; 2],
}

/// Source and destination prefix lengths, port condition classes
/// (source, destination) and protocol (`None`: any).
type Shape = ((u8, u8), (Ports, Ports), Option<u8>);

/// The most common values with their counts, and the count of the rest.
type Common<T> = (&'static [(T, u32)], u32);

/// ClassBench's port condition classes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ports {
    Any,
    High,
    Exact,
    Range,
}

/// `count` rules of `profile`'s shape; every rule and the default allow,
/// as `--classbench` loads a real set.
pub(crate) fn filter_set(rng: &mut StdRng, profile: &Profile, count: usize) -> Config {
    let mut sources = Prefixes::new(rng, profile.roots[0], profile.reuse[0]);
    let mut destinations = Prefixes::new(rng, profile.roots[1], profile.reuse[1]);
    let mut rules = Vec::with_capacity(count);
    for (segment, shapes) in profile.segments.iter().enumerate() {
        let drawn: Vec<(Shape, Rule)> = (segment * count / SEGMENTS
            ..(segment + 1) * count / SEGMENTS)
            .map(|_| {
                let shape = loop {
                    let shape = weighted(rng, shapes);
                    if segment == SEGMENTS - 1 || !catch_all(shape) {
                        break shape;
                    }
                };
                let ((src, dst), (sport, dport), proto) = shape;
                let rule = Rule {
                    proto,
                    src: sources.next(rng, src),
                    dst: destinations.next(rng, dst),
                    sport: ports(rng, sport, profile.sports, profile),
                    dport: ports(rng, dport, profile.dports, profile),
                    ..bare_rule("", Action::Allow)
                };
                (shape, rule)
            })
            .collect();
        rules.extend(in_list_order(rng, drawn));
    }
    for (index, rule) in rules.iter_mut().enumerate() {
        rule.name = format!("cb{index}");
        rule.location.line = index + 1;
    }
    Config {
        filter: settings(Action::Allow),
        guard: GuardSettings::default(),
        rules,
        implicit_nd: None,
        upstream: None,
    }
}

/// The order ClassBench writes rules in: the rules of one shape together,
/// in the address order of their longer prefix, the shapes one after
/// another. Rules near each other in the list are near in address and
/// alike in their wildcards, as in the real sets, which is what lets a
/// group of neighbouring address classes keep its rules in a few words.
fn in_list_order(rng: &mut StdRng, drawn: Vec<(Shape, Rule)>) -> Vec<Rule> {
    let mut streams: BTreeMap<Shape, Vec<Rule>> = BTreeMap::new();
    for (shape, rule) in drawn {
        streams.entry(shape).or_default().push(rule);
    }
    let mut streams: Vec<Vec<Rule>> = streams.into_values().collect();
    streams.shuffle(rng);
    for stream in &mut streams {
        stream.sort_by_key(longer_prefix);
    }
    streams.concat()
}

/// The network of a rule's longer prefix (`None` for two wildcards).
fn longer_prefix(rule: &Rule) -> Option<IpNet> {
    let nets = [&rule.dst, &rule.src].map(|list| list.as_ref().map(|list| list.nets[0]));
    nets.into_iter().flatten().max_by_key(IpNet::prefix_len)
}

/// Whether a rule of this shape takes nearly any address on both sides
/// (/2 or shorter). The real sets have such rules only at their very end,
/// past 16,384 rules: anywhere before, they would decide most later rules'
/// frames. Here they are kept to the last sixteenth.
fn catch_all(((src, dst), _, _): Shape) -> bool {
    src <= 2 && dst <= 2
}

/// A port condition of class `class`; `None` is any port.
fn ports(
    rng: &mut StdRng,
    class: Ports,
    exact: Common<u16>,
    profile: &Profile,
) -> Option<Vec<(u16, u16)>> {
    let range = match class {
        Ports::Any => return None,
        Ports::High => (1024, u16::MAX),
        Ports::Exact => {
            let port = common(rng, exact).unwrap_or_else(|| rng.random_range(1..=u16::MAX));
            (port, port)
        }
        Ports::Range => common(rng, profile.ranges).unwrap_or_else(|| {
            let low = rng.random_range(1..60_000);
            (low, low + rng.random_range(1..=1_000))
        }),
    };
    Some(vec![range])
}

/// One of the common values by weight, or `None` for one of the rest.
fn common<T: Copy>(rng: &mut StdRng, (values, rest): Common<T>) -> Option<T> {
    let listed: u32 = values.iter().map(|&(_, count)| count).sum();
    if listed + rest == 0 || rng.random_range(0..listed + rest) >= listed {
        return None;
    }
    Some(weighted(rng, values))
}

/// One address field's prefixes, as made so far.
struct Prefixes {
    roots: Vec<u32>,
    /// Prefixes /8 or longer, by their first byte.
    under: Vec<Vec<Ipv4Net>>,
    by_length: [Vec<Ipv4Net>; 33],
    reuse: f64,
}

impl Prefixes {
    fn new(rng: &mut StdRng, roots: u32, reuse: f64) -> Self {
        let mut all: Vec<u32> = (0..256).collect();
        all.shuffle(rng);
        all.truncate(roots as usize);
        Self {
            roots: all,
            under: vec![Vec::new(); 256],
            by_length: std::array::from_fn(|_| Vec::new()),
            reuse,
        }
    }

    /// A prefix of `length`; /0 is no condition.
    fn next(&mut self, rng: &mut StdRng, length: u8) -> Option<Arc<AddressList>> {
        if length == 0 {
            return None;
        }
        let same = &self.by_length[length as usize];
        let net = match same.choose(rng) {
            Some(&net) if rng.random_bool(self.reuse) => net,
            _ => self.fresh(rng, length),
        };
        if length >= 8 {
            self.under[(u32::from(net.network()) >> 24) as usize].push(net);
        }
        self.by_length[length as usize].push(net);
        Some(Arc::new(AddressList {
            set: None,
            nets: vec![IpNet::V4(net)],
        }))
    }

    /// A new prefix under a /8 picked evenly (as the real sets spread
    /// them): often sharing some upper bits with a prefix made there
    /// before, the rest random.
    fn fresh(&self, rng: &mut StdRng, length: u8) -> Ipv4Net {
        let root = *self.roots.choose(rng).expect("roots");
        let (base, shared) = match self.under[root as usize].choose(rng) {
            Some(near) if rng.random_bool(NESTED) && near.prefix_len().min(length) > 8 => {
                let common = near.prefix_len().min(length);
                // Half the time inside it or around it, as a tree grows.
                let shared = if near.prefix_len() != length && rng.random_bool(0.5) {
                    common
                } else {
                    rng.random_range(8..common)
                };
                (u32::from(near.network()), shared)
            }
            _ => (root << 24, 8.min(length)),
        };
        let keep = u32::MAX.checked_shl(32 - u32::from(shared)).unwrap_or(0);
        let address = Ipv4Addr::from((base & keep) | (rng.random::<u32>() & !keep));
        Ipv4Net::new(address, length).expect("length <= 32").trunc()
    }
}

/// `count` frames as ClassBench's trace generator makes them: each a
/// corner of a random rule's box (every address the first or last of its
/// prefix, every port an end of its range, any protocol 0 or 255: of
/// ClassBench's own traces, 78-100% of source ports are 0 or 65,535),
/// which a nested prefix or a wider range shares more often than a point
/// inside does.
pub(crate) fn trace(rng: &mut StdRng, config: &Config, count: usize) -> Vec<Vec<u8>> {
    let any: IpNet = "0.0.0.0/0".parse().expect("a prefix");
    (0..count)
        .map(|_| {
            let rule = config.rules.choose(rng).expect("rules");
            let address = |rng: &mut StdRng, list: &Option<Arc<AddressList>>| {
                let net = list.as_ref().map_or(&any, |list| &list.nets[0]);
                if rng.random() {
                    net.network()
                } else {
                    net.broadcast()
                }
            };
            let port = |rng: &mut StdRng, ranges: &Option<Vec<(u16, u16)>>| {
                let (low, high) = ranges.as_ref().map_or((0, u16::MAX), |ranges| ranges[0]);
                if rng.random() { low } else { high }
            };
            let proto = rule.proto.unwrap_or(if rng.random() { 0 } else { u8::MAX });
            classbench::header_frame(
                address(rng, &rule.src),
                address(rng, &rule.dst),
                port(rng, &rule.sport),
                port(rng, &rule.dport),
                proto,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use filter_agent::{oracle::reference, rules::compile::compile};
    use filter_common::Outcome;
    use rand::SeedableRng as _;

    use super::*;

    /// What the classifier's cost follows, for the first 16,384 rules:
    /// their address classes (source, destination); of the trace's frames,
    /// how many in 1,000 a rule in their second half decides (late) and
    /// none does; and for the first 100 late frames, how many 64-rule words
    /// before the deciding rule hold a rule taking the frame's source, and
    /// one taking its destination (mean, in tenths). The last two are what
    /// the order of the list makes: with the same rules shuffled they near
    /// the deciding rule's own word number.
    fn figures(config: &Config, frames: &[Vec<u8>]) -> [usize; 6] {
        let mut config = config.clone();
        config.rules.truncate(16_384);
        let set = compile(&config).expect("compiles");
        let classes = |bitmaps: usize| bitmaps / set.chunks as usize;
        let (mut late, mut none, mut words) = (0, 0, [0; 2]);
        for frame in frames {
            match reference::classify(&config, frame).0 {
                Outcome::Rule(rule) if rule >= 8_192 => {
                    if late < 100 {
                        let taking = words_taking(&config.rules[..rule], frame);
                        words = [words[0] + taking[0], words[1] + taking[1]];
                    }
                    late += 1;
                }
                Outcome::Rule(_) => {}
                _ => none += 1,
            }
        }
        let sampled = late.min(100).max(1);
        [
            classes(set.src.bitmaps.len()),
            classes(set.dst.bitmaps.len()),
            late * 1_000 / frames.len(),
            none * 1_000 / frames.len(),
            words[0] * 10 / sampled,
            words[1] * 10 / sampled,
        ]
    }

    /// Words of `rules` holding a rule whose source prefix takes `frame`'s
    /// source, and one whose destination prefix takes its destination.
    fn words_taking(rules: &[Rule], frame: &[u8]) -> [usize; 2] {
        let reference::Parsed::Ip(fields) = reference::parse(frame) else {
            panic!("an IP frame");
        };
        let any = bare_rule("any", Action::Allow);
        let words = |only: &dyn Fn(&Rule) -> Rule| {
            let taking = rules
                .iter()
                .map(|rule| reference::matches(&only(rule), &fields));
            let words: std::collections::BTreeSet<usize> = taking
                .enumerate()
                .filter_map(|(index, takes)| takes.then_some(index / 64))
                .collect();
            words.len()
        };
        [
            words(&|rule| Rule {
                src: rule.src.clone(),
                ..any.clone()
            }),
            words(&|rule| Rule {
                dst: rule.dst.clone(),
                ..any.clone()
            }),
        ]
    }

    /// `figures` of the sets ClassBench's generator made from its acl1,
    /// fw1 and ipc1 seeds (the sets the profiles were counted on), on the
    /// first 5,000 frames of their traces.
    const REAL: [(&str, [usize; 6]); 3] = [
        ("acl", [16_373, 620, 189, 560, 0, 324]),
        ("fw", [5_036, 13_337, 406, 109, 1_163, 353]),
        ("ipc", [5_954, 7_215, 503, 130, 422, 276]),
    ];

    /// The made sets have the real sets' address classes within a fifth;
    /// their traces put at least one frame in fifty in each of the bench's
    /// late and unmatched groups; and before a late frame's rule, the words
    /// holding rules that take its addresses are within 2.5 times the real
    /// sets' (or both under 5).
    #[test]
    fn made_sets_have_the_real_sets_figures() {
        for ((seed, &(family, profile)), (name, real)) in FAMILIES.iter().enumerate().zip(REAL) {
            assert_eq!(family, name);
            let mut rng = StdRng::seed_from_u64(seed as u64);
            let config = filter_set(&mut rng, profile, FAMILY_RULES);
            let frames = trace(&mut rng, &config, 5_000);
            let made = figures(&config, &frames);
            let near = |made: usize, real: usize| made * 5 >= real * 4 && made * 5 <= real * 6;
            assert!(
                near(made[0], real[0]) && near(made[1], real[1]),
                "{family}: address classes {:?}, the real set's {:?}",
                &made[..2],
                &real[..2]
            );
            assert!(
                made[2] >= 20 && made[3] >= 20,
                "{family}: per mille late {}, unmatched {}",
                made[2],
                made[3]
            );
            let alike = |made: usize, real: usize| {
                (made < 50 && real < 50) || (made * 2 <= real * 5 && real * 2 <= made * 5)
            };
            assert!(
                alike(made[4], real[4]) && alike(made[5], real[5]),
                "{family}: words taking a late frame's addresses (tenths) {:?}, the real set's {:?}",
                &made[4..],
                &real[4..]
            );
        }
    }
}
