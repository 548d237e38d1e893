//! Sakura Cloud packet filters, as the API returns one
//! (`GET /cloud/1.1/packetfilter/{id}`: `{"PacketFilter": {...}}`, or the
//! object inside).
//!
//! A packet filter judges IPv4 packets arriving at the server's NIC (IPv6
//! and outgoing packets pass it). `Expression` entries are evaluated from
//! the top, the first match deciding; a packet no entry matches passes
//! (which is why Sakura's own template ends with an explicit `ip` deny).
//! `SourceNetwork` is an address, `A.B.C.D/len` or `A.B.C.D/netmask`,
//! empty for any; ports (`tcp`, `udp`) are `N` or `N-M`, empty for any,
//! and such entries match packets with ports only. `fragment` matches
//! non-first fragments, which carry no ports; `icmp` and `ip` match them
//! too.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

use super::{Acl, Direction, Entry, UpstreamError};
use crate::rules::action::{Action, Fragments};
use filter_common::wire::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

#[derive(Deserialize)]
#[serde(untagged)]
enum Document {
    Wrapped {
        #[serde(rename = "PacketFilter")]
        packet_filter: PacketFilter,
    },
    Bare(PacketFilter),
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PacketFilter {
    #[serde(rename = "ID")]
    id: Option<String>,
    name: Option<String>,
    expression: Vec<Expression>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Expression {
    protocol: String,
    #[serde(default)]
    source_network: String,
    #[serde(default)]
    source_port: String,
    #[serde(default)]
    destination_port: String,
    action: String,
    #[serde(default)]
    description: String,
}

pub(super) fn read(text: &str) -> Result<Acl, UpstreamError> {
    let document: Document = serde_json::from_str(text).map_err(|err| UpstreamError::Shape {
        what: "a Sakura Cloud packet filter (JSON with `Expression`)",
        message: err.to_string(),
    })?;
    let filter = match document {
        Document::Wrapped { packet_filter } | Document::Bare(packet_filter) => packet_filter,
    };
    let id = filter
        .name
        .or(filter.id)
        .unwrap_or_else(|| "the packet filter".into());
    let mut entries = Vec::new();
    // Set by the first `fragment` entry; the entries that match fragments
    // ahead of it.
    let mut fragments = Fragments::MatchL3;
    let mut fragments_before: Vec<(usize, Action)> = Vec::new();
    for (index, expression) in filter.expression.iter().enumerate() {
        let bad = |(field, message)| field_error(&id, index, field, message);
        let action = super::action(&expression.action).map_err(|m| bad(("Action", m)))?;
        let (proto, ports) = match expression.protocol.as_str() {
            "tcp" => (Some(IPPROTO_TCP), true),
            "udp" => (Some(IPPROTO_UDP), true),
            "icmp" => (Some(IPPROTO_ICMP), false),
            "ip" => (None, false),
            // Only the first decides; later ones are never reached.
            "fragment" if fragments != Fragments::MatchL3 => continue,
            "fragment" => {
                fragment_entry(expression, action, &fragments_before).map_err(bad)?;
                fragments = Fragments::Allow;
                continue;
            }
            other => {
                let message = format!("{other:?} is not tcp, udp, icmp, fragment or ip");
                return Err(bad(("Protocol", message)));
            }
        };
        if fragments == Fragments::MatchL3 && !ports {
            fragments_before.push((index, action));
        }
        entries.push(entry(&id, index, expression, action, (proto, ports))?);
    }
    Ok(Acl {
        id,
        entries,
        default: Action::Allow,
        fragments,
        directions: &[Direction::Ingress],
    })
}

fn field_error(id: &str, index: usize, field: &'static str, message: String) -> UpstreamError {
    UpstreamError::Field {
        entry: format!("{id} Expression[{index}]"),
        field,
        message,
    }
}

/// Whether a `fragment` entry can be expressed: for every source, allowing,
/// and deciding no fragment an earlier entry decides the other way.
fn fragment_entry(
    expression: &Expression,
    action: Action,
    fragments_before: &[(usize, Action)],
) -> Result<(), (&'static str, String)> {
    if !matches!(expression.source_network.as_str(), "" | "0.0.0.0/0") {
        let message = "of a fragment entry cannot be expressed (filter-agent decides \
                       fragments for every source at once): leave it empty";
        return Err(("SourceNetwork", message.into()));
    }
    if let Some((earlier, other)) = fragments_before.iter().find(|(_, a)| *a != action) {
        let message = format!(
            "cannot be expressed: Expression[{earlier}] ({}) decides some fragments \
             first, the other way",
            other.name()
        );
        return Err(("Protocol", message));
    }
    if action == Action::Deny {
        let message = "deny cannot be expressed: filter-agent would deny IPv6 \
                       fragments too, which the packet filter passes";
        return Err(("Action", message.into()));
    }
    Ok(())
}

/// The entry of a tcp, udp, icmp or ip expression (`proto`, and whether
/// it has `ports`).
fn entry(
    id: &str,
    index: usize,
    expression: &Expression,
    action: Action,
    (proto, ports): (Option<u8>, bool),
) -> Result<Entry, UpstreamError> {
    let label = format!("Expression[{index}]");
    let bad = |field, message| field_error(id, index, field, message);
    if !ports {
        let field = if expression.source_port.is_empty() {
            "DestinationPort"
        } else {
            "SourcePort"
        };
        if !(expression.source_port.is_empty() && expression.destination_port.is_empty()) {
            return Err(bad(field, "is only for tcp and udp".into()));
        }
    }
    let remote = source_network(&expression.source_network).ok_or_else(|| {
        let text = &expression.source_network;
        bad(
            "SourceNetwork",
            format!("{text:?} is not an IPv4 address or network"),
        )
    })?;
    let port = |text: &str, field| {
        port_range(text).ok_or_else(|| {
            bad(
                field,
                format!("{text:?} is not a port or a range N-M of 1-65535"),
            )
        })
    };
    let src_ports = port(&expression.source_port, "SourcePort")?;
    let dst_ports = port(&expression.destination_port, "DestinationPort")?;
    let described = if expression.description.is_empty() {
        String::new()
    } else {
        format!(": {}", expression.description)
    };
    Ok(Entry {
        label: format!("{label}{described}"),
        name: format!("expression-{index}"),
        direction: Direction::Ingress,
        action,
        proto,
        remote: Some(IpNet::V4(remote)),
        local: None,
        src_ports,
        dst_ports,
        icmp_type: None,
        icmp_code: None,
        needs_ports: ports,
    })
}

/// Empty (any IPv4 source), an address, `A.B.C.D/len` or `A.B.C.D/netmask`.
fn source_network(text: &str) -> Option<Ipv4Net> {
    let text = text.trim();
    if text.is_empty() {
        return Some(Ipv4Net::default());
    }
    let (addr, len) = match text.split_once('/') {
        None => (text, 32),
        Some((addr, mask)) if mask.contains('.') => {
            let mask = u32::from(mask.parse::<Ipv4Addr>().ok()?);
            let len = mask.leading_ones();
            // A netmask is contiguous ones.
            (mask.checked_shl(len).unwrap_or(0) == 0).then_some(())?;
            (addr, len as u8)
        }
        Some((addr, len)) => (addr, len.parse().ok()?),
    };
    Some(Ipv4Net::new(addr.parse().ok()?, len).ok()?.trunc())
}

/// Empty for any, `N` or `N-M` (1-65535); `Some(None)` is any.
fn port_range(text: &str) -> Option<Option<(u16, u16)>> {
    let text = text.trim();
    if text.is_empty() || text == "*" {
        return Some(None);
    }
    let port = |text: &str| text.trim().parse::<u16>().ok().filter(|&p| p >= 1);
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (port(low)?, port(high)?),
        None => (port(text)?, port(text)?),
    };
    (low <= high).then_some(Some((low, high)))
}
