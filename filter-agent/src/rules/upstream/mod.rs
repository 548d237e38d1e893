//! Upstream ACLs: the stateless packet filters of cloud providers, read
//! from the JSON their APIs return, as an ordered first-match list that
//! filter-agent's rules can express ([`rules_toml`]) and that the audit
//! can hold the host against.
//!
//! Pure logic: no I/O, unit tested without root.

mod aws;
mod ibm;
pub mod predict;
mod sakura;

use std::{collections::HashSet, fmt, fmt::Write as _};

use ipnet::IpNet;
use thiserror::Error;

use crate::rules::{
    action::{Action, Fragments},
    quote,
};

/// The formats read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `aws ec2 describe-network-acls` output.
    AwsNacl,
    /// An IBM Cloud VPC network ACL (`GET /v1/network_acls/{id}`, or its
    /// `/rules`).
    IbmVpc,
    /// A Sakura Cloud packet filter (`GET /packetfilter/{id}`).
    Sakura,
}

/// Which packets an entry judges, as seen from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Packets arriving at the host.
    Ingress,
    /// Packets leaving it.
    Egress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// An ACL: entries in evaluation order (first match decides) and what a
/// packet no entry matches gets, per direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    /// The ACL's own identifier (an AWS `NetworkAclId`).
    pub id: String,
    pub entries: Vec<Entry>,
    pub default: Action,
    /// How non-first fragments are decided (see `config::Fragments`).
    pub fragments: Fragments,
    /// The directions the ACL judges; others pass it untouched.
    pub directions: &'static [Direction],
}

/// One entry, with the ACL's fields in the host's terms: `remote` is the
/// other end (the source of ingress packets, the destination of egress
/// ones), `local` the host's side; ports are the packet's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// What the provider calls it, e.g. "rule 100 (ingress)".
    pub label: String,
    /// A rule name for the rules file made from it.
    pub name: String,
    pub direction: Direction,
    pub action: Action,
    /// `None`: every protocol.
    pub proto: Option<u8>,
    /// `None`: any address of either family.
    pub remote: Option<IpNet>,
    pub local: Option<IpNet>,
    pub src_ports: Option<(u16, u16)>,
    pub dst_ports: Option<(u16, u16)>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    /// The entry matches only packets with ports (not non-first
    /// fragments), even without a port condition.
    pub needs_ports: bool,
}

/// One line, naming the entry and the field (names and values from the
/// ACL have their control characters escaped).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("not {what}: {}", quote::one_line(.message))]
    Shape { what: &'static str, message: String },
    #[error("{}: {field} {}", quote::one_line(.entry), quote::one_line(.message))]
    Field {
        entry: String,
        field: &'static str,
        message: String,
    },
    #[error("{}", quote::one_line(.0))]
    Choice(String),
}

impl Format {
    pub const ALL: [Format; 3] = [Format::AwsNacl, Format::IbmVpc, Format::Sakura];

    /// The name in rules files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::AwsNacl => "aws-nacl",
            Format::IbmVpc => "ibm-vpc",
            Format::Sakura => "sakura",
        }
    }

    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|format| format.name() == name)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads `text` in `format`; `id` picks one ACL when the document holds
/// several.
pub fn read(format: Format, text: &str, id: Option<&str>) -> Result<Acl, UpstreamError> {
    match format {
        Format::AwsNacl => aws::read(text, id),
        Format::IbmVpc => ibm::read(text),
        Format::Sakura => sakura::read(text),
    }
}

/// The rules file that means what `acl` means for packets in `direction`:
/// its entries in order, each a rule named after it, and its default.
pub fn rules_toml(acl: &Acl, direction: Direction) -> Result<String, UpstreamError> {
    if !acl.directions.contains(&direction) {
        return Err(UpstreamError::Choice(format!(
            "{} judges {} packets only",
            acl.id,
            acl.directions
                .iter()
                .map(|d| d.name())
                .collect::<Vec<_>>()
                .join(" and ")
        )));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# `filter-agent import` of {}: its {} entries in evaluation order.\n\
         # Non-first fragments carry no ports: they match only entries without ports.\n\
         # Packets of a direction or family the ACL does not judge meet the default.",
        one_line(&acl.id),
        direction.name()
    );
    let _ = writeln!(
        out,
        "[filter]\ndefault = \"{}\"\nfragments = \"{}\"",
        acl.default.name(),
        match acl.fragments {
            Fragments::MatchL3 => "match-l3",
            Fragments::Allow => "allow",
            Fragments::Deny => "deny",
        }
    );
    let mut names = HashSet::new();
    for entry in acl.entries.iter().filter(|e| e.direction == direction) {
        write_rule(
            &mut out,
            entry,
            &unique_name(&entry.name, &mut names),
            direction,
        );
    }
    Ok(out)
}

/// One entry as a `[[rule]]`, with its label as a comment.
fn write_rule(out: &mut String, entry: &Entry, name: &str, direction: Direction) {
    let _ = writeln!(out, "\n# {}", one_line(&entry.label));
    let _ = writeln!(out, "[[rule]]\nname = \"{name}\"");
    let _ = writeln!(out, "action = \"{}\"", entry.action.name());
    if let Some(proto) = entry.proto {
        let _ = writeln!(out, "proto = {}", proto_text(proto));
    }
    let (src, dst) = match direction {
        Direction::Ingress => (entry.remote, entry.local),
        Direction::Egress => (entry.local, entry.remote),
    };
    for (key, net) in [("src", src), ("dst", dst)] {
        if let Some(net) = net {
            let _ = writeln!(out, "{key} = \"{net}\"");
        }
    }
    let src_ports = match entry.src_ports {
        None if entry.needs_ports && entry.dst_ports.is_none() => Some((0, 65535)),
        ports => ports,
    };
    for (key, ports) in [("sport", src_ports), ("dport", entry.dst_ports)] {
        match ports {
            Some((low, high)) if low == high => {
                let _ = writeln!(out, "{key} = {low}");
            }
            Some((low, high)) => {
                let _ = writeln!(out, "{key} = \"{low}-{high}\"");
            }
            None => {}
        }
    }
    if let Some(icmp_type) = entry.icmp_type {
        let _ = writeln!(out, "icmp_type = {icmp_type}");
    }
    if let Some(code) = entry.icmp_code {
        let _ = writeln!(out, "icmp_code = {code}");
    }
}

/// `name`, or when an earlier rule has it `name-2`, `name-3`...: an ACL
/// may hold two entries of one name (IBM names that differ only in
/// characters a rule name cannot hold; a hand-edited file), and rule
/// names are unique.
fn unique_name(name: &str, used: &mut HashSet<String>) -> String {
    let mut candidate = name.to_owned();
    let mut suffix = 2;
    while !used.insert(candidate.clone()) {
        candidate = format!("{name}-{suffix}");
        suffix += 1;
    }
    candidate
}

/// "allow" or "deny", as every provider spells them.
fn action(text: &str) -> Result<Action, String> {
    match text {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        other => Err(format!("{other:?} is not allow or deny")),
    }
}

/// The AWS rule number of the entry labelled `label`, if it has one.
fn entry_number(acl: &Acl, label: &str) -> Option<u32> {
    let entry = acl.entries.iter().find(|e| e.label == label)?;
    entry.name.strip_prefix("rule-")?.parse().ok()
}

/// Provider text for a comment: control characters (a newline would end
/// the comment) become spaces.
fn one_line(text: &str) -> String {
    text.replace(|c: char| c.is_control(), " ")
}

/// `from-to` as a port range, or the error `bad` makes.
fn port_range<E>(from: i64, to: i64, bad: impl FnOnce(String) -> E) -> Result<(u16, u16), E> {
    let port = |value: i64| u16::try_from(value).ok();
    match (port(from), port(to)) {
        (Some(from), Some(to)) if from <= to => Ok((from, to)),
        _ => Err(bad(format!("{from}-{to} is not a range of ports"))),
    }
}

/// A protocol as the rules file spells it: a name where it has one.
fn proto_text(proto: u8) -> String {
    filter_common::wire::PROTOCOL_NAMES
        .iter()
        .find(|(_, number)| *number == proto)
        .map_or_else(|| proto.to_string(), |(name, _)| format!("\"{name}\""))
}

#[cfg(test)]
mod tests;
