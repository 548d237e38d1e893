//! The other receivers' configurations: the same rules written for
//! nftables, for iptables with NOTRACK in the raw table, and for ipset.

use std::fmt::Write as _;

use anyhow::{bail, ensure};
use filter_agent::{
    oracle::packet,
    rules::config::{Action, Config, Rule},
};
use ipnet::{IpNet, Ipv4Net};
use testbed::Netns;

use super::*;

pub(super) fn nft(netns: &Netns, script: &str) -> anyhow::Result<()> {
    netns.exec_with_input("nft", &["-f", "-"], script)?;
    Ok(())
}

pub(super) fn iptables_restore(netns: &Netns, script: &str) -> anyhow::Result<()> {
    netns.exec_with_input("iptables-legacy-restore", &[], script)?;
    Ok(())
}

/// The single IPv4 prefix of an address condition (all the generated rule
/// sets use).
fn single_net(list: &filter_agent::rules::config::AddressList) -> anyhow::Result<Ipv4Net> {
    match list.nets.as_slice() {
        [IpNet::V4(net)] => Ok(*net),
        _ => bail!("only rules with one IPv4 prefix per address translate"),
    }
}

/// The single port range of a port condition.
fn single_range(ranges: &[(u16, u16)]) -> anyhow::Result<(u16, u16)> {
    match ranges {
        [range] => Ok(*range),
        _ => bail!("only rules with one port range translate"),
    }
}

fn protocol_name(proto: u8) -> anyhow::Result<&'static str> {
    match proto {
        packet::IPPROTO_TCP => Ok("tcp"),
        packet::IPPROTO_UDP => Ok("udp"),
        other => bail!("protocol {other} does not translate"),
    }
}

/// The parts of `rule` the translations handle: what the generated
/// rule sets use.
fn translatable(rule: &Rule) -> anyhow::Result<()> {
    ensure!(
        rule.tcp_flags.is_none() && rule.icmp_type.is_none() && rule.icmp_code.is_none(),
        "rule {}: TCP flags and ICMP do not translate",
        rule.name
    );
    ensure!(
        rule.proto.is_some() || (rule.sport.is_none() && rule.dport.is_none()),
        "rule {}: ports without a protocol do not translate",
        rule.name
    );
    Ok(())
}

/// How nftables and iptables spell the conditions the rule sets use.
struct Syntax {
    src: &'static str,
    dst: &'static str,
    proto: &'static str,
    sport: &'static str,
    dport: &'static str,
    /// Between the ends of a port range.
    range: char,
}

const NFT: Syntax = Syntax {
    src: "ip saddr",
    dst: "ip daddr",
    proto: "ip protocol",
    sport: "th sport",
    dport: "th dport",
    range: '-',
};

const IPTABLES: Syntax = Syntax {
    src: "-s",
    dst: "-d",
    proto: "-p",
    sport: "--sport",
    dport: "--dport",
    range: ':',
};

/// `rule`'s conditions in `syntax`, separated by spaces.
fn conditions(rule: &Rule, syntax: &Syntax) -> anyhow::Result<String> {
    translatable(rule)?;
    let mut parts = Vec::new();
    for (keyword, list) in [(syntax.src, &rule.src), (syntax.dst, &rule.dst)] {
        if let Some(list) = list {
            parts.push(format!("{keyword} {}", single_net(list)?));
        }
    }
    if let Some(proto) = rule.proto {
        parts.push(format!("{} {}", syntax.proto, protocol_name(proto)?));
    }
    for (keyword, ranges) in [(syntax.sport, &rule.sport), (syntax.dport, &rule.dport)] {
        if let Some(ranges) = ranges {
            let (low, high) = single_range(ranges)?;
            parts.push(format!("{keyword} {low}{}{high}", syntax.range));
        }
    }
    Ok(parts.join(" "))
}

/// `config` as an nftables netdev ingress chain, rule by rule.
pub(super) fn nft_linear(config: &Config, iface: &str) -> anyhow::Result<String> {
    let mut script = format!(
        "table netdev {NFT_TABLE} {{\n chain ingress {{\n  \
         type filter hook ingress device \"{iface}\" priority 0; policy accept;\n"
    );
    for rule in &config.rules {
        let conditions = conditions(rule, &NFT)?;
        writeln!(
            script,
            "  {conditions} counter {}",
            nft_verdict(rule.action)
        )?;
    }
    writeln!(
        script,
        "  counter {}\n }}\n}}",
        nft_verdict(config.filter.default)
    )?;
    Ok(script)
}

fn nft_verdict(action: Action) -> &'static str {
    match action {
        Action::Allow => "accept",
        Action::Deny => "drop",
    }
}

/// An address list as one nftables interval set, dropped on a source match.
pub(super) fn nft_set(nets: &[IpNet], iface: &str) -> String {
    let mut script = format!(
        "table netdev {NFT_TABLE} {{\n set {IPSET_NAME} {{\n  type ipv4_addr; flags interval; \
         auto-merge;\n  elements = {{ "
    );
    let elements: Vec<String> = nets.iter().map(ToString::to_string).collect();
    script.push_str(&elements.join(", "));
    write!(
        script,
        " }}\n }}\n chain ingress {{\n  \
         type filter hook ingress device \"{iface}\" priority 0; policy accept;\n  \
         ip saddr @{IPSET_NAME} counter drop\n  counter accept\n }}\n}}\n"
    )
    .expect("writing to a String");
    script
}

/// `config` as iptables raw PREROUTING rules: accepted packets are marked
/// NOTRACK (and so skip conntrack), denied ones dropped.
pub(super) fn iptables_notrack(config: &Config) -> anyhow::Result<String> {
    let mut script = raw_table_header();
    for rule in &config.rules {
        let conditions = conditions(rule, &IPTABLES)?;
        writeln!(
            script,
            "-A PREROUTING {conditions} -j {}",
            iptables_target(rule.action)
        )?;
    }
    writeln!(
        script,
        "-A PREROUTING -j {}\nCOMMIT",
        iptables_target(config.filter.default)
    )?;
    Ok(script)
}

/// The raw table with the chain that accepted packets jump to.
fn raw_table_header() -> String {
    format!(
        "*raw\n:PREROUTING ACCEPT [0:0]\n:{ALLOW_CHAIN} - [0:0]\n\
         -A {ALLOW_CHAIN} -j CT --notrack\n-A {ALLOW_CHAIN} -j ACCEPT\n"
    )
}

fn iptables_target(action: Action) -> &'static str {
    match action {
        Action::Allow => ALLOW_CHAIN,
        Action::Deny => "DROP",
    }
}

/// An address list as an ipset (hash:net), for `ipset restore`.
pub(super) fn ipset(nets: &[IpNet]) -> String {
    let mut script = format!(
        "create {IPSET_NAME} hash:net family inet maxelem {}\n",
        nets.len().max(65_536)
    );
    for net in nets {
        writeln!(script, "add {IPSET_NAME} {net}").expect("writing to a String");
    }
    script
}

/// iptables raw rules that drop sources in the ipset, NOTRACK the rest.
pub(super) fn iptables_ipset() -> String {
    format!(
        "{}-A PREROUTING -m set --match-set {IPSET_NAME} src -j DROP\n\
         -A PREROUTING -j {ALLOW_CHAIN}\nCOMMIT\n",
        raw_table_header()
    )
}
