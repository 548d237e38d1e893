//! Predicting return-traffic mismatches: which local ports an upstream
//! ACL drops traffic of outbound connections on, and the entry that
//! decides each range: replies coming in to the local port, and (where
//! the ACL judges outbound packets) the packets going out from it.
//!
//! Traffic is judged as the ACL would judge it with a peer that no
//! address-specific entry names (entries for `0.0.0.0/0` or any address
//! apply, others do not), on the service port most connections go to:
//! TCP 443 and UDP 53. The host's own side of an entry (a block of its
//! subnet) is taken to include the host.

use filter_common::wire::{IPPROTO_TCP, IPPROTO_UDP};

use super::{Acl, Direction};
use crate::rules::action::Action;

/// The protocols judged, with the remote (service) port.
pub const SERVICES: [(u8, &str, u16); 2] = [(IPPROTO_TCP, "tcp", 443), (IPPROTO_UDP, "udp", 53)];

/// Local ports whose traffic in one direction one entry (or the default)
/// decides.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Decided {
    /// "inbound" (replies to the port) or "outbound" (packets from it).
    pub direction: &'static str,
    pub proto: &'static str,
    pub ports: (u16, u16),
    pub allowed: bool,
    /// The deciding entry's label, or `None` for the ACL's default.
    pub entry: Option<String>,
}

/// Every local port of `range`, for TCP and UDP, in ranges by the entry
/// that decides them (first match), per direction the ACL judges.
pub fn decide(acl: &Acl, range: (u16, u16)) -> Vec<Decided> {
    let mut out = Vec::new();
    for &direction in acl.directions {
        for (proto, name, service) in SERVICES {
            out.extend(decide_one(acl, direction, proto, name, service, range));
        }
    }
    out
}

fn decide_one(
    acl: &Acl,
    direction: Direction,
    proto: u8,
    name: &'static str,
    service: u16,
    range: (u16, u16),
) -> Vec<Decided> {
    let label = match direction {
        Direction::Ingress => "inbound",
        Direction::Egress => "outbound",
    };
    let mut undecided = vec![range];
    let mut decided: Vec<Decided> = Vec::new();
    for entry in acl.entries.iter().filter(|e| e.direction == direction) {
        // Which of the entry's port conditions is the peer's, which ours.
        let (remote_ports, local_ports) = match direction {
            Direction::Ingress => (entry.src_ports, entry.dst_ports),
            Direction::Egress => (entry.dst_ports, entry.src_ports),
        };
        let applies = entry
            .remote
            .is_none_or(|net| net.prefix_len() == 0 && net.addr().is_ipv4())
            && entry.proto.is_none_or(|p| p == proto)
            && remote_ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&service));
        if !applies {
            continue;
        }
        let (lo, hi) = local_ports.unwrap_or((0, 65535));
        let mut rest = Vec::new();
        for (a, b) in undecided {
            let (from, to) = (a.max(lo), b.min(hi));
            if from > to {
                rest.push((a, b));
                continue;
            }
            decided.push(Decided {
                direction: label,
                proto: name,
                ports: (from, to),
                allowed: entry.action == Action::Allow,
                entry: Some(entry.label.clone()),
            });
            if a < from {
                rest.push((a, from - 1));
            }
            if to < b {
                rest.push((to + 1, b));
            }
        }
        undecided = rest;
    }
    decided.extend(undecided.into_iter().map(|ports| Decided {
        direction: label,
        proto: name,
        ports,
        allowed: acl.default == Action::Allow,
        entry: None,
    }));
    decided.sort_by_key(|d| d.ports);
    decided
}

/// The blocked ranges of [`decide`], adjacent ones by the same entry
/// merged.
pub fn blocked(acl: &Acl, range: (u16, u16)) -> Vec<Decided> {
    let mut merged: Vec<Decided> = Vec::new();
    for d in decide(acl, range).into_iter().filter(|d| !d.allowed) {
        match merged.last_mut() {
            Some(last)
                if (last.direction, last.proto) == (d.direction, d.proto)
                    && last.entry == d.entry
                    && last.ports.1 + 1 == d.ports.0 =>
            {
                last.ports.1 = d.ports.1;
            }
            _ => merged.push(d),
        }
    }
    merged
}

/// The widest range of ports from 1024 up whose traffic passes both ways
/// for every protocol the ACL lets through at all (one it blocks on every
/// port of a direction is beyond any range): what to set
/// `ip_local_port_range` or a NAT rule's ports to.
pub fn widest_allowed(acl: &Acl) -> Option<(u16, u16)> {
    let decided = decide(acl, (1024, 65535));
    let passes = |direction: &str, proto: &str| {
        decided
            .iter()
            .any(|d| (d.direction, d.proto) == (direction, proto) && d.allowed)
    };
    let usable = |proto: &str| {
        decided
            .iter()
            .filter(|d| d.proto == proto)
            .all(|d| passes(d.direction, proto))
    };
    let decided: Vec<&Decided> = decided.iter().filter(|d| usable(d.proto)).collect();
    let mut best: Option<(u16, u16)> = None;
    let mut start: Option<u16> = None;
    for port in 1024..=65535u16 {
        let passes = decided
            .iter()
            .filter(|d| d.ports.0 <= port && port <= d.ports.1)
            .all(|d| d.allowed);
        match (passes, start) {
            (true, None) => start = Some(port),
            (false, Some(from)) => {
                best = wider(best, (from, port - 1));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(from) = start {
        best = wider(best, (from, 65535));
    }
    best
}

fn wider(best: Option<(u16, u16)>, candidate: (u16, u16)) -> Option<(u16, u16)> {
    match best {
        Some(best) if best.1 - best.0 >= candidate.1 - candidate.0 => Some(best),
        _ => Some(candidate),
    }
}

/// The ACL change that lets `blocked` through, in the provider's terms:
/// one allow entry per blocked range, ahead of the entry that blocks it.
pub fn acl_fixes(acl: &Acl, format: super::Format, blocked: &[Decided]) -> Vec<String> {
    use super::Format;
    let last_ingress = acl
        .entries
        .iter()
        .filter(|e| e.direction == Direction::Ingress)
        .filter_map(|e| e.name.strip_prefix("rule-")?.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    blocked
        .iter()
        .map(|b| {
            let (lo, hi) = b.ports;
            let number = |e: &str| super::entry_number(acl, e);
            match (format, b.direction) {
                (Format::AwsNacl, direction) => {
                    let rule = b
                        .entry
                        .as_deref()
                        .and_then(number)
                        .map_or((last_ingress + 10).min(32766), |n| n.saturating_sub(1));
                    let (flag, protocol) = (
                        if direction == "inbound" { "--ingress" } else { "--egress" },
                        if b.proto == "tcp" { 6 } else { 17 },
                    );
                    format!(
                        "aws ec2 create-network-acl-entry --network-acl-id {} {flag} --rule-number \
                         {rule} --protocol {protocol} --port-range From={lo},To={hi} --cidr-block \
                         0.0.0.0/0 --rule-action allow (any free number below the blocking entry)",
                        acl.id
                    )
                }
                (Format::Sakura, _) => format!(
                    "add {{\"Protocol\": \"{}\", \"SourceNetwork\": \"\", \"SourcePort\": \"\", \
                     \"DestinationPort\": \"{lo}-{hi}\", \"Action\": \"allow\"}} to {} above {}",
                    b.proto,
                    acl.id,
                    b.entry.as_deref().unwrap_or("its last entry")
                ),
                (Format::IbmVpc, direction) => {
                    let (side, rest) = if direction == "inbound" {
                        ("destination", "source_port_min 1, source_port_max 65535")
                    } else {
                        ("source", "destination_port_min 1, destination_port_max 65535")
                    };
                    let place = b
                        .entry
                        .as_deref()
                        .map_or("at the end".to_owned(), |entry| format!("before {entry}"));
                    format!(
                        "add to {} an allow rule, direction {direction}, protocol {}, source and \
                         destination 0.0.0.0/0, {side}_port_min {lo}, {side}_port_max {hi}, {rest}, \
                         {place}",
                        acl.id, b.proto
                    )
                }
            }
        })
        .collect()
}
