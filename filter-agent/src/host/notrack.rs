//! Conntrack bypass: the flows of `notrack = true` rules, and their
//! replies, skip connection tracking. The kernel's own mechanism does it:
//! an nftables table per filtered interface, owned by the agent
//! (`inet filter_agent_IFACE`), with `notrack` at the raw priority on the
//! way in (prerouting, `iifname IFACE`) and for the host's replies on the
//! way out (output, `oifname IFACE`). Each rule swap replaces the whole
//! table in one nftables transaction; detaching deletes it. No other
//! table is touched.
//!
//! [`script`] is pure; [`apply`] and [`remove`] run `nft`.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use ipnet::IpNet;
use thiserror::Error;

use crate::rules::config::{AddressList, Rule};

#[derive(Debug, Error)]
pub enum NotrackError {
    #[error("notrack rules need nftables' `nft` command: {0}")]
    NoNft(std::io::Error),
    #[error("nft refused the notrack table for {iface}: {stderr}")]
    Refused { iface: String, stderr: String },
    #[error("cannot name an nftables table after the interface {0:?}")]
    Name(String),
}

/// The table the agent owns for `iface`: letters, digits and `_` only.
pub fn table(iface: &str) -> String {
    let name: String = iface
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("inet filter_agent_{name}")
}

/// The nftables script that makes the table for `iface` hold exactly the
/// notrack flows of `rules`, atomically.
pub fn script(iface: &str, rules: &[Rule]) -> String {
    let table = table(iface);
    // Creating an empty table first makes the delete valid whether or not
    // the table exists: one transaction either way.
    let mut script = format!("table {table} {{}}\ndelete table {table}\ntable {table} {{\n");
    let notrack: Vec<&Rule> = rules.iter().filter(|rule| rule.notrack).collect();
    for (chain, hook, device, reply) in [
        ("inbound", "prerouting", "iifname", false),
        ("replies", "output", "oifname", true),
    ] {
        script += &format!(
            "\tchain {chain} {{\n\t\ttype filter hook {hook} priority raw; policy accept;\n"
        );
        for rule in &notrack {
            for matches in flow_matches(rule, reply) {
                script += &format!(
                    "\t\t{device} \"{iface}\" {matches} notrack comment \"{}\"\n",
                    rule.name
                );
            }
        }
        script += "\t}\n";
    }
    script + "}\n"
}

/// The nftables matches of `rule`'s flow, one per address family it
/// names; with `reply`, as the host's replies (source and destination
/// swapped).
fn flow_matches(rule: &Rule, reply: bool) -> Vec<String> {
    let proto = match rule.proto {
        Some(filter_common::wire::IPPROTO_UDP) => "udp",
        _ => "tcp",
    };
    let (src, dst, sport, dport, saddr, daddr) = match reply {
        false => (&rule.src, &rule.dst, "sport", "dport", "saddr", "daddr"),
        true => (&rule.src, &rule.dst, "dport", "sport", "daddr", "saddr"),
    };
    let mut found = Vec::new();
    for family in ["ip", "ip6"] {
        let nets = |list: &Option<std::sync::Arc<AddressList>>| {
            list.as_ref()
                .map(|list| nets_of(&list.nets, family == "ip6"))
        };
        let (from, to) = (nets(src), nets(dst));
        // A field that names only the other family rules this one out.
        if from.as_ref().is_some_and(Vec::is_empty) || to.as_ref().is_some_and(Vec::is_empty) {
            continue;
        }
        let mut parts = vec![format!("meta nfproto {}", nfproto(family))];
        for (key, nets) in [(saddr, from), (daddr, to)] {
            if let Some(nets) = nets {
                parts.push(format!("{family} {key} {{ {} }}", nets.join(", ")));
            }
        }
        parts.push(format!("meta l4proto {proto}"));
        for (key, ports) in [(sport, &rule.sport), (dport, &rule.dport)] {
            if let Some(ports) = ports {
                parts.push(format!("{proto} {key} {{ {} }}", port_list(ports)));
            }
        }
        found.push(parts.join(" "));
    }
    found
}

fn nfproto(family: &str) -> &'static str {
    match family {
        "ip6" => "ipv6",
        _ => "ipv4",
    }
}

fn nets_of(nets: &[IpNet], v6: bool) -> Vec<String> {
    nets.iter()
        .filter(|net| matches!(net, IpNet::V6(_)) == v6)
        .map(|net| net.trunc().to_string())
        .collect()
}

fn port_list(ports: &[(u16, u16)]) -> String {
    let items: Vec<String> = ports
        .iter()
        .map(|&(low, high)| match low == high {
            true => low.to_string(),
            false => format!("{low}-{high}"),
        })
        .collect();
    items.join(", ")
}

/// Makes the agent's table for `iface` hold the notrack flows of `rules`;
/// with none, [`remove`]s it.
pub fn apply(iface: &str, rules: &[Rule]) -> Result<(), NotrackError> {
    if !rules.iter().any(|rule| rule.notrack) {
        return remove(iface);
    }
    // The name goes into the script as a quoted string.
    if iface.contains(['"', '\\']) {
        return Err(NotrackError::Name(iface.to_owned()));
    }
    nft(iface, &["-f", "-"], Some(&script(iface, rules))).map(drop)
}

/// Deletes the agent's table for `iface` if there is one. Without `nft`,
/// or without nf_tables in the kernel, there can be none.
pub fn remove(iface: &str) -> Result<(), NotrackError> {
    let Ok(listed) = nft(iface, &["list", "tables"], None) else {
        return Ok(());
    };
    let table = table(iface);
    if !listed
        .lines()
        .any(|line| line.trim() == format!("table {table}"))
    {
        return Ok(());
    }
    let mut args = vec!["delete", "table"];
    args.extend(table.split(' '));
    nft(iface, &args, None).map(drop)
}

/// Runs `nft ARGS` (with `input` on its standard input); its output.
fn nft(iface: &str, args: &[&str], input: Option<&str>) -> Result<String, NotrackError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NotrackError::NoNft)?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(input.unwrap_or_default().as_bytes()));
    let output = child.wait_with_output().map_err(NotrackError::NoNft)?;
    if let Some(Err(err)) = written {
        return Err(NotrackError::NoNft(err));
    }
    if !output.status.success() {
        return Err(NotrackError::Refused {
            iface: iface.to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::rules::config;

    fn rules(text: &str) -> Vec<Rule> {
        let text = format!("[filter]\ndefault = \"deny\"\n{text}");
        config::parse(Path::new("rules.toml"), &text).unwrap().rules
    }

    #[test]
    fn the_table_holds_the_notrack_flows_both_ways() {
        let rules = rules(
            r#"
[[rule]]
name = "ssh"
action = "allow"
proto = "tcp"
dport = 22

[[rule]]
name = "dns"
action = "allow"
proto = "udp"
src = ["10.1.0.0/16", "2001:db8::/32"]
dport = [53, "5300-5301"]
notrack = true
"#,
        );
        let script = script("eth0", &rules);
        let expected = "table inet filter_agent_eth0 {}
delete table inet filter_agent_eth0
table inet filter_agent_eth0 {
\tchain inbound {
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tiifname \"eth0\" meta nfproto ipv4 ip saddr { 10.1.0.0/16 } meta l4proto udp udp dport { 53, 5300-5301 } notrack comment \"dns\"
\t\tiifname \"eth0\" meta nfproto ipv6 ip6 saddr { 2001:db8::/32 } meta l4proto udp udp dport { 53, 5300-5301 } notrack comment \"dns\"
\t}
\tchain replies {
\t\ttype filter hook output priority raw; policy accept;
\t\toifname \"eth0\" meta nfproto ipv4 ip daddr { 10.1.0.0/16 } meta l4proto udp udp sport { 53, 5300-5301 } notrack comment \"dns\"
\t\toifname \"eth0\" meta nfproto ipv6 ip6 daddr { 2001:db8::/32 } meta l4proto udp udp sport { 53, 5300-5301 } notrack comment \"dns\"
\t}
}
";
        assert_eq!(script, expected);
    }

    #[test]
    fn tables_are_named_after_the_interface() {
        assert_eq!(table("br-lan.5"), "inet filter_agent_br_lan_5");
        assert_eq!(table("eth0"), "inet filter_agent_eth0");
    }
}
