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
    /// Number of reasons (size of the `STATS` map).
    pub const COUNT: u32 = 4;

    /// Stable names, indexed by reason, used in CLI output and metrics.
    pub const NAMES: [&str; COUNT as usize] =
        ["default_allow", "default_deny", "non_ip", "malformed"];
}

/// Rule and default actions, as stored in globals and maps.
pub mod action {
    pub const ALLOW: u32 = 0;
    pub const DENY: u32 = 1;
}

/// Filter modes, as stored in the `MODE` global.
pub mod mode {
    /// Drop what the rules deny.
    pub const ENFORCE: u32 = 0;
    /// Evaluate and count everything, drop nothing.
    pub const MONITOR: u32 = 1;
}

/// Names of the maps and globals the agent looks up in the object file.
pub mod names {
    pub const PROGRAM: &str = "filter";
    pub const STATS: &str = "STATS";
    pub const DEFAULT_ACTION: &str = "DEFAULT_ACTION";
    pub const MODE: &str = "MODE";
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `Counter` is `repr(C)`, made of two u64 and has no padding
    // (asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Counter {}
}
