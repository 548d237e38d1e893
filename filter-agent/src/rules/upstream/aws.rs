//! AWS network ACLs, as `aws ec2 describe-network-acls` prints them.
//!
//! Entries are evaluated by `RuleNumber`, lowest first, separately for
//! inbound (`Egress: false`) and outbound (`Egress: true`) packets. The
//! entry numbered 32767 (and 32768 for IPv6, where the console shows `*`)
//! is the implicit deny. `CidrBlock`/`Ipv6CidrBlock` is the source of
//! inbound and the destination of outbound packets; `PortRange` is the
//! destination port, and applies to TCP (6) and UDP (17) only;
//! `IcmpTypeCode` to ICMP (1) and ICMPv6 (58), -1 meaning any.

use filter_common::wire::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use ipnet::IpNet;
use serde::Deserialize;

use super::{Acl, Direction, Entry, UpstreamError};
use crate::rules::action::{Action, Fragments};

/// The first rule number of the implicit default entries.
const IMPLICIT: i64 = 32767;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Document {
    network_acls: Vec<NetworkAcl>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NetworkAcl {
    network_acl_id: String,
    entries: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawEntry {
    rule_number: i64,
    protocol: String,
    rule_action: String,
    egress: bool,
    cidr_block: Option<String>,
    ipv6_cidr_block: Option<String>,
    port_range: Option<PortRange>,
    icmp_type_code: Option<IcmpTypeCode>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PortRange {
    from: i64,
    to: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IcmpTypeCode {
    r#type: i64,
    code: i64,
}

pub(super) fn read(text: &str, id: Option<&str>) -> Result<Acl, UpstreamError> {
    let document: Document = serde_json::from_str(text).map_err(|err| UpstreamError::Shape {
        what: "the JSON of `aws ec2 describe-network-acls`",
        message: err.to_string(),
    })?;
    let acl = choose(&document, id)?;
    let mut raw: Vec<&RawEntry> = acl.entries.iter().collect();
    raw.sort_by_key(|entry| (entry.egress, entry.rule_number));
    let mut entries = Vec::new();
    for entry in raw {
        entries.extend(read_entry(&acl.network_acl_id, entry)?);
    }
    Ok(Acl {
        fragments: Fragments::MatchL3,
        directions: &[Direction::Ingress, Direction::Egress],
        id: acl.network_acl_id.clone(),
        entries,
        default: Action::Deny,
    })
}

/// The ACL `id` names, or the only one.
fn choose<'a>(document: &'a Document, id: Option<&str>) -> Result<&'a NetworkAcl, UpstreamError> {
    let ids = || {
        let ids: Vec<&str> = document
            .network_acls
            .iter()
            .map(|acl| acl.network_acl_id.as_str())
            .collect();
        ids.join(", ")
    };
    Ok(match (id, document.network_acls.as_slice()) {
        (None, [acl]) => acl,
        (None, []) => return Err(UpstreamError::Choice("the document holds no ACL".into())),
        (None, _) => {
            return Err(UpstreamError::Choice(format!(
                "the document holds several ACLs: pick one with --acl ({})",
                ids()
            )));
        }
        (Some(id), acls) => acls
            .iter()
            .find(|acl| acl.network_acl_id == id)
            .ok_or_else(|| UpstreamError::Choice(format!("no ACL {id} (there are: {})", ids())))?,
    })
}

/// One entry; `None` for the implicit default, which is checked only.
fn read_entry(acl_id: &str, entry: &RawEntry) -> Result<Option<Entry>, UpstreamError> {
    let direction = if entry.egress {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    let label = format!("rule {} ({})", entry.rule_number, direction.name());
    let bad = |field: &'static str, message: String| UpstreamError::Field {
        entry: format!("{acl_id} {label}"),
        field,
        message,
    };
    let action = super::action(&entry.rule_action).map_err(|m| bad("RuleAction", m))?;
    if entry.rule_number >= IMPLICIT {
        // The implicit default; checked, not turned into a rule.
        if action != Action::Deny || entry.protocol != "-1" {
            let message = "is the implicit default, which denies everything".into();
            return Err(bad("RuleNumber", message));
        }
        return Ok(None);
    }
    if !(1..IMPLICIT).contains(&entry.rule_number) {
        return Err(bad("RuleNumber", "must be 1-32766".into()));
    }
    let proto = match entry.protocol.as_str() {
        "-1" => None,
        number => Some(number.parse::<u8>().map_err(|_| {
            bad(
                "Protocol",
                format!("{number:?} is not -1 or a number 0-255"),
            )
        })?),
    };
    let remote = match (&entry.cidr_block, &entry.ipv6_cidr_block) {
        (Some(net), None) | (None, Some(net)) => net
            .parse::<IpNet>()
            .map_err(|_| bad("CidrBlock", format!("{net:?} is not a CIDR block")))?,
        _ => {
            let message = "exactly one of CidrBlock and Ipv6CidrBlock is needed".into();
            return Err(bad("CidrBlock", message));
        }
    };
    // AWS keeps a block in canonical form (100.68.0.18/18 becomes
    // 100.68.0.0/18); a hand-written file gets the same reading.
    let remote = remote.trunc();
    let dst_ports = ports(proto, entry.port_range.as_ref(), &bad)?;
    let (icmp_type, icmp_code) = icmp(proto, entry.icmp_type_code.as_ref(), &bad)?;
    Ok(Some(Entry {
        name: format!("rule-{}", entry.rule_number),
        label,
        direction,
        action,
        proto,
        remote: Some(remote),
        local: None,
        src_ports: None,
        dst_ports,
        icmp_type,
        icmp_code,
        needs_ports: false,
    }))
}

/// A field's error, as `read_entry` names it.
type Bad<'a> = &'a dyn Fn(&'static str, String) -> UpstreamError;

/// The destination ports of a TCP or UDP entry (AWS ignores ports for
/// other protocols).
fn ports(
    proto: Option<u8>,
    range: Option<&PortRange>,
    bad: Bad,
) -> Result<Option<(u16, u16)>, UpstreamError> {
    let (Some(IPPROTO_TCP | IPPROTO_UDP), Some(range)) = (proto, range) else {
        return Ok(None);
    };
    let port = |value: i64| u16::try_from(value).ok();
    match (port(range.from), port(range.to)) {
        (Some(from), Some(to)) if from <= to => Ok(Some((from, to))),
        _ => {
            let message = format!("{}-{} is not a range of ports", range.from, range.to);
            Err(bad("PortRange", message))
        }
    }
}

/// The ICMP type and code of an ICMP entry (-1: any).
fn icmp(
    proto: Option<u8>,
    icmp: Option<&IcmpTypeCode>,
    bad: Bad,
) -> Result<(Option<u8>, Option<u8>), UpstreamError> {
    let (Some(IPPROTO_ICMP | IPPROTO_ICMPV6), Some(icmp)) = (proto, icmp) else {
        return Ok((None, None));
    };
    let value = |value: i64, field| match value {
        -1 => Ok(None),
        0..=255 => Ok(Some(value as u8)),
        _ => Err(bad(field, format!("{value} is not -1 or 0-255"))),
    };
    Ok((
        value(icmp.r#type, "IcmpTypeCode.Type")?,
        value(icmp.code, "IcmpTypeCode.Code")?,
    ))
}
