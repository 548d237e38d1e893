//! The reference model: a plain user-space parser and first-match
//! classifier, written to be obviously correct rather than fast. The
//! differential tests hold the XDP program to it.

use std::net::IpAddr;

pub use filter_common::Outcome;
use filter_common::{guard::WELL_KNOWN_END, reason, wire::*};

pub use super::buckets::Buckets;
use crate::rules::config::{Action, Config, Fragments, GuardAction, GuardSettings, Rule};

/// What a frame is, as far as the filter is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Malformed,
    NonIp,
    Ip(Fields),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fields {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// A non-first fragment.
    pub fragment: bool,
    pub header: Header,
}

/// What the parser read past the IP header (the packet builder's
/// `packet::Transport` is what a test asks to be written there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        icmp_type: u8,
        code: u8,
    },
    /// Nothing readable: another protocol, a fragment, or ICMP of the
    /// other family.
    None,
}

/// The action enforce mode takes for `outcome`: the rule's, or the one a
/// reason implies. `rules` are in `Config::effective_rules` order.
pub fn action_of<R>(outcome: Outcome, rules: &[R], rule_action: impl Fn(&R) -> Action) -> Action {
    match outcome {
        Outcome::Rule(index) => rule_action(&rules[index]),
        Outcome::OverLimit(_) => Action::Deny,
        Outcome::Reason(
            reason::DEFAULT_DENY | reason::MALFORMED | reason::FRAGMENT_DENY | reason::GUARD_DROP,
        ) => Action::Deny,
        Outcome::Reason(_) => Action::Allow,
    }
}

/// Classifies one Ethernet frame arriving alone: a rate-limited rule has
/// its whole burst.
pub fn classify(config: &Config, frame: &[u8]) -> (Outcome, Action) {
    classify_at(config, &mut Buckets::default(), 0, frame)
}

/// Classifies one Ethernet frame arriving at `now_ns`, with the rate-limit
/// state `buckets` left by the frames before it.
pub fn classify_at(
    config: &Config,
    buckets: &mut Buckets,
    now_ns: u64,
    frame: &[u8],
) -> (Outcome, Action) {
    let fields = match parse(frame) {
        Parsed::Malformed => return (Outcome::Reason(reason::MALFORMED), Action::Deny),
        Parsed::NonIp => return (Outcome::Reason(reason::NON_IP), Action::Allow),
        Parsed::Ip(fields) => fields,
    };
    if config.guard.action == GuardAction::Drop
        && guard_inbound(&config.guard, &fields) == GuardView::OutOfRange
    {
        return (Outcome::Reason(reason::GUARD_DROP), Action::Deny);
    }
    if fields.fragment {
        match config.filter.fragments {
            Fragments::Allow => return (Outcome::Reason(reason::FRAGMENT_ALLOW), Action::Allow),
            Fragments::Deny => return (Outcome::Reason(reason::FRAGMENT_DENY), Action::Deny),
            Fragments::MatchL3 => {}
        }
    }
    // A limited rule's slot in the program's `LIMITS` map: 1, 2, ... in
    // rule order.
    let mut limit_slot = 0;
    for (index, rule) in config.effective_rules().enumerate() {
        limit_slot += u32::from(rule.limit.is_some());
        if !matches(rule, &fields) {
            continue;
        }
        let sources = config.filter.limit_sources;
        if let Some(limit) = &rule.limit
            && !buckets.take(limit_slot, limit, fields.src, now_ns, sources)
        {
            return (Outcome::OverLimit(index), Action::Deny);
        }
        return (Outcome::Rule(index), rule.action);
    }
    match config.filter.default {
        Action::Allow => (Outcome::Reason(reason::DEFAULT_ALLOW), Action::Allow),
        Action::Deny => (Outcome::Reason(reason::DEFAULT_DENY), Action::Deny),
    }
}

/// How the ephemeral-port guard sees an inbound packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardView {
    /// Not return traffic, or the guard is off.
    Ignored,
    InRange,
    OutOfRange,
}

/// Return traffic is TCP with ACK set, or UDP from a remote service port
/// (below 1024 or a configured service), to a port that is not a local
/// service; where that port lies decides the view. Only configured services
/// count here: discovered listeners are the daemon's addition.
pub fn guard_inbound(guard: &GuardSettings, fields: &Fields) -> GuardView {
    let service = |port: u16| {
        guard
            .services
            .iter()
            .any(|&(lo, hi)| lo <= port && port <= hi)
    };
    let local_port = match fields.header {
        Header::Tcp { dport, flags, .. } if flags & tcp_flag::ACK != 0 => dport,
        Header::Udp { sport, dport } if sport < WELL_KNOWN_END || service(sport) => dport,
        _ => return GuardView::Ignored,
    };
    let (low, high) = guard.ephemeral;
    if guard.action == GuardAction::Off || service(local_port) {
        GuardView::Ignored
    } else if (low..=high).contains(&local_port) {
        GuardView::InRange
    } else {
        GuardView::OutOfRange
    }
}

/// Does `rule` accept a packet with these fields?
pub fn matches(rule: &Rule, fields: &Fields) -> bool {
    let address = |list: &Option<std::sync::Arc<crate::rules::config::AddressList>>,
                   addr: IpAddr| {
        list.as_ref()
            .is_none_or(|list| list.nets.iter().any(|net| net.contains(&addr)))
    };
    let in_ranges = |ranges: &Option<Vec<(u16, u16)>>, port: Option<u16>| match (ranges, port) {
        (None, _) => true,
        (Some(ranges), Some(port)) => ranges.iter().any(|&(lo, hi)| lo <= port && port <= hi),
        (Some(_), None) => false,
    };
    let (sport, dport) = match fields.header {
        Header::Tcp { sport, dport, .. } | Header::Udp { sport, dport } => {
            (Some(sport), Some(dport))
        }
        _ => (None, None),
    };
    let flags_ok = match (rule.tcp_flags, fields.header) {
        (None, _) => true,
        (Some(wanted), Header::Tcp { flags, .. }) => wanted.matches(flags),
        (Some(_), _) => false,
    };
    let icmp_ok = |values: &Option<Vec<u8>>, pick: fn(u8, u8) -> u8| match (values, fields.header) {
        (None, _) => true,
        (Some(values), Header::Icmp { icmp_type, code }) => values.contains(&pick(icmp_type, code)),
        (Some(_), _) => false,
    };
    rule.proto.is_none_or(|proto| proto == fields.proto)
        && address(&rule.src, fields.src)
        && address(&rule.dst, fields.dst)
        && in_ranges(&rule.sport, sport)
        && in_ranges(&rule.dport, dport)
        && flags_ok
        && icmp_ok(&rule.icmp_type, |icmp_type, _| icmp_type)
        && icmp_ok(&rule.icmp_code, |_, code| code)
}

/// Reads a frame the way the program does, with plain slice indexing.
pub fn parse(frame: &[u8]) -> Parsed {
    parse_frame(frame).unwrap_or(Parsed::Malformed)
}

fn parse_frame(frame: &[u8]) -> Option<Parsed> {
    let mut offset = 12;
    let mut ether_type = be16(frame, offset)?;
    offset += 2;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        ether_type = be16(frame, offset + 2)?;
        offset += 4;
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(frame, offset),
        ETH_P_IPV6 => parse_ipv6(frame, offset),
        ETH_P_8021Q | ETH_P_8021AD => None,
        _ => Some(Parsed::NonIp),
    }
}

fn parse_ipv4(frame: &[u8], start: usize) -> Option<Parsed> {
    let header = frame.get(start..start + 20)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header[0] >> 4 != 4 || header_len < 20 || frame.len() < start + header_len {
        return None;
    }
    let fragment = be16(header, 6)? & IPV4_FRAGMENT_OFFSET != 0;
    let src = IpAddr::from(<[u8; 4]>::try_from(&header[12..16]).ok()?);
    let dst = IpAddr::from(<[u8; 4]>::try_from(&header[16..20]).ok()?);
    transport(frame, start + header_len, src, dst, header[9], fragment)
}

fn parse_ipv6(frame: &[u8], start: usize) -> Option<Parsed> {
    let header = frame.get(start..start + 40)?;
    if header[0] >> 4 != 6 {
        return None;
    }
    let src = IpAddr::from(<[u8; 16]>::try_from(&header[8..24]).ok()?);
    let dst = IpAddr::from(<[u8; 16]>::try_from(&header[24..40]).ok()?);
    let mut next = header[6];
    let mut offset = start + 40;
    let mut fragment = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext = frame.get(offset..offset + 2)?;
                let len = (usize::from(ext[1]) + 1) * 8;
                frame.get(offset..offset + len)?;
                next = ext[0];
                offset += len;
            }
            IPPROTO_FRAGMENT => {
                let ext = frame.get(offset..offset + 8)?;
                next = ext[0];
                fragment = be16(ext, 2)? >> 3 != 0;
                offset += 8;
            }
            _ => return transport(frame, offset, src, dst, next, fragment),
        }
    }
    None
}

fn transport(
    frame: &[u8],
    start: usize,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    fragment: bool,
) -> Option<Parsed> {
    let v6 = src.is_ipv6();
    let header = if fragment {
        Header::None
    } else {
        match proto {
            IPPROTO_TCP => {
                let tcp = frame.get(start..start + 20)?;
                if tcp[12] >> 4 < 5 {
                    return None;
                }
                Header::Tcp {
                    sport: be16(tcp, 0)?,
                    dport: be16(tcp, 2)?,
                    flags: tcp[13],
                }
            }
            IPPROTO_UDP => {
                let udp = frame.get(start..start + 8)?;
                Header::Udp {
                    sport: be16(udp, 0)?,
                    dport: be16(udp, 2)?,
                }
            }
            IPPROTO_ICMP if !v6 => icmp(frame, start)?,
            IPPROTO_ICMPV6 if v6 => icmp(frame, start)?,
            _ => Header::None,
        }
    };
    Some(Parsed::Ip(Fields {
        src,
        dst,
        proto,
        fragment,
        header,
    }))
}

fn icmp(frame: &[u8], start: usize) -> Option<Header> {
    let icmp = frame.get(start..start + 2)?;
    Some(Header::Icmp {
        icmp_type: icmp[0],
        code: icmp[1],
    })
}

fn be16(bytes: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_be_bytes(
        bytes.get(offset..offset + 2)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        oracle::packet::{PacketSpec, Transport, tcp_flag},
        rules::config,
    };

    fn config(rules: &str) -> Config {
        config::parse(
            Path::new("r.toml"),
            &format!("[filter]\ndefault = \"deny\"\n{rules}"),
        )
        .unwrap()
    }

    fn tcp(src: &str, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
        PacketSpec::new(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            Transport::Tcp {
                sport: 40000,
                dport,
                flags,
            },
        )
        .build()
    }

    #[test]
    fn first_match_wins() {
        let config = config(
            "[[rule]]\nname = \"block\"\naction = \"deny\"\nsrc = \"198.51.100.0/24\"\n\
             [[rule]]\nname = \"web\"\naction = \"allow\"\nproto = \"tcp\"\ndport = [80, 443]\n",
        );
        // Index 0 is the implicit ND rule.
        let blocked = tcp("198.51.100.9", "10.0.0.1", 443, tcp_flag::SYN);
        assert_eq!(
            classify(&config, &blocked),
            (Outcome::Rule(1), Action::Deny)
        );
        let web = tcp("203.0.113.9", "10.0.0.1", 443, tcp_flag::SYN);
        assert_eq!(classify(&config, &web), (Outcome::Rule(2), Action::Allow));
        let other = tcp("203.0.113.9", "10.0.0.1", 22, tcp_flag::SYN);
        assert_eq!(
            classify(&config, &other),
            (Outcome::Reason(reason::DEFAULT_DENY), Action::Deny)
        );
    }

    #[test]
    fn icmp_of_the_other_family_has_no_type() {
        let config = config(
            "[[rule]]\nname = \"echo-reply\"\naction = \"allow\"\nproto = \"icmp\"\nicmp_type = 0\n",
        );
        let mut v6_with_icmpv4 = PacketSpec::new(
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
            Transport::Other {
                proto: IPPROTO_ICMP,
                payload: vec![0, 0, 0, 0],
            },
        );
        assert_eq!(
            classify(&config, &v6_with_icmpv4.build()).0,
            Outcome::Reason(reason::DEFAULT_DENY)
        );
        v6_with_icmpv4.src = "192.0.2.1".parse().unwrap();
        v6_with_icmpv4.dst = "192.0.2.2".parse().unwrap();
        assert_eq!(
            classify(&config, &v6_with_icmpv4.build()).0,
            Outcome::Rule(1)
        );
    }

    #[test]
    fn fragments_policy() {
        let mut fragment = PacketSpec::new(
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            Transport::Udp {
                sport: 53,
                dport: 53,
            },
        );
        fragment.fragment_offset = 10;
        let frame = fragment.build();
        let rules = "[[rule]]\nname = \"dns\"\naction = \"allow\"\nproto = \"udp\"\nsport = 53\n\
                     [[rule]]\nname = \"udp\"\naction = \"allow\"\nproto = \"udp\"\n";
        // match-l3: the port rule cannot match a fragment, the L3 rule can.
        assert_eq!(classify(&config(rules), &frame).0, Outcome::Rule(2));
        let mut deny = config(rules);
        deny.filter.fragments = Fragments::Deny;
        assert_eq!(
            classify(&deny, &frame),
            (Outcome::Reason(reason::FRAGMENT_DENY), Action::Deny)
        );
    }

    #[test]
    fn nd_passes_ahead_of_a_deny_all() {
        let config = config("[[rule]]\nname = \"all\"\naction = \"deny\"\n");
        let solicitation = PacketSpec::new(
            "fe80::1".parse().unwrap(),
            "ff02::1:ff00:2".parse().unwrap(),
            Transport::Icmp {
                icmp_type: 135,
                code: 0,
            },
        );
        assert_eq!(
            classify(&config, &solicitation.build()),
            (Outcome::Rule(0), Action::Allow)
        );
    }
}
