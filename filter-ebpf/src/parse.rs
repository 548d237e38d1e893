//! Header parsing with one bounds-checked cursor (xdp-tools' `hdr_cursor`).
//!
//! Only raw integers are read from the packet; every loop is bounded by a
//! constant so the verifier can prove termination.

use core::mem::size_of;

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use filter_common::wire::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_ROUTING, IPV4_FRAGMENT_OFFSET,
    MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS,
};
pub use filter_common::wire::{IPPROTO_TCP, IPPROTO_UDP};

/// The header was truncated or invalid.
pub struct Malformed;

/// What the parser found in a frame.
pub enum Frame {
    /// Not IPv4/IPv6: ARP, LLDP, ...
    NonIp,
    Ip(Packet),
}

/// The fields of an IP packet that rules can match.
pub struct Packet {
    /// IPv6 (true) or IPv4 (false).
    pub v6: bool,
    /// The source address in the packet; the destination follows it
    /// directly (4 or 16 bytes each), in both IPv4 and IPv6 headers.
    pub addresses: *const u8,
    /// Upper-layer protocol (after IPv6 extension headers).
    pub proto: u8,
    /// True for non-first fragments, which carry no L4 header.
    pub fragment: bool,
    /// True when ports, flags or ICMP type/code were read: false for
    /// fragments and for ICMP of the other family.
    pub has_l4: bool,
    /// TCP/UDP ports; ICMP type (sport) and code (dport); 0 otherwise.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte; 0 for other protocols.
    pub tcp_flags: u8,
}

/// A bounds-checked read position in the packet.
struct Cursor {
    pos: usize,
    end: usize,
}

impl Cursor {
    /// Returns a pointer to the next `T` and moves past it.
    #[inline(always)]
    fn take<T>(&mut self) -> Result<*const T, Malformed> {
        let start = self.pos;
        if start + size_of::<T>() > self.end {
            return Err(Malformed);
        }
        self.pos = start + size_of::<T>();
        Ok(start as *const T)
    }

    /// Moves past `len` bytes; callers bound `len` so the verifier can too.
    #[inline(always)]
    fn skip(&mut self, len: usize) -> Result<(), Malformed> {
        if self.pos + len > self.end {
            return Err(Malformed);
        }
        self.pos += len;
        Ok(())
    }
}

/// Parses the frame in packet memory `start..end` (XDP or TC data).
#[inline(always)]
pub fn parse(start: usize, end: usize) -> Result<Frame, Malformed> {
    let mut cur = Cursor { pos: start, end };
    let eth: *const EthHdr = cur.take()?;
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = cur.take()?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
    }
    match ether_type {
        ETH_P_IP => parse_ipv4(&mut cur).map(Frame::Ip),
        ETH_P_IPV6 => parse_ipv6(&mut cur).map(Frame::Ip),
        // A third VLAN tag: nothing on the host can consume it, and passing it
        // unfiltered would be a bypass.
        ETH_P_8021Q | ETH_P_8021AD => Err(Malformed),
        _ => Ok(Frame::NonIp),
    }
}

#[inline(always)]
fn parse_ipv4(cur: &mut Cursor) -> Result<Packet, Malformed> {
    let ip: *const Ipv4Hdr = cur.take()?;
    let vihl = unsafe { (*ip).vihl };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || header_len < size_of::<Ipv4Hdr>() {
        return Err(Malformed);
    }
    cur.skip(header_len - size_of::<Ipv4Hdr>())?;
    let fragment_offset = u16::from_be_bytes(unsafe { (*ip).frags }) & IPV4_FRAGMENT_OFFSET;
    let proto = unsafe { (*ip).proto };
    let addresses = unsafe { (*ip).src_addr.as_ptr() };
    parse_l4(cur, addresses, false, proto, fragment_offset == 0)
}

#[inline(always)]
fn parse_ipv6(cur: &mut Cursor) -> Result<Packet, Malformed> {
    let ip: *const Ipv6Hdr = cur.take()?;
    if unsafe { (*ip).vcf[0] } >> 4 != 6 {
        return Err(Malformed);
    }
    let mut next = unsafe { (*ip).next_hdr };
    let mut first_fragment = true;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                // next header, length in 8-octet units not counting the first.
                let ext: *const [u8; 2] = cur.take()?;
                let [next_hdr, len] = unsafe { *ext };
                next = next_hdr;
                cur.skip((len as usize + 1) * 8 - 2)?;
            }
            IPPROTO_FRAGMENT => {
                let frag: *const [u8; 8] = cur.take()?;
                let frag = unsafe { *frag };
                next = frag[0];
                first_fragment = u16::from_be_bytes([frag[2], frag[3]]) >> 3 == 0;
            }
            _ => {
                let addresses = unsafe { (*ip).src_addr.as_ptr() };
                return parse_l4(cur, addresses, true, next, first_fragment);
            }
        }
    }
    Err(Malformed)
}

#[inline(always)]
fn parse_l4(
    cur: &mut Cursor,
    addresses: *const u8,
    v6: bool,
    proto: u8,
    first_fragment: bool,
) -> Result<Packet, Malformed> {
    let mut packet = Packet {
        v6,
        addresses,
        proto,
        fragment: !first_fragment,
        has_l4: first_fragment,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
    };
    if !first_fragment {
        return Ok(packet);
    }
    match proto {
        IPPROTO_TCP => {
            let tcp: *const TcpHdr = cur.take()?;
            let raw = tcp as *const u8;
            // Byte 12: data offset (high nibble); byte 13: the flags.
            if unsafe { *raw.add(12) } >> 4 < 5 {
                return Err(Malformed);
            }
            packet.sport = u16::from_be_bytes(unsafe { (*tcp).source });
            packet.dport = u16::from_be_bytes(unsafe { (*tcp).dest });
            packet.tcp_flags = unsafe { *raw.add(13) };
        }
        IPPROTO_UDP => {
            let udp: *const UdpHdr = cur.take()?;
            packet.sport = u16::from_be_bytes(unsafe { (*udp).src });
            packet.dport = u16::from_be_bytes(unsafe { (*udp).dst });
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 if (proto == IPPROTO_ICMPV6) == v6 => {
            let icmp: *const [u8; 2] = cur.take()?;
            let [icmp_type, icmp_code] = unsafe { *icmp };
            packet.sport = icmp_type as u16;
            packet.dport = icmp_code as u16;
        }
        // ICMP of the other family: type and code mean nothing here.
        IPPROTO_ICMP | IPPROTO_ICMPV6 => packet.has_l4 = false,
        _ => {}
    }
    Ok(packet)
}
