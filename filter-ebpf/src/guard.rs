//! The ephemeral-port guard: return traffic (ingress, in XDP) and outbound
//! connection attempts (egress, in TC) whose local port lies outside the
//! ephemeral range are counted, remembered per port and peer, and (ingress,
//! `action = "drop"`) dropped.
//!
//! Totals are exact. The per-port and per-peer detail (two LRU hash
//! updates) is exact for the first `guard::DETAIL_EXACT` packets per CPU in
//! each window of `guard::DETAIL_WINDOW_JIFFIES`, then sampled one in
//! `guard::DETAIL_EVERY` with that weight: a flood of spoofed replies costs
//! a counter, not two hash updates and a clock read per packet.
//!
//! Stateless like the filter: a packet is "return traffic" by its TCP flags
//! and ports alone, as an upstream ACL would judge it.

use aya_ebpf::{
    Global,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, LruHashMap, LruPerCpuHashMap, PerCpuArray},
};
use filter_common::{
    Counter, GuardPeer, GuardPort, GuardSampler, UdpFlow,
    guard::{self, DEFAULT_EPHEMERAL, EGRESS, INGRESS},
    wire::tcp_flag::{ACK as TCP_ACK, SYN as TCP_SYN},
};

use crate::parse::{IPPROTO_TCP, IPPROTO_UDP, Packet};

const TCP_SYN_ACK: u8 = TCP_SYN | TCP_ACK;

/// `guard::OFF`, `COUNT` or `DROP`; set by the agent at load time.
#[unsafe(no_mangle)]
static GUARD_MODE: Global<u32> = Global::new(guard::OFF);
/// The ephemeral range, inclusive; set by the agent at load time.
#[unsafe(no_mangle)]
static EPHEMERAL_LOW: Global<u32> = Global::new(DEFAULT_EPHEMERAL.0 as u32);
#[unsafe(no_mangle)]
static EPHEMERAL_HIGH: Global<u32> = Global::new(DEFAULT_EPHEMERAL.1 as u32);

/// Local service ports (configured and discovered listeners), one bit each;
/// kept up to date by the agent while the program runs.
#[map]
static SERVICE_PORTS: Array<u64> = Array::with_max_entries(guard::SERVICE_WORDS, 0);
/// Per-CPU counters indexed by `guard::RETURN_IN_RANGE` and friends.
#[map]
static GUARD_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(guard::STAT_COUNT, 0);
/// Out-of-range traffic per local port and per remote peer.
#[map]
static GUARD_PORTS: LruPerCpuHashMap<GuardPort, Counter> =
    LruPerCpuHashMap::with_max_entries(guard::LRU_ENTRIES, 0);
#[map]
static GUARD_PEERS: LruPerCpuHashMap<GuardPeer, Counter> =
    LruPerCpuHashMap::with_max_entries(guard::LRU_ENTRIES, 0);
/// Per CPU and direction: how much of the detail is recorded one by one.
#[map]
static GUARD_SAMPLERS: PerCpuArray<GuardSampler> = PerCpuArray::with_max_entries(2, 0);
/// Outbound UDP flows to service ports, with when each was last seen, so
/// that only a flow's first packet counts as a connection attempt.
#[map]
static UDP_FLOWS: LruHashMap<UdpFlow, u64> = LruHashMap::with_max_entries(guard::LRU_ENTRIES, 0);

/// What the guard made of an inbound packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Not return traffic, or inside the range.
    Fine,
    /// Return traffic outside the range, counted; `reported` when it went
    /// into the detail (and so is worth an event).
    OutOfRange { reported: bool },
    /// The same, and `action = "drop"`.
    Drop { reported: bool },
}

/// Counts inbound return traffic by where its local port lies; `end` is
/// the end of packet memory (see [`address`]).
#[inline(always)]
pub fn inspect_inbound(packet: &Packet, end: usize, len: u64) -> Inbound {
    if GUARD_MODE.load() == guard::OFF || !packet.has_l4 {
        return Inbound::Fine;
    }
    let (local_port, remote_port) = (packet.dport, packet.sport);
    let returning = match packet.proto {
        IPPROTO_TCP => packet.tcp_flags & TCP_ACK != 0,
        IPPROTO_UDP => is_remote_service(IPPROTO_UDP, remote_port),
        _ => false,
    };
    if !returning || is_local_service(packet.proto, local_port) {
        return Inbound::Fine;
    }
    if in_range(local_port) {
        count(guard::RETURN_IN_RANGE, len);
        return Inbound::Fine;
    }
    count(guard::RETURN_OUT_OF_RANGE, len);
    let ports = (local_port, remote_port);
    let reported = detail(packet, INGRESS, ports, len, || unsafe {
        address(packet, 0, end)
    });
    if GUARD_MODE.load() == guard::DROP {
        Inbound::Drop { reported }
    } else {
        Inbound::OutOfRange { reported }
    }
}

/// Counts an outbound connection attempt (never drops); true when it left
/// from a port outside the range and went into the detail. `end` as for
/// [`inspect_inbound`]. A SYN-ACK teaches the guard a new listener instead.
#[inline(always)]
pub fn inspect_outbound(packet: &Packet, end: usize, len: u64) -> bool {
    if !packet.has_l4 {
        return false;
    }
    let (local_port, remote_port) = (packet.sport, packet.dport);
    let candidate = match packet.proto {
        IPPROTO_TCP => match packet.tcp_flags & (TCP_SYN | TCP_ACK) {
            TCP_SYN => true,
            TCP_SYN_ACK => {
                learn_service(local_port);
                return false;
            }
            _ => false,
        },
        IPPROTO_UDP => is_remote_service(IPPROTO_UDP, remote_port),
        _ => false,
    };
    if !candidate || is_local_service(packet.proto, local_port) {
        return false;
    }
    // Only candidates pay for the address copy and the flow table.
    let remote = unsafe { address(packet, 1, end) };
    if packet.proto == IPPROTO_UDP && !first_udp_packet(remote, remote_port, local_port) {
        return false;
    }
    if in_range(local_port) {
        count(guard::OUTBOUND_IN_RANGE, len);
        return false;
    }
    count(guard::OUTBOUND_OUT_OF_RANGE, len);
    detail(packet, EGRESS, (local_port, remote_port), len, || remote)
}

/// Whether this out-of-range packet goes into the detail, and with what
/// weight (the packets it stands for: itself and those skipped before it).
/// The clock is read only once the exact ones are spent, and then only
/// when a sample is due: a new window is noticed at most
/// `guard::DETAIL_EVERY` packets late.
#[inline(always)]
fn sample(direction: u8) -> Option<u64> {
    let sampler = GUARD_SAMPLERS.get_ptr_mut(direction as u32)?;
    // SAFETY: this CPU's slot; the program is not preempted by itself.
    unsafe {
        (*sampler).skipped += 1;
        let skipped = (*sampler).skipped;
        if (*sampler).exact_used >= guard::DETAIL_EXACT {
            if skipped < guard::DETAIL_EVERY {
                return None;
            }
            let now = bpf_jiffies64();
            if now.wrapping_sub((*sampler).window_start) >= guard::DETAIL_WINDOW_JIFFIES {
                (*sampler).window_start = now;
                (*sampler).exact_used = 0;
            }
        } else if (*sampler).window_start == 0 {
            // The first window starts with the first packet, not at boot.
            (*sampler).window_start = bpf_jiffies64();
        }
        (*sampler).exact_used += 1;
        (*sampler).skipped = 0;
        Some(skipped)
    }
}

#[inline(always)]
fn in_range(port: u16) -> bool {
    let port = port as u32;
    EPHEMERAL_LOW.load() <= port && port <= EPHEMERAL_HIGH.load()
}

#[inline(always)]
fn is_local_service(proto: u8, port: u16) -> bool {
    let base = if proto == IPPROTO_UDP {
        guard::SERVICE_WORDS_PER_PROTO
    } else {
        0
    };
    SERVICE_PORTS
        .get(base + (port as u32) / 64)
        .is_some_and(|word| word & (1 << (port % 64)) != 0)
}

/// The host answers a connection from `port`: it is listening there, so the
/// port is a service before its client's first ACK arrives, not after the
/// agent's next scan of listening sockets (which then keeps or clears the
/// bit). Not atomic (`BPF_OR` needs 5.12): a bit lost to a concurrent
/// write on another CPU is learnt again from the next SYN-ACK.
#[inline(always)]
fn learn_service(port: u16) {
    if let Some(word) = SERVICE_PORTS.get_ptr_mut((port as u32) / 64) {
        let bit = 1u64 << (port % 64);
        unsafe {
            if *word & bit == 0 {
                *word |= bit;
            }
        }
    }
}

/// Well-known ports and the configured or discovered service ports.
#[inline(always)]
fn is_remote_service(proto: u8, port: u16) -> bool {
    port < guard::WELL_KNOWN_END || is_local_service(proto, port)
}

/// True when no packet of this flow left within `UDP_FLOW_IDLE_NS`.
#[inline(always)]
fn first_udp_packet(addr: [u8; 16], remote_port: u16, local_port: u16) -> bool {
    let flow = UdpFlow {
        addr,
        remote_port,
        local_port,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    match UDP_FLOWS.get_ptr_mut(&flow) {
        Some(seen) => unsafe {
            let first = now - *seen > guard::UDP_FLOW_IDLE_NS;
            *seen = now;
            first
        },
        None => {
            let _ = UDP_FLOWS.insert(&flow, &now, 0);
            true
        }
    }
}

#[inline(always)]
fn count(index: u32, len: u64) {
    if let Some(counter) = GUARD_STATS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len;
        }
    }
}

/// Adds the packet to the per-port and per-peer LRU maps if the sampler
/// picks it, standing for the packets it was picked for; true if so. The
/// remote address is copied only then.
#[inline(always)]
fn detail(
    packet: &Packet,
    direction: u8,
    (local_port, remote_port): (u16, u16),
    len: u64,
    remote: impl FnOnce() -> [u8; 16],
) -> bool {
    let Some(weight) = sample(direction) else {
        return false;
    };
    let port = GuardPort {
        port: local_port,
        proto: packet.proto,
        direction,
    };
    let sample = Counter {
        packets: weight,
        bytes: len * weight,
    };
    bump(&GUARD_PORTS, &port, &sample);
    let peer = GuardPeer {
        addr: remote(),
        port: remote_port,
        proto: packet.proto,
        direction,
    };
    bump(&GUARD_PEERS, &peer, &sample);
    true
}

#[inline(always)]
fn bump<K>(map: &LruPerCpuHashMap<K, Counter>, key: &K, sample: &Counter) {
    match map.get_ptr_mut(key) {
        // SAFETY: this CPU's value.
        Some(counter) => unsafe {
            (*counter).packets += sample.packets;
            (*counter).bytes += sample.bytes;
        },
        None => {
            let _ = map.insert(key, sample, 0);
        }
    }
}

/// The packet's source (`which = 0`) or destination (`1`) address, IPv4
/// addresses mapped into IPv6; all zeros if the bytes are not there.
///
/// Each family re-checks its own bounds against `end`, the end of packet
/// memory, right before reading: the parser proved them, but a verifier
/// older than 6.x reads `v6` back from the stack as unknown and explores the
/// IPv6 copy of an IPv4 packet too, so the proof must sit next to the read.
/// Callers pass `end` (rather than the parser keeping it in every
/// `Packet`) because only the rare guard and event paths need it.
///
/// # Safety
/// `packet.addresses` points into the packet that `end` ends.
#[inline(always)]
pub unsafe fn address(packet: &Packet, which: usize, end: usize) -> [u8; 16] {
    let mut addr = [0u8; 16];
    let base = packet.addresses as usize;
    unsafe {
        if packet.v6 {
            if base + 32 > end {
                return addr;
            }
            let from = packet.addresses.add(which * 16);
            for (i, byte) in addr.iter_mut().enumerate() {
                *byte = *from.add(i);
            }
        } else {
            if base + 8 > end {
                return addr;
            }
            let from = packet.addresses.add(which * 4);
            addr[10] = 0xff;
            addr[11] = 0xff;
            for i in 0..4 {
                addr[12 + i] = *from.add(i);
            }
        }
    }
    addr
}
