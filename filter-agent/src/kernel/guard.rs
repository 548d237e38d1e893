//! The ephemeral-port guard, user-space side: which local ports are
//! services (so that traffic to them is not return traffic), and reading
//! what the program recorded about out-of-range traffic.

use std::{
    collections::{BTreeSet, HashSet},
    fs,
    net::IpAddr,
    path::Path,
};

use aya::maps::Map;
use filter_common::{
    Counter, GuardPeer, GuardPort,
    guard::{EGRESS, SERVICE_WORDS, SERVICE_WORDS_PER_PROTO, STAT_COUNT},
    names,
};

use filter_common::wire::PROTOCOL_NAMES;

use crate::{
    kernel::counters,
    kernel::pins::{self, PinError},
};

/// Listening sockets, by protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listeners {
    pub tcp: BTreeSet<u16>,
    pub udp: BTreeSet<u16>,
}

impl Listeners {
    /// Ports listening in any network namespace on the host: one process
    /// per namespace is enough, as `/proc/PID/net/*` shows its namespace.
    pub fn discover() -> Self {
        let mut seen = HashSet::new();
        let mut listeners = Listeners::default();
        let Ok(entries) = fs::read_dir("/proc") else {
            return listeners;
        };
        for entry in entries.flatten() {
            let pid = entry.path();
            let Ok(netns) = fs::read_link(pid.join("ns/net")) else {
                continue;
            };
            if !seen.insert(netns) {
                continue;
            }
            for (file, tcp) in [
                ("tcp", true),
                ("tcp6", true),
                ("udp", false),
                ("udp6", false),
            ] {
                if let Ok(text) = fs::read_to_string(pid.join("net").join(file)) {
                    let set = if tcp {
                        &mut listeners.tcp
                    } else {
                        &mut listeners.udp
                    };
                    set.extend(listening_ports(&text, tcp));
                }
            }
        }
        listeners
    }
}

/// Local ports of listening sockets in a `/proc/net/{tcp,tcp6,udp,udp6}`
/// table: TCP in LISTEN, UDP bound with no remote peer.
pub fn listening_ports(table: &str, tcp: bool) -> Vec<u16> {
    const TCP_LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let local = fields.next()?;
            let remote = fields.next()?;
            let state = fields.next()?;
            let port = |address: &str| u16::from_str_radix(address.rsplit_once(':')?.1, 16).ok();
            let listening = if tcp {
                state == TCP_LISTEN
            } else {
                port(remote) == Some(0)
            };
            listening.then(|| port(local)).flatten()
        })
        .filter(|&port| port != 0)
        .collect()
}

/// The `SERVICE_PORTS` bitmap: configured services (both protocols) and
/// discovered listeners.
pub fn service_words(services: &[(u16, u16)], listeners: &Listeners) -> Vec<u64> {
    let mut words = vec![0u64; SERVICE_WORDS as usize];
    let mut set = |base: u32, port: u16| {
        words[(base + u32::from(port) / 64) as usize] |= 1 << (port % 64);
    };
    for &(lo, hi) in services {
        for port in lo..=hi {
            set(0, port);
            set(SERVICE_WORDS_PER_PROTO, port);
        }
    }
    listeners.tcp.iter().for_each(|&port| set(0, port));
    listeners
        .udp
        .iter()
        .for_each(|&port| set(SERVICE_WORDS_PER_PROTO, port));
    words
}

/// What the guard has counted on one interface.
#[derive(Clone, Debug, Default)]
pub struct GuardReport {
    /// Indexed by `filter_common::guard::RETURN_IN_RANGE` and friends.
    pub stats: [Counter; STAT_COUNT as usize],
    /// Out-of-range traffic per local port, most packets first.
    pub ports: Vec<(GuardPort, Counter)>,
    /// Out-of-range traffic per remote peer, most packets first.
    pub peers: Vec<(GuardPeer, Counter)>,
}

impl GuardReport {
    /// Reads the guard's maps, found by name with `map`.
    pub fn read<'a>(map: impl Fn(&str) -> Result<&'a Map, PinError>) -> Result<Self, PinError> {
        let read = |name: &str, source| PinError::Read {
            path: name.into(),
            source,
        };
        let mut stats = [Counter::default(); STAT_COUNT as usize];
        let totals = counters::array_totals(map(names::GUARD_STATS)?)
            .map_err(|source| read(names::GUARD_STATS, source))?;
        stats
            .iter_mut()
            .zip(totals)
            .for_each(|(slot, total)| *slot = total);
        Ok(GuardReport {
            stats,
            ports: counters::hash_totals(map(names::GUARD_PORTS)?)
                .map_err(|source| read(names::GUARD_PORTS, source))?,
            peers: counters::hash_totals(map(names::GUARD_PEERS)?)
                .map_err(|source| read(names::GUARD_PEERS, source))?,
        })
    }

    /// Reads the maps the agent pinned under `dir`.
    pub fn read_pinned(dir: &Path) -> Result<Self, PinError> {
        let maps = [names::GUARD_STATS, names::GUARD_PORTS, names::GUARD_PEERS].map(|name| {
            match pins::open_map(dir, name) {
                Ok(map) => Ok((name, map)),
                Err(PinError::NotPinned(_)) => Err(PinError::NoGuardMaps(dir.to_owned())),
                Err(err) => Err(err),
            }
        });
        let maps = maps.into_iter().collect::<Result<Vec<_>, _>>()?;
        Self::read(|name| {
            maps.iter()
                .find(|(known, _)| *known == name)
                .map(|(_, map)| map)
                .ok_or_else(|| PinError::NotPinned(dir.join(name)))
        })
    }

    /// Out-of-range return packets and outbound attempts counted so far.
    pub fn out_of_range(&self) -> (u64, u64) {
        (
            self.stats[filter_common::guard::RETURN_OUT_OF_RANGE as usize].packets,
            self.stats[filter_common::guard::OUTBOUND_OUT_OF_RANGE as usize].packets,
        )
    }
}

/// "ingress" or "egress".
pub fn direction_name(direction: u8) -> &'static str {
    if direction == EGRESS {
        "egress"
    } else {
        "ingress"
    }
}

/// The protocol's name in the rules file, or its number.
pub fn proto_name(proto: u8) -> String {
    PROTOCOL_NAMES
        .iter()
        .find(|(_, number)| *number == proto)
        .map_or_else(|| proto.to_string(), |(name, _)| (*name).to_owned())
}

/// The peer's address, IPv4-mapped addresses shown as IPv4.
pub fn peer_address(peer: &GuardPeer) -> IpAddr {
    filter_common::stored_address(peer.addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP_TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
";
    const UDP6_TABLE: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  10: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3 2 0 0
  11: 00000000000000000000000001000000:A1B2 00000000000000000000000001000000:0035 01 00000000:00000000 00:00000000 00000000     0        0 4 2 0 0
";

    #[test]
    fn finds_tcp_listeners_and_unconnected_udp() {
        assert_eq!(listening_ports(TCP_TABLE, true), vec![22]);
        assert_eq!(listening_ports(UDP6_TABLE, false), vec![53]);
        assert!(listening_ports("header only\n", true).is_empty());
    }

    #[test]
    fn service_bits_per_protocol() {
        let listeners = Listeners {
            tcp: [8080].into(),
            udp: [53].into(),
        };
        let words = service_words(&[(22, 23)], &listeners);
        let bit = |base: u32, port: u16| {
            words[(base + u32::from(port) / 64) as usize] & (1 << (port % 64)) != 0
        };
        let udp = SERVICE_WORDS_PER_PROTO;
        assert!(bit(0, 22) && bit(0, 23) && bit(udp, 22) && bit(udp, 23));
        assert!(bit(0, 8080) && !bit(udp, 8080));
        assert!(bit(udp, 53) && !bit(0, 53));
        assert!(!bit(0, 24) && !bit(0, 21));
    }

    #[test]
    fn mapped_peers_show_as_ipv4() {
        let mut peer = GuardPeer {
            addr: [0; 16],
            port: 1,
            proto: filter_common::wire::IPPROTO_TCP,
            direction: EGRESS,
        };
        peer.addr[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 1]);
        assert_eq!(peer_address(&peer).to_string(), "10.0.0.1");
        peer.addr = std::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(peer_address(&peer).to_string(), "::1");
    }
}
