//! Parsing what the host shows: `nft list ruleset`'s NAT rules, the
//! conntrack statistics and the port-range sysctl. Pure.

use super::{Conntrack, NatRule};

/// Sums the named columns of `/proc/net/stat/nf_conntrack` (a header of
/// names, then a line of hexadecimal numbers per CPU).
pub fn conntrack_stat(text: &str) -> Conntrack {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let mut sums = Conntrack::default();
    for line in lines {
        for (name, value) in header.iter().zip(line.split_whitespace()) {
            let value = u64::from_str_radix(value, 16).unwrap_or(0);
            match *name {
                "drop" => sums.drop += value,
                "early_drop" => sums.early_drop += value,
                "insert_failed" => sums.insert_failed += value,
                _ => {}
            }
        }
    }
    sums
}

/// Source-NAT rules in `nft list ruleset` output, in order, with the port
/// range they pin (`masquerade to :32768-60999`, `snat to
/// 192.0.2.1:32768-60999`).
pub fn nat_rules(ruleset: &str) -> Vec<NatRule> {
    let (mut table, mut chain) = (String::new(), "");
    let mut rules = Vec::new();
    for line in ruleset.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["table", family, name, "{"] => table = format!("{family} {name}"),
            ["chain", name, "{"] => chain = name,
            _ if words.contains(&"masquerade") || words.contains(&"snat") => {
                let after = |first: &str, second: &str| {
                    words
                        .windows(3)
                        .find_map(|w| (w[0] == first && w[1] == second).then_some(w[2]))
                };
                let docker_bridge = after("oifname", "!=")
                    .map(|bridge| bridge.trim_matches('"'))
                    .filter(|bridge| *bridge == "docker0" || bridge.starts_with("br-"))
                    .filter(|_| words.last() == Some(&"masquerade"))
                    .map(str::to_owned);
                rules.push(NatRule {
                    rule: line.to_owned(),
                    chain: format!("{table} {chain}"),
                    ports: nat_ports(line),
                    source: after("ip", "saddr").and_then(|net| net.parse().ok()),
                    protocol: after("meta", "l4proto")
                        .or(after("ip", "protocol"))
                        .map(str::to_owned),
                    docker_bridge,
                });
            }
            _ => {}
        }
    }
    rules
}

fn nat_ports(rule: &str) -> Option<(u16, u16)> {
    let target = rule.split_whitespace().skip_while(|w| *w != "to").nth(1)?;
    let (_, ports) = target.rsplit_once(':')?;
    let ports = ports.trim_end_matches(|c: char| !c.is_ascii_digit());
    let (from, to) = ports.split_once('-').unwrap_or((ports, ports));
    Some((from.parse().ok()?, to.parse().ok()?))
}

pub(super) fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
}
