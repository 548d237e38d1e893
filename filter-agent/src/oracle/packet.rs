//! Builds Ethernet frames from a description: for `filter-agent test`, the
//! BPF_PROG_TEST_RUN fixtures and the differential tests.

use std::net::IpAddr;

/// The numbers the program parses, defined once beside it.
pub use filter_common::wire::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_ROUTING, IPPROTO_TCP, IPPROTO_UDP,
    tcp_flag,
};

/// The transport part of a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP for IPv4 sources, ICMPv6 for IPv6.
    Icmp {
        icmp_type: u8,
        code: u8,
    },
    /// Any other protocol number, with `payload` as its first bytes.
    Other {
        proto: u8,
        payload: Vec<u8>,
    },
}

impl Transport {
    pub fn proto(&self, v6: bool) -> u8 {
        match self {
            Transport::Tcp { .. } => IPPROTO_TCP,
            Transport::Udp { .. } => IPPROTO_UDP,
            Transport::Icmp { .. } if v6 => IPPROTO_ICMPV6,
            Transport::Icmp { .. } => IPPROTO_ICMP,
            Transport::Other { proto, .. } => *proto,
        }
    }
}

/// An IP packet inside an Ethernet frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketSpec {
    /// VLAN IDs, outermost first (the outer one is 802.1ad when there are two).
    pub vlans: Vec<u16>,
    /// Source and destination; both of one family.
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    /// IPv4 option bytes (padded to a multiple of 4); ignored for IPv6.
    pub ipv4_options: Vec<u8>,
    /// IPv6 extension headers before the transport (hop-by-hop, routing,
    /// destination options: 8 bytes each); ignored for IPv4.
    pub ipv6_extensions: Vec<u8>,
    /// Fragment offset in 8-byte units; non-zero makes a non-first fragment
    /// (IPv6 gets a fragment header).
    pub fragment_offset: u16,
    /// Adds an IPv6 fragment header even at offset 0 (a first fragment).
    pub ipv6_fragment_header: bool,
}

impl PacketSpec {
    pub fn new(src: IpAddr, dst: IpAddr, transport: Transport) -> Self {
        Self {
            vlans: Vec::new(),
            src,
            dst,
            transport,
            ipv4_options: Vec::new(),
            ipv6_extensions: Vec::new(),
            fragment_offset: 0,
            ipv6_fragment_header: false,
        }
    }

    /// The whole Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let v6 = self.src.is_ipv6();
        let mut frame = Vec::with_capacity(128);
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // destination MAC
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // source MAC
        for (index, vlan) in self.vlans.iter().enumerate() {
            let tpid = if index == 0 && self.vlans.len() > 1 {
                ETH_P_8021AD
            } else {
                ETH_P_8021Q
            };
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&(vlan & 0x0fff).to_be_bytes());
        }
        frame.extend_from_slice(&(if v6 { ETH_P_IPV6 } else { ETH_P_IP }).to_be_bytes());
        let l4 = if self.fragment_offset == 0 {
            self.transport_bytes()
        } else {
            vec![0xaa; 8] // the middle of some datagram
        };
        if v6 {
            self.push_ipv6(&mut frame, &l4);
        } else {
            self.push_ipv4(&mut frame, &l4);
        }
        frame
    }

    fn transport_bytes(&self) -> Vec<u8> {
        match &self.transport {
            Transport::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut tcp = vec![0u8; 20];
                tcp[0..2].copy_from_slice(&sport.to_be_bytes());
                tcp[2..4].copy_from_slice(&dport.to_be_bytes());
                tcp[12] = 5 << 4; // data offset: 5 words
                tcp[13] = *flags;
                tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
                tcp
            }
            Transport::Udp { sport, dport } => {
                let mut udp = vec![0u8; 8];
                udp[0..2].copy_from_slice(&sport.to_be_bytes());
                udp[2..4].copy_from_slice(&dport.to_be_bytes());
                udp[4..6].copy_from_slice(&8u16.to_be_bytes());
                udp
            }
            Transport::Icmp { icmp_type, code } => vec![*icmp_type, *code, 0, 0, 0, 1, 0, 1],
            Transport::Other { payload, .. } => payload.clone(),
        }
    }

    fn push_ipv4(&self, frame: &mut Vec<u8>, l4: &[u8]) {
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (self.src, self.dst) else {
            panic!("PacketSpec: source and destination must be of one family");
        };
        let mut options = self.ipv4_options.clone();
        options.resize(options.len().div_ceil(4) * 4, 0);
        let header_len = 20 + options.len();
        let total_len = (header_len + l4.len()) as u16;
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (header_len / 4) as u8;
        ip[2..4].copy_from_slice(&total_len.to_be_bytes());
        ip[6..8].copy_from_slice(
            &(self.fragment_offset & filter_common::wire::IPV4_FRAGMENT_OFFSET).to_be_bytes(),
        );
        ip[8] = 64;
        ip[9] = self.transport.proto(false);
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        ip.extend_from_slice(&options);
        let checksum = internet_checksum::checksum(&ip);
        ip[10..12].copy_from_slice(&checksum);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(l4);
    }

    fn push_ipv6(&self, frame: &mut Vec<u8>, l4: &[u8]) {
        let (IpAddr::V6(src), IpAddr::V6(dst)) = (self.src, self.dst) else {
            panic!("PacketSpec: source and destination must be of one family");
        };
        let proto = self.transport.proto(true);
        // Chain: the given extension headers, then a fragment header if asked.
        let mut chain: Vec<(u8, Vec<u8>)> = self
            .ipv6_extensions
            .iter()
            .map(|kind| (*kind, vec![0u8; 8]))
            .collect();
        if self.fragment_offset != 0 || self.ipv6_fragment_header {
            let mut fragment = vec![0u8; 8];
            fragment[2..4].copy_from_slice(&(self.fragment_offset << 3).to_be_bytes());
            chain.push((IPPROTO_FRAGMENT, fragment));
        }
        let mut extensions = Vec::new();
        for (index, (_, body)) in chain.iter().enumerate() {
            let next = chain.get(index + 1).map_or(proto, |(kind, _)| *kind);
            let mut body = body.clone();
            body[0] = next; // byte 1 (length) stays 0: 8 bytes
            extensions.extend_from_slice(&body);
        }
        let first = chain.first().map_or(proto, |(kind, _)| *kind);
        let payload_len = (extensions.len() + l4.len()) as u16;
        frame.extend_from_slice(&[0x60, 0, 0, 0]);
        frame.extend_from_slice(&payload_len.to_be_bytes());
        frame.push(first);
        frame.push(64);
        frame.extend_from_slice(&src.octets());
        frame.extend_from_slice(&dst.octets());
        frame.extend_from_slice(&extensions);
        frame.extend_from_slice(l4);
    }
}

/// The address inside `net` whose host part is taken from `host_bits`
/// (the low 32 or 128 bits), for generating traffic that a prefix matches.
pub fn address_in(net: &ipnet::IpNet, host_bits: u128) -> IpAddr {
    match net {
        ipnet::IpNet::V4(net) => {
            let host = host_bits as u32 & !u32::from(net.netmask());
            IpAddr::from(std::net::Ipv4Addr::from(u32::from(net.network()) | host))
        }
        ipnet::IpNet::V6(net) => {
            let host = host_bits & !u128::from(net.netmask());
            IpAddr::from(std::net::Ipv6Addr::from(u128::from(net.network()) | host))
        }
    }
}

/// An ARP request: a frame that is not IP.
pub fn arp_request() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0u8; 20]);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(src: &str, dst: &str) -> PacketSpec {
        PacketSpec::new(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            Transport::Tcp {
                sport: 443,
                dport: 51000,
                flags: tcp_flag::SYN | tcp_flag::ACK,
            },
        )
    }

    #[test]
    fn ipv4_tcp_layout() {
        let frame = tcp("203.0.113.5", "10.0.0.11").build();
        assert_eq!(frame.len(), 14 + 20 + 20);
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        assert_eq!(frame[14], 0x45);
        assert_eq!(frame[23], IPPROTO_TCP);
        assert_eq!(&frame[34..36], &443u16.to_be_bytes());
        assert_eq!(frame[34 + 13], 0x12);
        // A valid header checksums to zero.
        assert_eq!(internet_checksum::checksum(&frame[14..34]), [0, 0]);
    }

    #[test]
    fn address_in_keeps_the_network_part() {
        let net: ipnet::IpNet = "10.1.2.0/23".parse().unwrap();
        assert_eq!(
            address_in(&net, u128::MAX),
            "10.1.3.255".parse::<IpAddr>().unwrap()
        );
        assert_eq!(address_in(&net, 0), "10.1.2.0".parse::<IpAddr>().unwrap());
        let net: ipnet::IpNet = "2001:db8::/120".parse().unwrap();
        assert_eq!(
            address_in(&net, 0x1234),
            "2001:db8::34".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn vlan_tags_outer_is_8021ad() {
        let mut spec = tcp("203.0.113.5", "10.0.0.11");
        spec.vlans = vec![100, 200];
        let frame = spec.build();
        assert_eq!(&frame[12..14], &ETH_P_8021AD.to_be_bytes());
        assert_eq!(&frame[16..18], &ETH_P_8021Q.to_be_bytes());
        assert_eq!(&frame[20..22], &ETH_P_IP.to_be_bytes());
    }

    #[test]
    fn ipv6_extension_chain() {
        let mut spec = tcp("2001:db8::1", "2001:db8::2");
        spec.ipv6_extensions = vec![IPPROTO_HOPOPTS, IPPROTO_DSTOPTS];
        spec.ipv6_fragment_header = true;
        let frame = spec.build();
        assert_eq!(frame[14 + 6], IPPROTO_HOPOPTS);
        assert_eq!(frame[54], IPPROTO_DSTOPTS);
        assert_eq!(frame[62], IPPROTO_FRAGMENT);
        assert_eq!(frame[70], IPPROTO_TCP);
        assert_eq!(frame.len(), 14 + 40 + 24 + 20);
    }
}

/// Parses a one-line packet description:
/// `PROTO SRC[:PORT] -> DST[:PORT] [flags LETTERS] [type N] [code N] [vlan N]...`
/// where PROTO is tcp, udp or icmp (ICMPv6 for IPv6 addresses), IPv6
/// addresses with a port are bracketed (`[2001:db8::1]:443`) and flags are
/// tcpdump's letters (S, A, F, R, P, U, E, C).
pub fn parse_description(text: &str) -> Result<PacketSpec, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let [proto, src, arrow, dst, rest @ ..] = words.as_slice() else {
        return Err(format!("expected \"PROTO SRC -> DST ...\", got {text:?}"));
    };
    if *arrow != "->" {
        return Err(format!(
            "expected \"->\" between source and destination, got {arrow:?}"
        ));
    }
    let (src, sport) = endpoint(src)?;
    let (dst, dport) = endpoint(dst)?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err("source and destination must be of one address family".into());
    }
    let Options {
        flags,
        icmp_type,
        code,
        vlans,
    } = options(rest)?;
    let ports = |name: &str| match (sport, dport) {
        (Some(sport), Some(dport)) => Ok((sport, dport)),
        _ => Err(format!("{name} needs ports: SRC:PORT -> DST:PORT")),
    };
    let transport = match *proto {
        "tcp" => {
            let (sport, dport) = ports("tcp")?;
            Transport::Tcp {
                sport,
                dport,
                flags,
            }
        }
        "udp" => {
            let (sport, dport) = ports("udp")?;
            Transport::Udp { sport, dport }
        }
        "icmp" | "icmpv6" => Transport::Icmp { icmp_type, code },
        other => return Err(format!("unknown protocol {other:?}: use tcp, udp or icmp")),
    };
    let mut spec = PacketSpec::new(src, dst, transport);
    spec.vlans = vlans;
    Ok(spec)
}

/// The words after `PROTO SRC -> DST`.
struct Options {
    flags: u8,
    icmp_type: u8,
    code: u8,
    vlans: Vec<u16>,
}

fn options(rest: &[&str]) -> Result<Options, String> {
    let (mut flags, mut icmp_type, mut code, mut vlans) = (0u8, 8u8, 0u8, Vec::new());
    for pair in rest.chunks(2) {
        let [key, value] = pair else {
            return Err(format!("{:?} needs a value", pair[0]));
        };
        let number = |what: &str| {
            value
                .parse::<u16>()
                .map_err(|_| format!("{what} {value:?} is not a number"))
        };
        match *key {
            "flags" => flags = tcp_flags(value)?,
            "type" => {
                icmp_type = u8::try_from(number("type")?).map_err(|_| "type is 0-255".to_owned())?
            }
            "code" => {
                code = u8::try_from(number("code")?).map_err(|_| "code is 0-255".to_owned())?
            }
            "vlan" => vlans.push(number("vlan")?),
            other => {
                return Err(format!(
                    "unknown word {other:?}: use flags, type, code or vlan"
                ));
            }
        }
    }
    Ok(Options {
        flags,
        icmp_type,
        code,
        vlans,
    })
}

/// `ADDR`, `ADDR:PORT`, `[V6]` or `[V6]:PORT`.
fn endpoint(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    let bad = || format!("{text:?} is not ADDR, ADDR:PORT or [IPv6]:PORT");
    let (addr, port) = if let Some(rest) = text.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
        (addr, after.strip_prefix(':'))
    } else if text.matches(':').count() == 1 {
        let (addr, port) = text.split_once(':').ok_or_else(bad)?;
        (addr, Some(port))
    } else {
        (text, None)
    };
    let addr = addr.parse().map_err(|_| bad())?;
    let port = port
        .map(|port| port.parse().map_err(|_| bad()))
        .transpose()?;
    Ok((addr, port))
}

fn tcp_flags(letters: &str) -> Result<u8, String> {
    letters.chars().try_fold(0u8, |flags, letter| {
        let bit = match letter.to_ascii_uppercase() {
            'F' => tcp_flag::FIN,
            'S' => tcp_flag::SYN,
            'R' => tcp_flag::RST,
            'P' => tcp_flag::PSH,
            'A' => tcp_flag::ACK,
            'U' => tcp_flag::URG,
            'E' => tcp_flag::ECE,
            'C' => tcp_flag::CWR,
            '.' => 0,
            _ => {
                return Err(format!(
                    "unknown TCP flag letter {letter:?}: use S A F R P U E C"
                ));
            }
        };
        Ok(flags | bit)
    })
}

#[cfg(test)]
mod description_tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let spec = parse_description("tcp 203.0.113.5:443 -> 10.0.0.11:51000 flags SA").unwrap();
        assert_eq!(
            spec.transport,
            Transport::Tcp {
                sport: 443,
                dport: 51000,
                flags: tcp_flag::SYN | tcp_flag::ACK
            }
        );
        let spec = parse_description("udp [2001:db8::1]:53 -> [2001:db8::2]:40000 vlan 10 vlan 20")
            .unwrap();
        assert_eq!(
            spec.transport,
            Transport::Udp {
                sport: 53,
                dport: 40000
            }
        );
        assert_eq!(spec.vlans, [10, 20]);
        let spec = parse_description("icmp 2001:db8::1 -> 2001:db8::2 type 135 code 0").unwrap();
        assert_eq!(
            spec.transport,
            Transport::Icmp {
                icmp_type: 135,
                code: 0
            }
        );
        assert_eq!(spec.transport.proto(true), IPPROTO_ICMPV6);
    }

    #[test]
    fn rejects_with_a_reason() {
        for (text, needle) in [
            ("tcp 1.2.3.4 -> 5.6.7.8", "needs ports"),
            ("tcp 1.2.3.4:1 5.6.7.8:2", "expected"),
            ("tcp 1.2.3.4:1 -> [::1]:2", "one address family"),
            ("sctp 1.2.3.4:1 -> 5.6.7.8:2", "unknown protocol"),
            ("tcp 1.2.3.4:1 -> 5.6.7.8:2 flags SX", "unknown TCP flag"),
            ("tcp 1.2.3.4:1 -> 5.6.7.8:99999", "is not ADDR"),
            ("tcp 1.2.3.4:1 -> 5.6.7.8:2 vlan", "needs a value"),
        ] {
            let err = parse_description(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
