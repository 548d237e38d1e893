//! IBM Cloud VPC network ACLs, as the VPC API returns one
//! (`GET /v1/network_acls/{id}`) or its rules (`.../rules`).
//!
//! Rules are evaluated in the order listed (the API lists them in
//! priority order; `before` links the same order), separately for
//! `inbound` and `outbound` packets; a packet no rule matches is denied.
//! `source` and `destination` are the packet's; ports apply to `tcp` and
//! `udp`, `type`/`code` to `icmp` (absent: any). `all` and `any` match
//! every protocol, `icmp_tcp_udp` those three only.

use ipnet::IpNet;
use serde::Deserialize;

use super::{Acl, Direction, Entry, UpstreamError};
use crate::rules::action::{Action, Fragments};
use filter_common::wire::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

#[derive(Deserialize)]
struct Document {
    id: Option<String>,
    name: Option<String>,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    name: String,
    action: String,
    direction: String,
    protocol: String,
    source: String,
    destination: String,
    destination_port_min: Option<i64>,
    destination_port_max: Option<i64>,
    source_port_min: Option<i64>,
    source_port_max: Option<i64>,
    r#type: Option<i64>,
    code: Option<i64>,
}

pub(super) fn read(text: &str) -> Result<Acl, UpstreamError> {
    let document: Document = serde_json::from_str(text).map_err(|err| UpstreamError::Shape {
        what: "an IBM Cloud VPC network ACL or its rules (JSON)",
        message: err.to_string(),
    })?;
    let id = document
        .name
        .or(document.id)
        .unwrap_or_else(|| "the network ACL".into());
    let mut entries = Vec::new();
    for (index, rule) in document.rules.iter().enumerate() {
        entries.extend(read_rule(&id, index, rule)?);
    }
    Ok(Acl {
        fragments: Fragments::MatchL3,
        directions: &[Direction::Ingress, Direction::Egress],
        id,
        entries,
        default: Action::Deny,
    })
}

/// One rule, as one entry per protocol it names.
fn read_rule(id: &str, index: usize, rule: &Rule) -> Result<Vec<Entry>, UpstreamError> {
    let entry_name = format!("{id} rule {index} ({})", rule.name);
    let bad = |field: &'static str, message: String| UpstreamError::Field {
        entry: entry_name.clone(),
        field,
        message,
    };
    let direction = direction(&rule.direction).map_err(|m| bad("direction", m))?;
    let action = super::action(&rule.action).map_err(|m| bad("action", m))?;
    let protocols = protocols(&rule.protocol).map_err(|m| bad("protocol", m))?;
    let net = |text: &str, field| {
        text.parse::<IpNet>()
            .map(|net| net.trunc())
            .map_err(|_| bad(field, format!("{text:?} is not a CIDR block")))
    };
    let (source, destination) = (
        net(&rule.source, "source")?,
        net(&rule.destination, "destination")?,
    );
    let (remote, local) = match direction {
        Direction::Ingress => (source, destination),
        Direction::Egress => (destination, source),
    };
    let ports = |min: Option<i64>, max: Option<i64>, field| match (min, max) {
        (None, None) => Ok(None),
        (min, max) => super::port_range(min.unwrap_or(1), max.unwrap_or(65535), |m| bad(field, m))
            .map(|range| (range != (0, 65535)).then_some(range)),
    };
    let src_ports = ports(
        rule.source_port_min,
        rule.source_port_max,
        "source_port_min",
    )?;
    let dst_ports = ports(
        rule.destination_port_min,
        rule.destination_port_max,
        "destination_port_min",
    )?;
    let icmp = |value: Option<i64>, field| match value {
        None => Ok(None),
        Some(value @ 0..=255) => Ok(Some(value as u8)),
        Some(value) => Err(bad(field, format!("{value} is not 0-255"))),
    };
    let (icmp_type, icmp_code) = (icmp(rule.r#type, "type")?, icmp(rule.code, "code")?);
    let template = Entry {
        label: format!("rule {index}: {} ({})", rule.name, direction.name()),
        name: rule_name(&rule.name, index),
        direction,
        action,
        proto: None,
        remote: Some(remote),
        local: Some(local),
        src_ports,
        dst_ports,
        icmp_type,
        icmp_code,
        needs_ports: false,
    };
    Ok(per_protocol(&template, protocols))
}

fn direction(text: &str) -> Result<Direction, String> {
    match text {
        "inbound" => Ok(Direction::Ingress),
        "outbound" => Ok(Direction::Egress),
        other => Err(format!("{other:?} is not inbound or outbound")),
    }
}

fn protocols(text: &str) -> Result<&'static [Option<u8>], String> {
    Ok(match text {
        "all" | "any" => &[None],
        "icmp_tcp_udp" => &[Some(IPPROTO_ICMP), Some(IPPROTO_TCP), Some(IPPROTO_UDP)],
        "tcp" => &[Some(IPPROTO_TCP)],
        "udp" => &[Some(IPPROTO_UDP)],
        "icmp" => &[Some(IPPROTO_ICMP)],
        other => {
            return Err(format!(
                "{other:?} is not all, any, icmp_tcp_udp, tcp, udp or icmp"
            ));
        }
    })
}

/// The `template` once per protocol of `protocols` (`icmp_tcp_udp` is
/// three), each keeping only the fields its protocol has.
fn per_protocol(template: &Entry, protocols: &[Option<u8>]) -> Vec<Entry> {
    let base = &template.name;
    protocols
        .iter()
        .map(|&proto| {
            let l4 = matches!(proto, Some(IPPROTO_TCP | IPPROTO_UDP));
            let icmp = proto == Some(IPPROTO_ICMP);
            let name = match (protocols.len(), proto) {
                (1, _) | (_, None) => base.clone(),
                (_, Some(IPPROTO_ICMP)) => format!("{base}-icmp"),
                (_, Some(IPPROTO_TCP)) => format!("{base}-tcp"),
                (_, Some(_)) => format!("{base}-udp"),
            };
            Entry {
                name,
                proto,
                src_ports: template.src_ports.filter(|_| l4),
                dst_ports: template.dst_ports.filter(|_| l4),
                icmp_type: template.icmp_type.filter(|_| icmp),
                icmp_code: template.icmp_code.filter(|_| icmp),
                ..template.clone()
            }
        })
        .collect()
}

/// The rule's own name where the rules file allows it (IBM names are
/// lowercase letters, digits and hyphens), else its position.
fn rule_name(name: &str, index: usize) -> String {
    let fits = !name.is_empty()
        && name.len() <= 50
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if fits {
        name.to_owned()
    } else {
        format!("rule-{index}")
    }
}
