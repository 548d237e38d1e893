//! Types shared by the XDP program and the agent.
//!
//! Everything here crosses the kernel/user boundary through BPF maps or
//! globals, so every type is `#[repr(C)]`, made only of fixed-width integers,
//! and has no implicit padding (checked at compile time below).
#![no_std]

/// A packet and byte count. The kernel keeps one per CPU; readers sum them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    /// Adds another counter (used to sum per-CPU slots).
    pub fn add(&mut self, other: &Counter) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// Numbers of the wire formats: what the program parses, and what the
/// agent's packet builder writes and its reference model reads.
pub mod wire {
    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_IPV6: u16 = 0x86DD;
    pub const ETH_P_ARP: u16 = 0x0806;
    pub const ETH_P_8021Q: u16 = 0x8100;
    pub const ETH_P_8021AD: u16 = 0x88A8;

    pub const IPPROTO_HOPOPTS: u8 = 0;
    pub const IPPROTO_ICMP: u8 = 1;
    pub const IPPROTO_TCP: u8 = 6;
    pub const IPPROTO_UDP: u8 = 17;
    pub const IPPROTO_ROUTING: u8 = 43;
    pub const IPPROTO_FRAGMENT: u8 = 44;
    pub const IPPROTO_ICMPV6: u8 = 58;
    pub const IPPROTO_DSTOPTS: u8 = 60;

    /// The protocols the rules file names, and how it spells them.
    pub const PROTOCOL_NAMES: [(&str, u8); 4] = [
        ("tcp", IPPROTO_TCP),
        ("udp", IPPROTO_UDP),
        ("icmp", IPPROTO_ICMP),
        ("icmpv6", IPPROTO_ICMPV6),
    ];

    /// The fragment offset bits of the IPv4 header's flags/offset field: a
    /// packet with any of them set is a non-first fragment.
    pub const IPV4_FRAGMENT_OFFSET: u16 = 0x1fff;

    /// 802.1Q and 802.1ad: at most an outer and an inner tag.
    pub const MAX_VLAN_TAGS: usize = 2;
    /// Headers walked after the IPv6 header to find the upper layer: five
    /// extension headers and the upper-layer one; a sixth extension header
    /// makes the packet malformed.
    pub const MAX_IPV6_EXT_HEADERS: usize = 6;

    /// TCP flag bits, as in the header's flags byte.
    pub mod tcp_flag {
        pub const FIN: u8 = 0x01;
        pub const SYN: u8 = 0x02;
        pub const RST: u8 = 0x04;
        pub const PSH: u8 = 0x08;
        pub const ACK: u8 = 0x10;
        pub const URG: u8 = 0x20;
        pub const ECE: u8 = 0x40;
        pub const CWR: u8 = 0x80;
    }
}

/// Why a verdict was reached: indices into the `STATS` per-CPU array.
///
/// Every packet the program sees increments exactly one of these.
pub mod reason {
    /// An IP packet matched no rule and the default action is "allow".
    pub const DEFAULT_ALLOW: u32 = 0;
    /// An IP packet matched no rule and the default action is "deny".
    pub const DEFAULT_DENY: u32 = 1;
    /// Not IPv4/IPv6 (ARP, LLDP, ...): always passed.
    pub const NON_IP: u32 = 2;
    /// A truncated or invalid Ethernet/VLAN/IP/L4 header.
    pub const MALFORMED: u32 = 3;
    /// A non-first fragment, passed by `fragments = "allow"`.
    pub const FRAGMENT_ALLOW: u32 = 4;
    /// A non-first fragment, dropped by `fragments = "deny"`.
    pub const FRAGMENT_DENY: u32 = 5;
    /// Return traffic to a port outside the ephemeral range, dropped by the
    /// guard (`[guard] action = "drop"`) before any rule is consulted.
    pub const GUARD_DROP: u32 = 6;
    /// Number of reasons (size of the `STATS` map).
    pub const COUNT: u32 = 7;

    /// Stable names, indexed by reason, used in CLI output and metrics.
    pub const NAMES: [&str; COUNT as usize] = [
        "default_allow",
        "default_deny",
        "non_ip",
        "malformed",
        "fragment_allow",
        "fragment_deny",
        "guard_drop",
    ];
}

mod verdict;
pub use verdict::{DECISION_OVER_LIMIT, DECISION_RULE, Outcome, over_limit_slot, rule_slot};

/// `FRAGMENTS` global: what to do with non-first fragments.
pub mod fragments {
    /// Match rules that have no port, flag or ICMP conditions.
    pub const MATCH_L3: u32 = 0;
    pub const ALLOW: u32 = 1;
    pub const DENY: u32 = 2;
}

/// Rule bitmaps: one bit per rule, in rule order, stored in chunks of
/// `RULES_PER_CHUNK` rules. `summary` has bit `i` set when `words[i]` is
/// non-zero, so the matcher skips empty words.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapChunk {
    pub summary: u64,
    pub words: [u64; WORDS_PER_CHUNK],
}

/// A class's chunks, all in one map value: the matcher looks each field's
/// class up once, however many chunks the rule set has (unused chunks are
/// zero).
pub type ClassBitmaps = [BitmapChunk; MAX_CHUNKS as usize];

pub const WORDS_PER_CHUNK: usize = 64;
pub const RULES_PER_CHUNK: u32 = (WORDS_PER_CHUNK * 64) as u32;
/// Bounds the matcher's loop; the rule capacity is `MAX_CHUNKS * RULES_PER_CHUNK`.
pub const MAX_CHUNKS: u32 = 4;
pub const MAX_RULES: u32 = MAX_CHUNKS * RULES_PER_CHUNK;

/// The words, per chunk, where one rule accepts both a source class of a
/// group and a destination class of another: the per-field summaries miss
/// that, so without it a packet whose fields each match some rule of a word,
/// but no rule all of them, visits that word. Classes are grouped by their
/// number (`class >> PAIR_*_SHIFT`, at most `MAX_PAIR_GROUPS` per field);
/// entry `src_group * PAIR_DST_GROUPS + dst_group`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairSummary {
    pub chunks: [u64; MAX_CHUNKS as usize],
}

pub const MAX_PAIR_GROUPS: u32 = 256;

/// Index into the `PROTO_CLASS` table: protocol, whether the packet has an
/// L4 header (non-first fragments do not) and the TCP flags byte.
pub const fn proto_index(proto: u8, has_l4: bool, tcp_flags: u8) -> u32 {
    ((proto as u32) << 9) | ((has_l4 as u32) << 8) | tcp_flags as u32
}

/// The inverse of [`proto_index`]: (protocol, has L4 header, TCP flags).
pub const fn proto_index_parts(index: u32) -> (u8, bool, u8) {
    ((index >> 9) as u8, index & (1 << 8) != 0, index as u8)
}
pub const PROTO_TABLE_SIZE: u32 = 1 << 17;

/// Address lookup: a compressed multibit trie (Poptrie-like) with a
/// 16-bit root and 8-bit strides.
///
/// Entries (`u32`) live in one flat array, stored in blocks of
/// `ENTRIES_PER_BLOCK`: the IPv4 root first (65,536 entries, indexed by the
/// first two address bytes), then the IPv6 root (from `V6_ROOT`), then the
/// entries of every node. An entry with `CHILD` set names the node for the
/// next byte (`entry & NODE`); otherwise it is the address's class.
///
/// A node stands for 256 entries. Most store each run of equal entries
/// once (an [`AddressNode`]): a set of a million prefixes takes a few bytes
/// per prefix instead of a kilobyte per block. A `WIDE` node is stored
/// whole, as entry block `entry & NODE`: its step is one load, without
/// the rank, for a kilobyte.
pub type EntryBlock = [u32; ENTRIES_PER_BLOCK];
pub const ENTRIES_PER_BLOCK: usize = 256;
pub const ROOT_ENTRIES: u32 = 1 << 16;
pub const V6_ROOT: u32 = ROOT_ENTRIES;
pub const CHILD: u32 = 1 << 31;
pub const WIDE: u32 = 1 << 30;
pub const NODE: u32 = WIDE - 1;

/// One node of the address trie: entry `b` (0-255) of the node is entry
/// `first + rank(b) - 1` of the flat array, where `rank(b)` counts the runs
/// started at or before `b`: `before[b / 8]` plus the bits of
/// `starts[b / 8]` up to `b`. Bytes rather than words, so that the count
/// within one is a table lookup: BPF has no popcount instruction, and a
/// 64-bit one in software cost a third of a lookup step.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressNode {
    /// Bit `b % 8` of byte `b / 8` is set where entry `b` starts a run
    /// (differs from entry `b - 1`); always set for entry 0.
    pub starts: [u8; 32],
    /// Runs started in the bytes of `starts` before each byte.
    pub before: [u8; 32],
    /// Index of the node's first run in the flat entry array.
    pub first: u32,
}

impl AddressNode {
    /// Index in the flat entry array of entry `byte`.
    #[inline(always)]
    pub fn entry_index(&self, byte: usize) -> u32 {
        let slot = byte >> 3;
        let started = self.starts[slot] & (0xff >> (7 - (byte & 7)));
        self.first + self.before[slot] as u32 + BITS_SET[started as usize] as u32 - 1
    }
}

/// The number of bits set in each byte value.
static BITS_SET: [u8; 256] = {
    let mut table = [0; 256];
    let mut value = 0;
    while value < 256 {
        table[value] = (value as u8).count_ones() as u8;
        value += 1;
    }
    table
};

/// Nodes are stored this many to a map value, so that loading a large set
/// takes few syscalls.
pub type NodeBlock = [AddressNode; NODES_PER_BLOCK];
pub const NODES_PER_BLOCK: usize = 16;
pub const PORT_TABLE_SIZE: u32 = 1 << 16;

/// Rule and default actions, as stored in globals and maps.
pub mod action {
    pub const ALLOW: u32 = 0;
    pub const DENY: u32 = 1;
    /// `RULE_ACTIONS` entries hold the action in the low byte and, above
    /// it, the rule's index in `LIMITS` (0: the rule has no rate limit).
    pub const MASK: u32 = 0xff;
    pub const LIMIT_SHIFT: u32 = 8;
}

mod limit;
pub use limit::{
    COARSE_CLOCK_MIN_TOLERANCE_NS, RateLimit, SourceBucket, address_words, source_bucket_count,
    source_hash,
};

/// Filter modes, as stored in the `MODE` global.
pub mod mode {
    /// Drop what the rules deny.
    pub const ENFORCE: u32 = 0;
    /// Evaluate and count everything, drop nothing.
    pub const MONITOR: u32 = 1;
}

/// The ephemeral-port guard: which traffic it counts and where.
pub mod guard {
    /// `GUARD_MODE` global.
    pub const OFF: u32 = 0;
    pub const COUNT: u32 = 1;
    pub const DROP: u32 = 2;

    /// Indices into the `GUARD_STATS` per-CPU array.
    /// Inbound return traffic (TCP with ACK, UDP from a service port) to a
    /// local port inside / outside the ephemeral range.
    pub const RETURN_IN_RANGE: u32 = 0;
    pub const RETURN_OUT_OF_RANGE: u32 = 1;
    /// Outbound connection attempts (TCP SYN, a UDP flow's first packet to
    /// a service port) from a local port inside / outside the range.
    pub const OUTBOUND_IN_RANGE: u32 = 2;
    pub const OUTBOUND_OUT_OF_RANGE: u32 = 3;
    pub const STAT_COUNT: u32 = 4;
    pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
        "return_in_range",
        "return_out_of_range",
        "outbound_in_range",
        "outbound_out_of_range",
    ];

    /// `GuardPort::direction` / `GuardPeer::direction`.
    pub const INGRESS: u8 = 0;
    pub const EGRESS: u8 = 1;

    /// Linux's default `ip_local_port_range`, the guard's default range.
    pub const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);

    /// `SERVICE_PORTS`: one bit per port, TCP words first, then UDP.
    pub const SERVICE_WORDS_PER_PROTO: u32 = 65536 / 64;
    pub const SERVICE_WORDS: u32 = 2 * SERVICE_WORDS_PER_PROTO;
    /// Ports below this are remote services (well-known), whatever the map says.
    pub const WELL_KNOWN_END: u16 = 1024;

    /// Entries in each LRU map of out-of-range ports, peers and UDP flows.
    pub const LRU_ENTRIES: u32 = 4096;
    /// A UDP flow's packet counts as a new attempt after this much silence.
    pub const UDP_FLOW_IDLE_NS: u64 = 30_000_000_000;

    /// Per CPU and direction, the first `DETAIL_EXACT` out-of-range packets
    /// of each window of `DETAIL_WINDOW_JIFFIES` go into the per-port and
    /// per-peer detail one by one; after them, one in `DETAIL_EVERY`, with
    /// that weight. The window is about a second at HZ=250 (Debian's); it
    /// is looked at when a sample is due, once the exact ones are spent.
    pub const DETAIL_EXACT: u64 = 256;
    pub const DETAIL_EVERY: u64 = 256;
    pub const DETAIL_WINDOW_JIFFIES: u64 = 256;
}

/// Per-CPU state of the guard's detail sampling (see
/// `guard::DETAIL_EXACT`), one per direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuardSampler {
    /// In jiffies.
    pub window_start: u64,
    /// Packets recorded one by one in this window.
    pub exact_used: u64,
    /// Out-of-range packets since the last one recorded.
    pub skipped: u64,
}

/// Key of `GUARD_PORTS`: a local port that out-of-range traffic used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuardPort {
    pub port: u16,
    pub proto: u8,
    pub direction: u8,
}

/// An address as the program stores it (IPv4 mapped into IPv6,
/// `::ffff:a.b.c.d`), as the address it is.
pub fn stored_address(bytes: [u8; 16]) -> core::net::IpAddr {
    let v6 = core::net::Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => core::net::IpAddr::V4(v4),
        None => core::net::IpAddr::V6(v6),
    }
}

/// Key of `GUARD_PEERS`: the remote address and port of out-of-range
/// traffic. IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuardPeer {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub direction: u8,
}

/// Key of `UDP_FLOWS`: which outbound UDP flows were seen recently.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpFlow {
    pub addr: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
}

/// Sampled events (drops, and traffic the guard flags) sent to the agent
/// through the `EVENTS` ring buffer.
pub mod event {
    /// `Event::verdict`.
    pub const PASS: u8 = 0;
    pub const DROP: u8 = 1;
    /// Denied in monitor mode: passed, but enforce mode would drop it.
    pub const WOULD_DROP: u8 = 2;
    /// `Event::guard`.
    pub const GUARD_NONE: u8 = 0;
    pub const GUARD_RETURN: u8 = 1;
    pub const GUARD_OUTBOUND: u8 = 2;
    /// `Event::slot` of egress events, which no rule decides.
    pub const NO_SLOT: u32 = u32::MAX;
    /// Default for the `EVENT_RATE` global: events per second and CPU.
    pub const DEFAULT_RATE: u32 = 100;
    pub const RING_BYTES: u32 = 256 * 1024;
}

/// One event. Addresses are IPv4-mapped for IPv4 and zero when the frame
/// had none (malformed, non-IP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The counter slot, as in `LAST_DECISION`: a `reason` or
    /// `DECISION_RULE | rule index`; `event::NO_SLOT` for egress.
    pub slot: u32,
    pub len: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub verdict: u8,
    pub guard: u8,
    pub tcp_flags: u8,
}

/// Per-CPU state of the event rate limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventBudget {
    pub window_start_ns: u64,
    /// Events asked for in this window, sent or refused.
    pub asked: u64,
}

/// The live benchmark's sender (filter-ebpf/src/baseline.rs).
pub mod sender {
    /// Every frame it sends is this long (shorter ones are padded, as
    /// Ethernet pads them on the wire): an IPv6 TCP SYN (74 bytes) fits.
    pub const FRAME_BYTES: usize = 80;
    /// The frames it sends in turn, `FRAME_BYTES` each.
    pub const FRAMES: &str = "FRAMES";
}

/// Names of the maps and globals the agent looks up in the object file.
pub mod names {
    pub const PROGRAM: &str = "filter";
    pub const STATS: &str = "STATS";
    pub const RULE_STATS: &str = "RULE_STATS";
    pub const RULE_ACTIONS: &str = "RULE_ACTIONS";
    pub const SRC_ENTRIES: &str = "SRC_ENTRIES";
    pub const DST_ENTRIES: &str = "DST_ENTRIES";
    pub const SRC_NODES: &str = "SRC_NODES";
    pub const DST_NODES: &str = "DST_NODES";
    pub const PROTO_CLASS: &str = "PROTO_CLASS";
    pub const SPORT_CLASS: &str = "SPORT_CLASS";
    pub const DPORT_CLASS: &str = "DPORT_CLASS";
    pub const SRC_BITS: &str = "SRC_BITS";
    pub const DST_BITS: &str = "DST_BITS";
    pub const PROTO_BITS: &str = "PROTO_BITS";
    pub const SPORT_BITS: &str = "SPORT_BITS";
    pub const DPORT_BITS: &str = "DPORT_BITS";
    pub const DEFAULT_ACTION: &str = "DEFAULT_ACTION";
    pub const MODE: &str = "MODE";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const CHUNKS: &str = "CHUNKS";
    pub const PAIR_SUMMARY: &str = "PAIR_SUMMARY";
    pub const PAIR_SRC_SHIFT: &str = "PAIR_SRC_SHIFT";
    pub const PAIR_DST_SHIFT: &str = "PAIR_DST_SHIFT";
    pub const PAIR_DST_GROUPS: &str = "PAIR_DST_GROUPS";
    pub const TRACE: &str = "TRACE";
    pub const CLOCK: &str = "CLOCK";
    pub const LIMITS: &str = "LIMITS";
    pub const SOURCE_BUCKETS: &str = "SOURCE_BUCKETS";
    pub const SOURCE_SEED: &str = "SOURCE_SEED";
    pub const SOURCE_INDEX_MASK: &str = "SOURCE_INDEX_MASK";
    pub const RULE_OVER_LIMIT: &str = "RULE_OVER_LIMIT";
    pub const LAST_DECISION: &str = "LAST_DECISION";
    pub const EGRESS_PROGRAM: &str = "guard_egress";
    pub const GUARD_MODE: &str = "GUARD_MODE";
    pub const EPHEMERAL_LOW: &str = "EPHEMERAL_LOW";
    pub const EPHEMERAL_HIGH: &str = "EPHEMERAL_HIGH";
    pub const SERVICE_PORTS: &str = "SERVICE_PORTS";
    pub const GUARD_STATS: &str = "GUARD_STATS";
    pub const GUARD_PORTS: &str = "GUARD_PORTS";
    pub const GUARD_PEERS: &str = "GUARD_PEERS";
    pub const UDP_FLOWS: &str = "UDP_FLOWS";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENT_RATE: &str = "EVENT_RATE";
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<AddressNode>() == 68);
const _: () = assert!(core::mem::size_of::<BitmapChunk>() == 8 * (1 + WORDS_PER_CHUNK));
const _: () = assert!(core::mem::size_of::<PairSummary>() == 8 * MAX_CHUNKS as usize);
const _: () = assert!(core::mem::size_of::<GuardPort>() == 4);
const _: () = assert!(core::mem::size_of::<GuardPeer>() == 20);
const _: () = assert!(core::mem::size_of::<UdpFlow>() == 20);
const _: () = assert!(core::mem::size_of::<Event>() == 48);
const _: () = assert!(core::mem::size_of::<EventBudget>() == 16);
const _: () = assert!(core::mem::size_of::<GuardSampler>() == 24);
const _: () = assert!(core::mem::size_of::<RateLimit>() == 64);
const _: () = assert!(core::mem::size_of::<SourceBucket>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `Counter` is `repr(C)`, made of two u64 and has no padding
    // (asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: `BitmapChunk` is `repr(C)` and all u64 (size asserted above).
    unsafe impl aya::Pod for super::BitmapChunk {}
    // SAFETY: `repr(C)` and all u64 (size asserted above).
    unsafe impl aya::Pod for super::PairSummary {}
    // SAFETY: `repr(C)`, integers only, no padding (size asserted above).
    unsafe impl aya::Pod for super::AddressNode {}
    // SAFETY: the guard keys are `repr(C)` integers and byte arrays with no
    // padding (sizes asserted above).
    unsafe impl aya::Pod for super::GuardPort {}
    unsafe impl aya::Pod for super::GuardPeer {}
    unsafe impl aya::Pod for super::UdpFlow {}
    // SAFETY: `repr(C)`, integers and byte arrays, no padding (asserted).
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: `repr(C)`, integers and byte arrays, no padding (asserted).
    unsafe impl aya::Pod for super::RateLimit {}
    unsafe impl aya::Pod for super::SourceBucket {}
}
