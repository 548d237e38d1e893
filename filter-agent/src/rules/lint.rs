//! Warnings for `filter-agent check`: rules that can never match, and rule
//! sets that would cut return traffic or SSH. Pure logic.

use std::fmt;

use ipnet::IpNet;

use filter_common::wire::{IPPROTO_TCP, IPPROTO_UDP, tcp_flag};

use crate::rules::config::{Action, AddressList, Config, Location, Rule};

const SSH: u16 = 22;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// The rule the warning is about, if any.
    pub location: Option<Location>,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(location) => write!(f, "{location}: warning: {}", self.message),
            None => write!(f, "warning: {}", self.message),
        }
    }
}

pub fn lint(config: &Config) -> Vec<Warning> {
    let mut warnings = shadowed(&config.rules);
    warnings.extend(return_traffic(config));
    warnings.extend(ssh_cut(config));
    warnings.extend(config.rules.iter().filter_map(ipv4_mapped));
    warnings
}

/// An IPv4-mapped IPv6 prefix (`::ffff:a.b.c.d`) in a rule: IPv4 packets
/// are matched as IPv4, so it never matches the address it spells.
fn ipv4_mapped(rule: &Rule) -> Option<Warning> {
    let (field, net) = [("src", &rule.src), ("dst", &rule.dst)]
        .into_iter()
        .filter_map(|(field, list)| Some((field, list.as_ref()?)))
        .find_map(|(field, list)| {
            let net = list.nets.iter().find_map(|net| match net {
                IpNet::V6(net) if net.prefix_len() >= 96 => {
                    net.network().to_ipv4_mapped().map(|v4| (net, v4))
                }
                _ => None,
            })?;
            Some((field, net))
        })?;
    let (mapped, v4) = net;
    let prefix = mapped.prefix_len() - 96;
    Some(Warning {
        location: Some(rule.location.clone()),
        message: format!(
            "rule {:?}: {field} {mapped} is an IPv4-mapped IPv6 prefix, which no packet carries \
             (IPv4 packets are matched as IPv4); write {v4}/{prefix}",
            rule.name
        ),
    })
}

/// Rules that an earlier rule covers in every field.
fn shadowed(rules: &[Rule]) -> Vec<Warning> {
    rules
        .iter()
        .enumerate()
        .filter_map(|(index, rule)| {
            let earlier = rules[..index]
                .iter()
                .find(|earlier| covers(earlier, rule))?;
            Some(Warning {
                location: Some(rule.location.clone()),
                message: format!(
                    "rule {:?} never matches: rule {:?} ({}) matches everything it does",
                    rule.name, earlier.name, earlier.location
                ),
            })
        })
        .collect()
}

/// Does `outer` match every packet `inner` matches?
fn covers(outer: &Rule, inner: &Rule) -> bool {
    fn field<T>(outer: &Option<T>, inner: &Option<T>, within: impl Fn(&T, &T) -> bool) -> bool {
        match (outer, inner) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(outer), Some(inner)) => within(outer, inner),
        }
    }
    let nets = |outer: &std::sync::Arc<AddressList>, inner: &std::sync::Arc<AddressList>| {
        inner
            .nets
            .iter()
            .all(|net| outer.nets.iter().any(|o: &IpNet| o.contains(net)))
    };
    let ranges = |outer: &Vec<(u16, u16)>, inner: &Vec<(u16, u16)>| {
        inner
            .iter()
            .all(|&(lo, hi)| outer.iter().any(|&(olo, ohi)| olo <= lo && hi <= ohi))
    };
    let values = |outer: &Vec<u8>, inner: &Vec<u8>| inner.iter().all(|v| outer.contains(v));
    field(&outer.proto, &inner.proto, |o, i| o == i)
        && field(&outer.src, &inner.src, nets)
        && field(&outer.dst, &inner.dst, nets)
        && field(&outer.sport, &inner.sport, ranges)
        && field(&outer.dport, &inner.dport, ranges)
        && field(&outer.tcp_flags, &inner.tcp_flags, |o, i| {
            i.set & o.set == o.set && i.clear & o.clear == o.clear
        })
        && field(&outer.icmp_type, &inner.icmp_type, values)
        && field(&outer.icmp_code, &inner.icmp_code, values)
}

/// Could `rule` match a packet of `proto` to destination port `dport` with
/// TCP `flags`, from some address? (Addresses are ignored.)
fn could_match(rule: &Rule, proto: u8, sport: Option<u16>, dport: u16, flags: u8) -> bool {
    let in_ranges = |ranges: &Option<Vec<(u16, u16)>>, port: u16| {
        ranges
            .as_ref()
            .is_none_or(|ranges| ranges.iter().any(|&(lo, hi)| lo <= port && port <= hi))
    };
    rule.proto.is_none_or(|p| p == proto)
        && sport.is_none_or(|sport| in_ranges(&rule.sport, sport))
        && in_ranges(&rule.dport, dport)
        && rule.tcp_flags.is_none_or(|wanted| wanted.matches(flags))
        && rule.icmp_type.is_none()
        && rule.icmp_code.is_none()
}

/// With a default deny, replies to the host's own connections need a rule.
fn return_traffic(config: &Config) -> Vec<Warning> {
    if config.filter.default != Action::Deny {
        return Vec::new();
    }
    // The range the guard expects return traffic at (Linux's default
    // unless `[guard] ephemeral` says otherwise).
    let (lo, hi) = config.guard.ephemeral;
    // Allowed for every peer: an allow without a source restriction (a
    // destination is usually the host itself) before any deny that
    // applies to every address.
    let allowed = |proto, sport: Option<u16>, flags| {
        [lo, lo + (hi - lo) / 2, hi].iter().all(|&port| {
            for rule in config
                .rules
                .iter()
                .filter(|rule| could_match(rule, proto, sport, port, flags))
            {
                match rule.action {
                    Action::Allow if rule.src.is_none() => return true,
                    Action::Deny if rule.src.is_none() && rule.dst.is_none() => return false,
                    _ => {}
                }
            }
            false
        })
    };
    let mut warnings = Vec::new();
    if !allowed(IPPROTO_TCP, None, tcp_flag::ACK) {
        warnings.push(Warning {
            location: None,
            message: format!(
                "default deny and no rule lets TCP return traffic (ACK set) reach the ephemeral range \
                 {lo}-{hi}: replies to this host's own connections will be dropped"
            ),
        });
    }
    if !allowed(IPPROTO_UDP, Some(53), 0) {
        warnings.push(Warning {
            location: None,
            message: format!(
                "default deny and no rule lets UDP replies (e.g. DNS from port 53) reach the ephemeral \
                 range {lo}-{hi}"
            ),
        });
    }
    warnings
}

/// A deny (or the default deny) that no earlier allow lets SSH past.
fn ssh_cut(config: &Config) -> Vec<Warning> {
    let syn = |rule: &Rule| could_match(rule, IPPROTO_TCP, None, SSH, tcp_flag::SYN);
    for rule in &config.rules {
        if !syn(rule) {
            continue;
        }
        if rule.action == Action::Allow {
            return Vec::new();
        }
        if rule.src.is_none() && rule.dst.is_none() {
            return vec![Warning {
                location: Some(rule.location.clone()),
                message: format!(
                    "rule {:?} denies new SSH connections (TCP SYN to port 22) from everywhere and \
                     no earlier rule allows them: check your management path",
                    rule.name
                ),
            }];
        }
    }
    if config.filter.default == Action::Deny {
        return vec![Warning {
            location: None,
            message: "default deny and no rule allows new SSH connections (TCP SYN to port 22): check your management path"
                .into(),
        }];
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::rules::config;

    fn warnings(rules: &str) -> Vec<String> {
        let config = config::parse(
            Path::new("r.toml"),
            &format!("[filter]\ndefault = \"deny\"\n{rules}"),
        )
        .unwrap();
        lint(&config).iter().map(ToString::to_string).collect()
    }

    const RETURN_AND_SSH: &str = "[[rule]]\nname = \"ssh\"\naction = \"allow\"\nproto = \"tcp\"\ndport = 22\n\
        [[rule]]\nname = \"tcp-return\"\naction = \"allow\"\nproto = \"tcp\"\ndport = \"1024-65535\"\ntcp_flags = \"ack\"\n\
        [[rule]]\nname = \"udp-return\"\naction = \"allow\"\nproto = \"udp\"\ndport = \"32768-60999\"\n";

    #[test]
    fn a_sound_rule_set_has_no_warnings() {
        assert_eq!(warnings(RETURN_AND_SSH), Vec::<String>::new());
    }

    #[test]
    fn shadowed_rules_are_named() {
        let found = warnings(&format!(
            "{RETURN_AND_SSH}[[rule]]\nname = \"web-wide\"\naction = \"allow\"\nproto = \"tcp\"\ndst = \"10.0.0.0/8\"\ndport = \"80-443\"\n\
             [[rule]]\nname = \"web\"\naction = \"deny\"\nproto = \"tcp\"\ndst = \"10.1.0.0/16\"\ndport = 443\n\
             [[rule]]\nname = \"web-v6\"\naction = \"deny\"\nproto = \"tcp\"\ndst = \"2001:db8::/32\"\ndport = 443\n"
        ));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(
                "r.toml:25:1: warning: rule \"web\" never matches: rule \"web-wide\" (r.toml:19:1)"
            ),
            "{found:?}"
        );
    }

    #[test]
    fn ipv4_mapped_prefixes_are_named_with_their_ipv4_form() {
        let found = warnings(&format!(
            "{RETURN_AND_SSH}[[rule]]\nname = \"mapped\"\naction = \"deny\"\nsrc = \"::ffff:1.2.3.4/128\"\n\
             [[rule]]\nname = \"v6\"\naction = \"deny\"\nsrc = \"2001:db8::/32\"\n"
        ));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("r.toml:19:1: warning: rule \"mapped\": src ::ffff:1.2.3.4/128")
                && found[0].ends_with("write 1.2.3.4/32"),
            "{found:?}"
        );
    }

    #[test]
    fn missing_return_rules_are_reported() {
        let found =
            warnings("[[rule]]\nname = \"ssh\"\naction = \"allow\"\nproto = \"tcp\"\ndport = 22\n");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("TCP return traffic"), "{found:?}");
        assert!(found[1].contains("UDP replies"), "{found:?}");
        // A return rule for part of the range is not enough.
        let partial = warnings(&RETURN_AND_SSH.replace("32768-60999", "32768-40000"));
        assert_eq!(partial.len(), 1, "{partial:?}");
    }

    #[test]
    fn return_rules_are_held_to_the_guard_range() {
        let found = warnings(&format!(
            "[guard]\nephemeral = \"49152-65535\"\n{RETURN_AND_SSH}"
        ));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("UDP replies"), "{found:?}");
        assert!(found[0].contains("49152-65535"), "{found:?}");
    }

    #[test]
    fn ssh_cut_is_reported() {
        let deny_first = format!(
            "[[rule]]\nname = \"no-tcp\"\naction = \"deny\"\nproto = \"tcp\"\n{RETURN_AND_SSH}"
        );
        let found = warnings(&deny_first);
        assert!(
            found
                .iter()
                .any(|w| w.contains("rule \"no-tcp\" denies new SSH connections")),
            "{found:?}"
        );
        let no_ssh = RETURN_AND_SSH.replace("dport = 22\n", "dport = 2222\n");
        let found = warnings(&no_ssh);
        assert!(
            found
                .iter()
                .any(|w| w.contains("no rule allows new SSH connections")),
            "{found:?}"
        );
    }
}
