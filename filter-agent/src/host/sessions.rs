//! Established TCP sessions of this network namespace (the kernel's socket
//! table, `/proc/net/tcp` and `tcp6`), and which of them a rule set would
//! cut: the next packet each peer sends (an ACK to the local port, whether
//! the host accepted the session or opened it) through the real program.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use filter_common::wire::tcp_flag;

use crate::{
    kernel::loader::{Filter, LoadError, xdp_action},
    oracle::packet::{PacketSpec, Transport},
    oracle::reference::Outcome,
    rules::compile::RuleSet,
};

/// A TCP session in ESTABLISHED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// A session the rules would cut, and what decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub session: Session,
    /// `rule "ssh"`, or `default deny` when no rule decides.
    pub decided_by: String,
}

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "would cut the established session {} -> :{} ({})",
            self.session.peer,
            self.session.local.port(),
            self.decided_by
        )
    }
}

/// The sessions of this namespace that reach it over a network: loopback
/// sessions never cross a filtered interface.
pub fn established() -> Vec<Session> {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|file| std::fs::read_to_string(format!("/proc/self/net/{file}")).ok())
        .flat_map(|table| parse_table(&table))
        .filter(|session| !session.local.ip().is_loopback() && !session.peer.ip().is_loopback())
        .collect()
}

/// The ESTABLISHED rows of a `/proc/net/tcp` or `tcp6` table.
pub fn parse_table(table: &str) -> Vec<Session> {
    const ESTABLISHED: &str = "01";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let (local, peer, state) = (fields.next()?, fields.next()?, fields.next()?);
            (state == ESTABLISHED).then_some(())?;
            Some(Session {
                local: socket_address(local)?,
                peer: socket_address(peer)?,
            })
        })
        .collect()
}

/// `0100007F:0016` (IPv4) or 32 hex digits and a port (IPv6): the kernel
/// prints each 32-bit word of the address in host (little-endian) order.
fn socket_address(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |at: usize| -> Option<[u8; 4]> {
        u32::from_str_radix(address.get(at..at + 8)?, 16)
            .ok()
            .map(u32::to_le_bytes)
    };
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for index in 0..4 {
                bytes[index * 4..index * 4 + 4].copy_from_slice(&word(index * 8)?);
            }
            let v6 = Ipv6Addr::from(bytes);
            // An IPv4 session on an IPv6 socket arrives as IPv4.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The sessions of `sessions` whose peer's next packet `rule_set` drops,
/// decided by the real program (BPF_PROG_TEST_RUN; nothing is attached).
pub fn cut_by(rule_set: &RuleSet, sessions: &[Session]) -> Result<Vec<Cut>, LoadError> {
    if sessions.is_empty() {
        return Ok(Vec::new());
    }
    let filter = Filter::load_traced(rule_set)?;
    let mut cut = Vec::new();
    for session in sessions {
        let ack = Transport::Tcp {
            sport: session.peer.port(),
            dport: session.local.port(),
            flags: tcp_flag::ACK,
        };
        let frame = PacketSpec::new(session.peer.ip(), session.local.ip(), ack).build();
        let (action, outcome) = filter.trace_frame(&frame)?;
        if action == xdp_action::DROP {
            let decided_by = match outcome {
                Outcome::Rule(index) | Outcome::OverLimit(index) => {
                    format!("rule {:?}", rule_set.rules[index].name)
                }
                Outcome::Reason(why) => {
                    filter_common::reason::NAMES[why as usize].replace('_', " ")
                }
            };
            cut.push(Cut {
                session: *session,
                decided_by,
            });
        }
    }
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_established_sessions_of_both_families() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue\n\
                  0: 0F02000A:0016 0902000A:C822 01 00000000:00000000\n\
                  1: 00000000:0016 00000000:0000 0A 00000000:00000000\n";
        assert_eq!(
            parse_table(v4),
            [Session {
                local: "10.0.2.15:22".parse().unwrap(),
                peer: "10.0.2.9:51234".parse().unwrap(),
            }]
        );
        // fd00::1 on port 443 from 2001:db8::9 port 40000; then an IPv4
        // peer on an IPv6 socket (::ffff:10.0.0.1).
        let v6 = "  sl  local_address rem_address st\n\
                  0: 000000FD000000000000000001000000:01BB B80D0120000000000000000009000000:9C40 01 0\n\
                  1: 0000000000000000FFFF00000F02000A:0016 0000000000000000FFFF00000100000A:D431 01 0\n";
        let sessions = parse_table(v6);
        assert_eq!(sessions[0].local, "[fd00::1]:443".parse().unwrap());
        assert_eq!(sessions[0].peer, "[2001:db8::9]:40000".parse().unwrap());
        assert_eq!(sessions[1].peer, "10.0.0.1:54321".parse().unwrap());
        assert!(parse_table("header\n0: garbage\n").is_empty());
    }

    #[test]
    fn a_cut_names_peer_port_and_rule() {
        let cut = Cut {
            session: Session {
                local: "10.0.0.11:22".parse().unwrap(),
                peer: "203.0.113.9:51234".parse().unwrap(),
            },
            decided_by: "default deny".into(),
        };
        assert_eq!(
            cut.to_string(),
            "would cut the established session 203.0.113.9:51234 -> :22 (default deny)"
        );
    }
}
