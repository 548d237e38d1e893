//! The packet path, differential: structure-aware frames (VLANs, IPv4
//! options, IPv6 extension chains, fragments, truncation, corruption)
//! through the real XDP program with BPF_PROG_TEST_RUN, against the
//! reference model, verdict and deciding counter both.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use arbitrary::{Arbitrary, Unstructured};
use filter_agent::{
    kernel::loader::{Filter, xdp_action},
    oracle::{
        packet::{PacketSpec, Transport},
        reference,
    },
    rules::{
        action::Action,
        compile::compile,
        config::{self, Config, Mode},
    },
};

use crate::rules::RulesSpec;

/// The shortest frame BPF_PROG_TEST_RUN takes.
const ETH_HLEN: usize = 14;

/// Rule sets made at start, each loaded once.
const RULE_SETS: u64 = 16;

/// One fuzz input: which rule set, and the frame.
#[derive(Arbitrary, Debug)]
pub struct Input {
    set: u8,
    frame: FrameSpec,
    /// Cut the frame to this length, and flip a byte.
    cut: Option<u16>,
    flip: Option<(u16, u8)>,
}

#[derive(Arbitrary, Debug)]
struct FrameSpec {
    v6: bool,
    vlans: Vec<u16>,
    src: u8,
    dst: u8,
    transport: TransportSpec,
    ipv4_options: Vec<u8>,
    ipv6_extensions: Vec<u8>,
    fragment_offset: u16,
    ipv6_fragment_header: bool,
}

#[derive(Arbitrary, Debug)]
enum TransportSpec {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
    Icmp { icmp_type: u8, code: u8 },
    Other { proto: u8, payload: Vec<u8> },
}

/// Addresses inside, at the edges of and outside the rules' prefixes.
const V4: [Ipv4Addr; 6] = [
    Ipv4Addr::new(10, 1, 2, 3),
    Ipv4Addr::new(10, 1, 2, 255),
    Ipv4Addr::new(10, 200, 0, 1),
    Ipv4Addr::new(192, 0, 2, 7),
    Ipv4Addr::new(198, 51, 103, 255),
    Ipv4Addr::new(203, 0, 113, 9),
];
const V6: [Ipv6Addr; 5] = [
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 3),
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0xffff, 0, 0, 0, 1),
    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x2001, 0xdb9, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
];

impl FrameSpec {
    fn build(&self) -> Vec<u8> {
        let address = |index: u8| -> IpAddr {
            if self.v6 {
                V6[usize::from(index) % V6.len()].into()
            } else {
                V4[usize::from(index) % V4.len()].into()
            }
        };
        let transport = match &self.transport {
            TransportSpec::Tcp {
                sport,
                dport,
                flags,
            } => Transport::Tcp {
                sport: *sport,
                dport: *dport,
                flags: *flags,
            },
            TransportSpec::Udp { sport, dport } => Transport::Udp {
                sport: *sport,
                dport: *dport,
            },
            TransportSpec::Icmp { icmp_type, code } => Transport::Icmp {
                icmp_type: *icmp_type,
                code: *code,
            },
            TransportSpec::Other { proto, payload } => Transport::Other {
                proto: *proto,
                payload: payload.iter().copied().take(64).collect(),
            },
        };
        let mut spec = PacketSpec::new(address(self.src), address(self.dst), transport);
        spec.vlans = self.vlans.iter().copied().take(3).collect();
        // Options pad to 40 bytes at most; extensions are 8 bytes each.
        spec.ipv4_options = self.ipv4_options.iter().copied().take(40).collect();
        spec.ipv6_extensions = self.ipv6_extensions.iter().copied().take(8).collect();
        spec.fragment_offset = self.fragment_offset & 0x1fff;
        spec.ipv6_fragment_header = self.ipv6_fragment_header;
        spec.build()
    }
}

/// The rule sets, each with the program loaded for it.
pub struct RuleSets(Vec<(Config, Filter)>);

impl RuleSets {
    /// `RULE_SETS` rule sets drawn from fixed seeds (the same every run),
    /// without rate limits (the model decides each frame alone); those
    /// that do not validate are skipped.
    pub fn load() -> Self {
        let mut sets = Vec::new();
        for seed in 0..RULE_SETS * 4 {
            if sets.len() as u64 == RULE_SETS {
                break;
            }
            let bytes = noise(seed, 4096);
            let Ok(spec) = RulesSpec::arbitrary(&mut Unstructured::new(&bytes)) else {
                continue;
            };
            let Ok(config) = config::parse(Path::new("fuzz.toml"), &spec.render(false)) else {
                continue;
            };
            let rule_set = compile(&config).expect("a validated rule set compiles");
            let filter = Filter::load_traced(&rule_set).expect("loading the XDP program (root?)");
            sets.push((config, filter));
        }
        assert!(!sets.is_empty(), "no rule set validated");
        Self(sets)
    }

    /// The program and the model agree on the input's frame.
    pub fn check(&self, input: &Input) {
        let (config, filter) = &self.0[usize::from(input.set) % self.0.len()];
        let mut frame = input.frame.build();
        if let Some(cut) = input.cut {
            frame.truncate(usize::from(cut));
        }
        if let Some((at, byte)) = input.flip
            && let Some(target) = frame.get_mut(usize::from(at))
        {
            *target ^= byte;
        }
        // BPF_PROG_TEST_RUN refuses a frame shorter than an Ethernet
        // header (no NIC hands one to XDP).
        if frame.len() < ETH_HLEN {
            return;
        }
        let (outcome, action) = reference::classify(config, &frame);
        let (verdict, counted) = filter.classify_frame(&frame).expect("BPF_PROG_TEST_RUN");
        assert_eq!(counted, outcome, "counter: frame {frame:02x?}");
        let drops = action == Action::Deny && config.filter.mode == Mode::Enforce;
        let expected = if drops {
            xdp_action::DROP
        } else {
            xdp_action::PASS
        };
        assert_eq!(verdict, expected, "verdict: frame {frame:02x?}");
    }
}

/// `len` bytes of xorshift noise from `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
