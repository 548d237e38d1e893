//! The cloud ACL importers: never a panic, errors in one line, and an
//! accepted ACL, imported for a direction, decides packets exactly as the
//! importer's own reading of it (first match over its entries) says.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use filter_agent::{
    oracle::{
        packet::{PacketSpec, Transport},
        reference,
    },
    rules::{
        action::Action,
        compile::compile,
        config,
        upstream::{self, Acl, Direction, Entry, Format},
    },
};
use filter_common::wire::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::assert_one_line;

pub fn check(format: u8, text: &str) {
    let format = Format::ALL[usize::from(format) % Format::ALL.len()];
    let acl = match upstream::read(format, text, None) {
        Ok(acl) => acl,
        Err(err) => return assert_one_line(&err.to_string()),
    };
    for direction in [Direction::Ingress, Direction::Egress] {
        let rules = match upstream::rules_toml(&acl, direction) {
            Ok(rules) => rules,
            Err(err) => {
                assert_one_line(&err.to_string());
                continue;
            }
        };
        let config = config::parse(Path::new("imported.toml"), &rules).unwrap_or_else(|err| {
            panic!("the import of an accepted ACL is refused: {err}\n{rules}")
        });
        compile(&config).unwrap_or_else(|err| panic!("the import does not compile: {err}"));
        for probe in probes(&acl, direction) {
            let (_, action) = reference::classify(&config, &probe.spec(direction).build());
            let expected = first_match(&acl, direction, &probe);
            assert_eq!(action, expected, "{probe:?} {direction:?}\n{rules}");
        }
    }
}

/// A packet as the ACL sees it: the far side, the host's side, ports.
#[derive(Debug)]
struct Probe {
    proto: u8,
    remote: IpAddr,
    local: IpAddr,
    /// The packet's source and destination ports, or ICMP type and code.
    ports: (u16, u16),
}

impl Probe {
    fn spec(&self, direction: Direction) -> PacketSpec {
        let (src, dst) = match direction {
            Direction::Ingress => (self.remote, self.local),
            Direction::Egress => (self.local, self.remote),
        };
        let (sport, dport) = self.ports;
        let transport = match self.proto {
            IPPROTO_TCP => Transport::Tcp {
                sport,
                dport,
                flags: 0x10,
            },
            IPPROTO_UDP => Transport::Udp { sport, dport },
            IPPROTO_ICMP | IPPROTO_ICMPV6 => Transport::Icmp {
                icmp_type: sport as u8,
                code: dport as u8,
            },
            proto => Transport::Other {
                proto,
                payload: vec![0; 8],
            },
        };
        PacketSpec::new(src, dst, transport)
    }
}

/// Probes at the edges of every entry (its first and last address and
/// port), and a few that no entry names.
fn probes(acl: &Acl, direction: Direction) -> Vec<Probe> {
    let mut probes = Vec::new();
    for entry in acl
        .entries
        .iter()
        .filter(|entry| entry.direction == direction)
        .take(16)
    {
        let v6 = entry
            .remote
            .or(entry.local)
            .is_some_and(|net| net.addr().is_ipv6());
        let remote = entry.remote.map_or(other_address(v6), |net| net.addr());
        let local = entry.local.map_or(other_address(v6), |net| net.addr());
        let end = |net: Option<ipnet::IpNet>, fallback| net.map_or(fallback, |net| net.broadcast());
        let protos = match entry.proto {
            Some(proto) => vec![proto],
            None => vec![
                IPPROTO_TCP,
                IPPROTO_UDP,
                if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP },
            ],
        };
        for proto in protos {
            let icmp = proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
            let ports = if icmp {
                // Echo: never neighbour discovery, which passes ahead of all.
                let echo = if v6 { 128 } else { 8 };
                let icmp_type = entry
                    .icmp_type
                    .filter(|t| !(133..=137).contains(t))
                    .unwrap_or(echo);
                (
                    u16::from(icmp_type),
                    u16::from(entry.icmp_code.unwrap_or(0)),
                )
            } else {
                (
                    entry.src_ports.map_or(40000, |(low, _)| low),
                    entry.dst_ports.map_or(443, |(_, high)| high),
                )
            };
            if icmp && (proto == IPPROTO_ICMPV6) != v6 {
                continue;
            }
            probes.push(Probe {
                proto,
                remote,
                local,
                ports,
            });
            probes.push(Probe {
                proto,
                remote: end(entry.remote, remote),
                local: end(entry.local, local),
                ports,
            });
        }
    }
    probes.extend(unnamed_probes());
    probes
}

/// Packets to and from addresses no entry is built around.
fn unnamed_probes() -> Vec<Probe> {
    let mut probes = Vec::new();
    for v6 in [false, true] {
        let (remote, local) = (other_address(v6), other_address(v6));
        probes.push(Probe {
            proto: IPPROTO_TCP,
            remote,
            local,
            ports: (443, 51000),
        });
        probes.push(Probe {
            proto: IPPROTO_UDP,
            remote,
            local,
            ports: (53, 40000),
        });
    }
    probes
}

fn other_address(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xfeed, 0, 0, 0, 0, 7))
    } else {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, 77))
    }
}

/// The importer's own reading: the first entry of the direction that
/// matches, or the ACL's default.
fn first_match(acl: &Acl, direction: Direction, probe: &Probe) -> Action {
    acl.entries
        .iter()
        .filter(|entry| entry.direction == direction)
        .find(|entry| matches(entry, probe))
        .map_or(acl.default, |entry| entry.action)
}

fn matches(entry: &Entry, probe: &Probe) -> bool {
    let within = |range: Option<(u16, u16)>, port: u16| {
        range.is_none_or(|(low, high)| (low..=high).contains(&port))
    };
    let l4 = probe.proto == IPPROTO_TCP || probe.proto == IPPROTO_UDP;
    let icmp = probe.proto == IPPROTO_ICMP || probe.proto == IPPROTO_ICMPV6;
    entry.proto.is_none_or(|proto| proto == probe.proto)
        && entry.remote.is_none_or(|net| net.contains(&probe.remote))
        && entry.local.is_none_or(|net| net.contains(&probe.local))
        && (!l4
            || (within(entry.src_ports, probe.ports.0) && within(entry.dst_ports, probe.ports.1)))
        && (!icmp
            || (entry
                .icmp_type
                .is_none_or(|t| u16::from(t) == probe.ports.0)
                && entry
                    .icmp_code
                    .is_none_or(|c| u16::from(c) == probe.ports.1)))
}
