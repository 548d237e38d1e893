//! Events from the program (drops, and traffic the guard flags), sampled in
//! the kernel and read by the agent from the pinned `EVENTS` ring buffer:
//! decoding and the tcpdump-like lines `filter-agent watch` prints.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use filter_common::{
    Event, event, reason, stored_address,
    wire::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, PROTOCOL_NAMES},
};

use filter_common::Outcome;

use crate::rules::compile::RuleInfo;

/// Where the agent serves each interface's event lines to `watch`.
pub const SOCKET_DIR: &str = "/run/filter-agent";

pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// An event as the ring buffer carries it.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: the length is checked; `Event` is plain integers and bytes,
    // and read_unaligned copes with any alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// How the deciding counter slot of an event is shown: `rule=NAME`,
/// `rule=NAME reason=over_limit`, `rule=default` or `reason=NAME`; `None`
/// for egress events.
pub fn decision(event: &Event, rules: &[RuleInfo]) -> Option<String> {
    if event.slot == event::NO_SLOT {
        return None;
    }
    let name = |index: usize| rules.get(index).map_or("?", |rule| rule.name.as_str());
    Some(match Outcome::from_slot(event.slot) {
        Outcome::Rule(index) => format!("rule={}", name(index)),
        Outcome::OverLimit(index) => format!("rule={} reason=over_limit", name(index)),
        Outcome::Reason(reason::DEFAULT_ALLOW | reason::DEFAULT_DENY) => "rule=default".to_owned(),
        Outcome::Reason(why) => format!(
            "reason={}",
            reason::NAMES
                .get(why as usize)
                .copied()
                .unwrap_or("unknown")
        ),
    })
}

/// One line per event, e.g.
/// `DROP tcp 203.0.113.5:443 -> 10.0.0.11:5000 flags A rule=default guard=out-of-range(32768-60999)`.
pub fn format(event: &Event, rules: &[RuleInfo], range: (u16, u16)) -> String {
    let verdict = match event.verdict {
        event::DROP => "DROP",
        event::WOULD_DROP => "WOULD-DROP",
        _ => "PASS",
    };
    let mut line = String::from(verdict);
    let (src, dst) = (stored_address(event.src), stored_address(event.dst));
    if src.is_unspecified() && dst.is_unspecified() && event.proto == 0 {
        let _ = write!(line, " frame of {} bytes", event.len);
    } else {
        let proto = match PROTOCOL_NAMES
            .iter()
            .find(|(_, number)| *number == event.proto)
        {
            Some((name, _)) => (*name).to_owned(),
            None => format!("proto {}", event.proto),
        };
        let _ = write!(line, " {proto}");
        match event.proto {
            IPPROTO_TCP | IPPROTO_UDP => {
                let _ = write!(
                    line,
                    " {} -> {}",
                    std::net::SocketAddr::new(src, event.sport),
                    std::net::SocketAddr::new(dst, event.dport)
                );
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                let _ = write!(
                    line,
                    " {src} -> {dst} type {} code {}",
                    event.sport, event.dport
                );
            }
            _ => {
                let _ = write!(line, " {src} -> {dst}");
            }
        }
        if event.proto == IPPROTO_TCP && event.tcp_flags != 0 {
            let _ = write!(line, " flags {}", tcp_flags(event.tcp_flags));
        }
    }
    if let Some(decision) = decision(event, rules) {
        let _ = write!(line, " {decision}");
    }
    let (low, high) = range;
    match event.guard {
        event::GUARD_RETURN => {
            let _ = write!(line, " guard=out-of-range({low}-{high})");
        }
        event::GUARD_OUTBOUND => {
            let _ = write!(line, " guard=outbound-out-of-range({low}-{high})");
        }
        _ => {}
    }
    line
}

/// tcpdump's flag letters.
fn tcp_flags(flags: u8) -> String {
    const LETTERS: [(u8, char); 8] = [
        (0x02, 'S'),
        (0x01, 'F'),
        (0x04, 'R'),
        (0x08, 'P'),
        (0x10, 'A'),
        (0x20, 'U'),
        (0x40, 'E'),
        (0x80, 'C'),
    ];
    LETTERS
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, letter)| letter)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use filter_common::{DECISION_OVER_LIMIT, DECISION_RULE};

    fn mapped(v4: [u8; 4]) -> [u8; 16] {
        std::net::Ipv4Addr::from(v4).to_ipv6_mapped().octets()
    }

    fn event(slot: u32, verdict: u8, guard: u8) -> Event {
        Event {
            src: mapped([203, 0, 113, 5]),
            dst: mapped([10, 0, 0, 11]),
            slot,
            len: 60,
            sport: 443,
            dport: 5000,
            proto: IPPROTO_TCP,
            verdict,
            guard,
            tcp_flags: 0x12,
        }
    }

    #[test]
    fn lines_name_the_rule_and_the_guard() {
        let rule = |name: &str| RuleInfo {
            name: name.to_owned(),
            action: crate::rules::config::Action::Deny,
            limit: None,
        };
        let names = vec![rule("ssh"), rule("web")];
        let range = (32768, 60999);
        assert_eq!(
            format(
                &event(reason::DEFAULT_DENY, event::DROP, event::GUARD_RETURN),
                &names,
                range
            ),
            "DROP tcp 203.0.113.5:443 -> 10.0.0.11:5000 flags SA rule=default guard=out-of-range(32768-60999)"
        );
        assert_eq!(
            format(
                &event(DECISION_RULE | 1, event::WOULD_DROP, event::GUARD_NONE),
                &names,
                range
            ),
            "WOULD-DROP tcp 203.0.113.5:443 -> 10.0.0.11:5000 flags SA rule=web"
        );
        assert_eq!(
            format(
                &event(
                    DECISION_RULE | DECISION_OVER_LIMIT | 1,
                    event::DROP,
                    event::GUARD_NONE
                ),
                &names,
                range
            ),
            "DROP tcp 203.0.113.5:443 -> 10.0.0.11:5000 flags SA rule=web reason=over_limit"
        );
        let mut egress = event(event::NO_SLOT, event::PASS, event::GUARD_OUTBOUND);
        egress.tcp_flags = 0x02;
        assert_eq!(
            format(&egress, &names, range),
            "PASS tcp 203.0.113.5:443 -> 10.0.0.11:5000 flags S guard=outbound-out-of-range(32768-60999)"
        );
        let malformed = Event {
            src: [0; 16],
            dst: [0; 16],
            proto: 0,
            ..event(reason::MALFORMED, event::DROP, event::GUARD_NONE)
        };
        assert_eq!(
            format(&malformed, &names, range),
            "DROP frame of 60 bytes reason=malformed"
        );
    }

    #[test]
    fn decodes_what_the_kernel_writes() {
        let original = event(DECISION_RULE, event::DROP, event::GUARD_NONE);
        // SAFETY: viewing a plain `repr(C)` value as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&original as *const Event).cast::<u8>(), size_of::<Event>())
        };
        assert_eq!(decode(bytes), Some(original));
        assert_eq!(decode(&bytes[1..]), None);
    }
}
