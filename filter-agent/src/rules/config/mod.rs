//! The rules file: TOML in, validated [`Config`] out. This module: the
//! validated types, reading and the top level; [`source`] validates each
//! part with its location, [`sets`] reads address sets.
//!
//! Pure logic: no I/O beyond reading the rules file and the set files it
//! names. Every error names the file, line and column it is about.

mod fields;
pub mod geoip;
mod limit;
mod sets;
mod source;

use std::{
    fmt, fs,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use filter_common::mode;
use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

pub use sets::{parse_net, set_files};
use source::{RawConfig, Source};

pub use crate::rules::action::{Action, Fragments};

/// A validated rules file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub filter: FilterSettings,
    pub guard: GuardSettings,
    /// In file order: the first match decides.
    pub rules: Vec<Rule>,
    /// Lets IPv6 neighbour discovery through ahead of every rule, unless a
    /// deny rule names one of its ICMPv6 types.
    pub implicit_nd: Option<Rule>,
    /// The cloud's ACL in front of the host (`[upstream]`), which the
    /// agent's audit holds every namespace to.
    pub upstream: Option<Arc<Upstream>>,
}

/// The `[upstream]` table, with the ACL it names read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub path: PathBuf,
    pub format: crate::rules::upstream::Format,
    pub acl: crate::rules::upstream::Acl,
}

/// Longest rule name: names are kept with the pinned counters (see
/// `kernel::counters::RuleRecord`), where `stats` and the metrics read them.
pub const MAX_RULE_NAME: usize = 63;
/// Prefixes a `notrack` rule may name per field: nftables holds them in
/// the agent's table, and a huge set there is slow to load.
pub const MAX_NOTRACK_PREFIXES: usize = 10_000;

/// Name of the rule that lets neighbour discovery through.
pub const IMPLICIT_ND_RULE: &str = "implicit-ipv6-nd";
/// ICMPv6 router/neighbour solicitation and advertisement, and redirect.
pub const ND_TYPES: std::ops::RangeInclusive<u8> = 133..=137;

impl Config {
    /// The rules in evaluation order, implicit ones included.
    pub fn effective_rules(&self) -> impl Iterator<Item = &Rule> {
        self.implicit_nd.iter().chain(&self.rules)
    }
}

/// The `[filter]` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterSettings {
    /// Action for IP packets that match no rule.
    pub default: Action,
    pub mode: Mode,
    pub fragments: Fragments,
    /// The most memory the compiled rules' maps may take, in MiB.
    pub max_map_mib: u32,
    /// Buckets the per-source rate limits share, all rules together
    /// (rounded up to a power of two).
    pub limit_sources: u32,
}

/// The default of `[filter] limit_sources`: 256 KiB of buckets, which stay
/// in the CPU's caches, so that a flood of new sources costs little more
/// than known ones (docs/rules.md has the trade against sharing).
pub const DEFAULT_LIMIT_SOURCES: u32 = 16_384;
/// The most `limit_sources`: 16M buckets take 256 MiB of kernel memory.
pub const MAX_LIMIT_SOURCES: u32 = 1 << 24;

/// The default of `[filter] max_map_mib`: room for a few million prefixes.
pub const DEFAULT_MAX_MAP_MIB: u32 = 1024;

/// The `[guard]` table: the ephemeral-port guard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardSettings {
    pub action: GuardAction,
    /// The range return traffic is allowed to reach, inclusive.
    pub ephemeral: (u16, u16),
    /// Local service ports (TCP and UDP) besides the discovered listeners;
    /// also counted as remote service ports.
    pub services: Vec<(u16, u16)>,
}

/// Linux's default `ip_local_port_range`.
pub const DEFAULT_EPHEMERAL: (u16, u16) = filter_common::guard::DEFAULT_EPHEMERAL;

impl Default for GuardSettings {
    fn default() -> Self {
        Self {
            action: GuardAction::Count,
            ephemeral: DEFAULT_EPHEMERAL,
            services: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardAction {
    /// No guard programs at all.
    Off,
    /// Count and record out-of-range traffic.
    #[default]
    Count,
    /// Also drop out-of-range return traffic.
    Drop,
}

impl GuardAction {
    pub fn raw(self) -> u32 {
        match self {
            GuardAction::Off => filter_common::guard::OFF,
            GuardAction::Count => filter_common::guard::COUNT,
            GuardAction::Drop => filter_common::guard::DROP,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Monitor,
}

impl Mode {
    /// The value the XDP program understands.
    pub fn raw(self) -> u32 {
        match self {
            Mode::Enforce => mode::ENFORCE,
            Mode::Monitor => mode::MONITOR,
        }
    }
}

/// One `[[rule]]`. `None` conditions match anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    pub proto: Option<u8>,
    pub src: Option<Arc<AddressList>>,
    pub dst: Option<Arc<AddressList>>,
    /// Inclusive port ranges (TCP/UDP only).
    pub sport: Option<Vec<(u16, u16)>>,
    pub dport: Option<Vec<(u16, u16)>>,
    pub tcp_flags: Option<TcpFlags>,
    pub icmp_type: Option<Vec<u8>>,
    pub icmp_code: Option<Vec<u8>>,
    /// Conntrack skips the flows the rule describes, and their replies
    /// (`notrack = true`; tcp or udp only, see [`crate::host::notrack`]).
    pub notrack: bool,
    /// Packets over this rate are dropped (allow rules only).
    pub limit: Option<Limit>,
    /// Where the rule starts, for lint messages.
    pub location: Location,
}

impl Rule {
    /// A rule that matches every packet: the base the other conditions
    /// are set on.
    pub fn matching_all(name: impl Into<String>, action: Action, location: Location) -> Self {
        Rule {
            name: name.into(),
            action,
            proto: None,
            src: None,
            dst: None,
            sport: None,
            dport: None,
            tcp_flags: None,
            icmp_type: None,
            icmp_code: None,
            notrack: false,
            limit: None,
            location,
        }
    }

    /// True when the rule looks past the IP header (ports, flags, ICMP).
    pub fn needs_l4(&self) -> bool {
        self.sport.is_some()
            || self.dport.is_some()
            || self.tcp_flags.is_some()
            || self.icmp_type.is_some()
            || self.icmp_code.is_some()
    }
}

/// A rate limit: `packets` per `per_ns` nanoseconds with bursts of
/// `burst`, for the whole rule or per source prefix (IPv4, IPv6 lengths).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    pub packets: u64,
    pub per_ns: u64,
    pub burst: u64,
    pub per_source: Option<(u8, u8)>,
}

impl Limit {
    /// Nanoseconds between packets at the limit's rate.
    pub fn interval_ns(&self) -> u64 {
        self.per_ns / self.packets
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per_ns {
            60_000_000_000 => "min",
            3_600_000_000_000 => "hour",
            _ => "s",
        };
        write!(f, "{}/{unit} burst {}", self.packets, self.burst)?;
        match self.per_source {
            Some((v4, v6)) => write!(f, " per source /{v4} /{v6}"),
            None => Ok(()),
        }
    }
}

/// Prefixes of a rule's `src` or `dst`; shared by every rule naming the
/// same set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressList {
    /// The set's name when the list came from `@name`.
    pub set: Option<String>,
    pub nets: Vec<IpNet>,
}

/// TCP flags that must be set and that must be clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpFlags {
    pub set: u8,
    pub clear: u8,
}

impl TcpFlags {
    pub fn matches(self, flags: u8) -> bool {
        flags & self.set == self.set && flags & self.clear == 0
    }
}

/// Where in which file something is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {} is not a regular file", path.display())]
    NotRegular { what: &'static str, path: PathBuf },
    #[error(
        "{what} {} is larger than {} MiB, the most filter-agent reads{}",
        path.display(),
        limit >> 20,
        if *what == "set file" { " (raise [filter] max_set_file_mib)" } else { "" }
    )]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        limit: u64,
    },
    /// The message may quote the file's own text: control characters in
    /// it are escaped, so that the error stays one line.
    #[error("{location}: {}", crate::rules::quote::one_line(.message))]
    Invalid { location: Location, message: String },
}

/// The start of the line with the most nesting (brackets, braces and dots
/// of dotted keys, outside strings).
fn deepest_line(text: &str) -> Range<usize> {
    let mut best = (0, 0);
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let mut quoted = false;
        let depth = line
            .chars()
            .filter(|&c| {
                quoted ^= c == '"';
                !quoted && matches!(c, '[' | '{' | '.')
            })
            .count();
        if depth > best.0 {
            best = (depth, start);
        }
        start += line.len();
    }
    best.1..best.1
}

/// Reads and validates the rules file at `path` and the set files it names.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read(path, "rules file", MAX_FILE_BYTES)?;
    parse(path, &text)
}

/// The largest rules file read, and the default largest set file (`[filter]
/// max_set_file_mib`): room for several million prefixes (a line of a set
/// file is about 20 bytes).
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// Reads a rules or set file: only a regular file (after following links;
/// a FIFO would block and a device may never end), opened without blocking,
/// and at most `limit` bytes.
fn read(path: &Path, what: &'static str, limit: u64) -> Result<String, ConfigError> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let error = |source| ConfigError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(error)?;
    if !file.metadata().map_err(error)?.is_file() {
        return Err(ConfigError::NotRegular {
            what,
            path: path.to_owned(),
        });
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(error)?;
    if bytes.len() as u64 > limit {
        return Err(ConfigError::TooLarge {
            what,
            path: path.to_owned(),
            limit,
        });
    }
    String::from_utf8(bytes).map_err(|err| {
        // Located at the first byte that is not UTF-8.
        let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
        let line_start = valid
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |at| at + 1);
        let column = String::from_utf8_lossy(&valid[line_start..])
            .chars()
            .count()
            + 1;
        ConfigError::Invalid {
            location: Location {
                file: path.to_owned(),
                line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
                column,
            },
            message: format!("{what} is not UTF-8 text"),
        }
    })
}

/// Validates rules-file `text` read from `path` (set files are found
/// relative to it).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let source = Source::new(path, text);
    let raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Invalid {
        // Only the recursion limit comes without a place: the most deeply
        // nested line is where to look.
        location: source.locate(err.span().or_else(|| Some(deepest_line(text)))),
        message: err.message().trim().to_owned(),
    })?;
    source.config(&raw)
}

#[cfg(test)]
mod error_tests;
#[cfg(test)]
mod tests;
