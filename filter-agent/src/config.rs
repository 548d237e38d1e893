//! The rules file: TOML in, validated [`Config`] out.
//!
//! Pure logic: no I/O beyond reading the rules file and the set files it
//! names. Every error names the file, line and column it is about.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt, fs,
    net::IpAddr,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use filter_common::{action, mode};
use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;
use toml::{Spanned, Value};

use crate::packet::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, tcp_flag};

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
}

/// Longest rule name: names are kept with the pinned counters (see
/// `state::RuleRecord`), where `stats` and the metrics read them.
pub const MAX_RULE_NAME: usize = 63;

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
}

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// The value the XDP program understands.
    pub fn raw(self) -> u32 {
        match self {
            Action::Allow => action::ALLOW,
            Action::Deny => action::DENY,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
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

/// What to do with non-first IP fragments, which carry no L4 header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fragments {
    /// Match them against rules without port, flag or ICMP conditions.
    #[default]
    MatchL3,
    Allow,
    Deny,
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
    /// Where the rule starts, for lint messages.
    pub location: Location,
}

impl Rule {
    /// True when the rule looks past the IP header (ports, flags, ICMP).
    pub fn needs_l4(&self) -> bool {
        self.sport.is_some()
            || self.dport.is_some()
            || self.tcp_flags.is_some()
            || self.icmp_type.is_some()
            || self.icmp_code.is_some()
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
    #[error("{location}: {message}")]
    Invalid { location: Location, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    filter: RawFilter,
    guard: Option<RawGuard>,
    #[serde(default)]
    sets: BTreeMap<String, Spanned<Value>>,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    default: Action,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    fragments: Fragments,
    max_map_mib: Option<Spanned<u32>>,
    max_set_file_mib: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    #[serde(default)]
    action: GuardAction,
    ephemeral: Option<Spanned<Value>>,
    services: Option<Spanned<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    action: Action,
    proto: Option<Spanned<Value>>,
    src: Option<Spanned<Value>>,
    dst: Option<Spanned<Value>>,
    sport: Option<Spanned<Value>>,
    dport: Option<Spanned<Value>>,
    tcp_flags: Option<Spanned<String>>,
    icmp_type: Option<Spanned<Value>>,
    icmp_code: Option<Spanned<Value>>,
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
    let mib = |value: &Option<Spanned<u32>>, default: u32| match value {
        Some(value) if *value.get_ref() == 0 => {
            Err(source.error(value.span(), "must be at least 1 (MiB)".to_owned()))
        }
        Some(value) => Ok(*value.get_ref()),
        None => Ok(default),
    };
    let max_map_mib = mib(&raw.filter.max_map_mib, DEFAULT_MAX_MAP_MIB)?;
    let max_set_file = u64::from(mib(
        &raw.filter.max_set_file_mib,
        (MAX_FILE_BYTES >> 20) as u32,
    )?) << 20;
    let sets = raw
        .sets
        .iter()
        .map(|(name, value)| {
            let nets = source.set(name, value, max_set_file)?;
            let list = AddressList {
                set: Some(name.clone()),
                nets,
            };
            Ok((name.clone(), Arc::new(list)))
        })
        .collect::<Result<HashMap<_, _>, ConfigError>>()?;
    let mut names = HashSet::new();
    let rules = raw
        .rules
        .iter()
        .map(|rule| {
            let name = &rule.get_ref().name;
            if !names.insert(name.get_ref().clone()) {
                let message = format!("duplicate rule name {:?}", name.get_ref());
                return Err(source.error(name.span(), message));
            }
            source.rule(rule, &sets)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let denies_nd = rules.iter().any(|rule| {
        rule.action == Action::Deny
            && rule.proto == Some(IPPROTO_ICMPV6)
            && rule
                .icmp_type
                .as_ref()
                .is_some_and(|types| types.iter().any(|t| ND_TYPES.contains(t)))
    });
    let guard = match &raw.guard {
        Some(guard) => source.guard(guard)?,
        None => GuardSettings::default(),
    };
    Ok(Config {
        filter: FilterSettings {
            default: raw.filter.default,
            mode: raw.filter.mode,
            fragments: raw.filter.fragments,
            max_map_mib,
        },
        guard,
        rules,
        implicit_nd: (!denies_nd).then(|| Rule {
            name: IMPLICIT_ND_RULE.into(),
            action: Action::Allow,
            proto: Some(IPPROTO_ICMPV6),
            src: None,
            dst: None,
            sport: None,
            dport: None,
            tcp_flags: None,
            icmp_type: Some(ND_TYPES.collect()),
            icmp_code: None,
            location: source.locate(None),
        }),
    })
}

/// The text being validated, for turning spans into locations.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    /// Byte offset of every line's start, for locating in O(log n).
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    fn new(path: &'a Path, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            path,
            text,
            line_starts,
        }
    }

    fn locate(&self, span: Option<Range<usize>>) -> Location {
        let offset = span.map_or(0, |span| span.start.min(self.text.len()));
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let line_start = self.line_starts[line - 1];
        Location {
            file: self.path.to_owned(),
            line,
            column: self.text[line_start..offset].chars().count() + 1,
        }
    }

    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            location: self.locate(Some(span)),
            message: message.into(),
        }
    }

    /// An error about `item` inside the value at `span`: points at the item
    /// itself when it can be found there.
    fn item_error(&self, span: &Range<usize>, item: &Value, message: String) -> ConfigError {
        let needle = item.to_string();
        let within = self.text.get(span.clone()).unwrap_or_default();
        let start = within.find(&needle).map_or(span.start, |i| span.start + i);
        self.error(start..start, message)
    }

    fn rule(
        &self,
        raw: &Spanned<RawRule>,
        sets: &HashMap<String, Arc<AddressList>>,
    ) -> Result<Rule, ConfigError> {
        let span = raw.span();
        let raw = raw.get_ref();
        let name = raw.name.get_ref();
        let named = |message: String| format!("rule {name:?}: {message}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.error(
                raw.name.span(),
                named("names may only use letters, digits, '-', '_' and '.'".into()),
            ));
        }
        if name.len() > MAX_RULE_NAME {
            let message = format!("names are at most {MAX_RULE_NAME} characters");
            return Err(self.error(raw.name.span(), named(message)));
        }
        let proto = raw
            .proto
            .as_ref()
            .map(|proto| self.proto(proto))
            .transpose()?
            .flatten();
        let ports = |field: &Option<Spanned<Value>>, key: &str| {
            let Some(value) = field else { return Ok(None) };
            if proto != Some(IPPROTO_TCP) && proto != Some(IPPROTO_UDP) {
                return Err(self.error(
                    value.span(),
                    named(format!("{key} needs proto = \"tcp\" or \"udp\"")),
                ));
            }
            self.ports(value).map(Some)
        };
        let sport = ports(&raw.sport, "sport")?;
        let dport = ports(&raw.dport, "dport")?;
        let tcp_flags = match &raw.tcp_flags {
            None => None,
            Some(flags) if proto == Some(IPPROTO_TCP) => Some(self.tcp_flags(flags)?),
            Some(flags) => {
                return Err(self.error(
                    flags.span(),
                    named("tcp_flags needs proto = \"tcp\"".into()),
                ));
            }
        };
        let icmp =
            |field: &Option<Spanned<Value>>, key: &str, names: fn(&str, bool) -> Option<u8>| {
                let Some(value) = field else { return Ok(None) };
                let v6 = match proto {
                    Some(IPPROTO_ICMP) => false,
                    Some(IPPROTO_ICMPV6) => true,
                    _ => {
                        let message = format!("{key} needs proto = \"icmp\" or \"icmpv6\"");
                        return Err(self.error(value.span(), named(message)));
                    }
                };
                self.icmp_values(value, key, |text| names(text, v6))
                    .map(Some)
            };
        let icmp_type = icmp(&raw.icmp_type, "icmp_type", icmp_type_by_name)?;
        let icmp_code = icmp(&raw.icmp_code, "icmp_code", |_, _| None)?;
        let src = raw
            .src
            .as_ref()
            .map(|value| self.addresses(value, sets))
            .transpose()?;
        let dst = raw
            .dst
            .as_ref()
            .map(|value| self.addresses(value, sets))
            .transpose()?;
        if let (Some(src_list), Some(dst_list)) = (&src, &dst) {
            let families = |list: &AddressList| {
                (
                    list.nets.iter().any(|net| net.addr().is_ipv4()),
                    list.nets.iter().any(|net| net.addr().is_ipv6()),
                )
            };
            let (src_v4, src_v6) = families(src_list);
            let (dst_v4, dst_v6) = families(dst_list);
            if !(src_v4 && dst_v4 || src_v6 && dst_v6) {
                let span = raw.dst.as_ref().map_or(span.clone(), Spanned::span);
                return Err(self.error(
                    span,
                    named(
                        "src and dst share no address family, so the rule can never match".into(),
                    ),
                ));
            }
        }
        Ok(Rule {
            name: name.clone(),
            action: raw.action,
            proto,
            src,
            dst,
            sport,
            dport,
            tcp_flags,
            icmp_type,
            icmp_code,
            location: self.locate(Some(span)),
        })
    }

    /// `None` for "any".
    fn proto(&self, value: &Spanned<Value>) -> Result<Option<u8>, ConfigError> {
        match value.get_ref() {
            Value::String(name) => match name.as_str() {
                "tcp" => Ok(Some(IPPROTO_TCP)),
                "udp" => Ok(Some(IPPROTO_UDP)),
                "icmp" => Ok(Some(IPPROTO_ICMP)),
                "icmpv6" => Ok(Some(IPPROTO_ICMPV6)),
                "any" => Ok(None),
                other => Err(self.error(
                    value.span(),
                    format!(
                        "unknown proto {other:?}: use tcp, udp, icmp, icmpv6, any or a number 0-255"
                    ),
                )),
            },
            Value::Integer(number) => u8::try_from(*number)
                .map(Some)
                .map_err(|_| self.error(value.span(), format!("proto {number} is not in 0-255"))),
            _ => Err(self.error(value.span(), "proto must be a name or a number 0-255")),
        }
    }

    fn guard(&self, raw: &RawGuard) -> Result<GuardSettings, ConfigError> {
        let ephemeral = match &raw.ephemeral {
            None => DEFAULT_EPHEMERAL,
            Some(value) => match self.ports(value)?.as_slice() {
                [(lo, hi)] if lo < hi => (*lo, *hi),
                _ => {
                    let message = "ephemeral is one port range \"lo-hi\", e.g. \"32768-60999\"";
                    return Err(self.error(value.span(), message));
                }
            },
        };
        let services = match &raw.services {
            Some(value) => self.ports(value)?,
            None => Vec::new(),
        };
        Ok(GuardSettings {
            action: raw.action,
            ephemeral,
            services,
        })
    }

    fn ports(&self, value: &Spanned<Value>) -> Result<Vec<(u16, u16)>, ConfigError> {
        let span = value.span();
        items(value.get_ref())
            .into_iter()
            .map(|item| {
                let bad = |message: String| self.item_error(&span, item, message);
                let port = |text: &str| {
                    text.trim()
                        .parse::<u16>()
                        .map_err(|_| bad(format!("{text:?} is not a port (0-65535)")))
                };
                match item {
                    Value::Integer(number) => u16::try_from(*number)
                        .map(|port| (port, port))
                        .map_err(|_| bad(format!("port {number} is not in 0-65535"))),
                    Value::String(text) => {
                        let (lo, hi) = match text.split_once('-') {
                            Some((lo, hi)) => (port(lo)?, port(hi)?),
                            None => (port(text)?, port(text)?),
                        };
                        if lo > hi {
                            return Err(bad(format!("inverted port range {text:?}")));
                        }
                        Ok((lo, hi))
                    }
                    _ => Err(bad("a port is a number or a \"lo-hi\" string".into())),
                }
            })
            .collect()
    }

    fn tcp_flags(&self, value: &Spanned<String>) -> Result<TcpFlags, ConfigError> {
        let mut flags = TcpFlags { set: 0, clear: 0 };
        for word in value.get_ref().split(',').map(str::trim) {
            let (negated, name) = match word.strip_prefix('!') {
                Some(name) => (true, name.trim()),
                None => (false, word),
            };
            let bit = match name {
                "fin" => tcp_flag::FIN,
                "syn" => tcp_flag::SYN,
                "rst" => tcp_flag::RST,
                "psh" => tcp_flag::PSH,
                "ack" => tcp_flag::ACK,
                "urg" => tcp_flag::URG,
                "ece" => tcp_flag::ECE,
                "cwr" => tcp_flag::CWR,
                _ => {
                    let message = format!(
                        "unknown TCP flag {word:?}: use fin, syn, rst, psh, ack, urg, ece, cwr"
                    );
                    return Err(self.error(value.span(), message));
                }
            };
            if (flags.set | flags.clear) & bit != 0 {
                return Err(self.error(value.span(), format!("TCP flag {name:?} given twice")));
            }
            if negated {
                flags.clear |= bit;
            } else {
                flags.set |= bit;
            }
        }
        Ok(flags)
    }

    fn icmp_values(
        &self,
        value: &Spanned<Value>,
        key: &str,
        by_name: impl Fn(&str) -> Option<u8>,
    ) -> Result<Vec<u8>, ConfigError> {
        let span = value.span();
        items(value.get_ref())
            .into_iter()
            .map(|item| match item {
                Value::Integer(number) => u8::try_from(*number).map_err(|_| {
                    self.item_error(&span, item, format!("{key} {number} is not in 0-255"))
                }),
                Value::String(name) => by_name(name)
                    .ok_or_else(|| self.item_error(&span, item, format!("unknown {key} {name:?}"))),
                _ => Err(self.item_error(&span, item, format!("{key} must be a name or a number"))),
            })
            .collect()
    }

    fn addresses(
        &self,
        value: &Spanned<Value>,
        sets: &HashMap<String, Arc<AddressList>>,
    ) -> Result<Arc<AddressList>, ConfigError> {
        let span = value.span();
        let values = items(value.get_ref());
        // A lone "@set" shares the set's list with every other rule naming it.
        if let [Value::String(text)] = values.as_slice()
            && let Some(name) = text.strip_prefix('@')
        {
            return sets.get(name).cloned().ok_or_else(|| {
                self.item_error(&span, values[0], format!("unknown set \"@{name}\""))
            });
        }
        let mut nets = Vec::new();
        for item in values {
            let Value::String(text) = item else {
                return Err(self.item_error(
                    &span,
                    item,
                    "addresses are strings: CIDR, address or \"@set\"".into(),
                ));
            };
            match text.strip_prefix('@') {
                Some(name) => {
                    let set = sets.get(name).ok_or_else(|| {
                        self.item_error(&span, item, format!("unknown set \"@{name}\""))
                    })?;
                    nets.extend_from_slice(&set.nets);
                }
                None => nets.push(
                    parse_net(text).map_err(|message| self.item_error(&span, item, message))?,
                ),
            }
        }
        Ok(Arc::new(AddressList { set: None, nets }))
    }

    fn set(
        &self,
        name: &str,
        value: &Spanned<Value>,
        max_file: u64,
    ) -> Result<Vec<IpNet>, ConfigError> {
        let span = value.span();
        match value.get_ref() {
            Value::Array(values) => values
                .iter()
                .map(|item| match item {
                    Value::String(text) => {
                        parse_net(text).map_err(|message| self.item_error(&span, item, message))
                    }
                    _ => Err(self.item_error(
                        &span,
                        item,
                        format!("set {name:?}: entries are CIDR strings"),
                    )),
                })
                .collect(),
            Value::Table(table) => {
                let file = match (table.get("file"), table.len()) {
                    (Some(Value::String(file)), 1) => file,
                    _ => {
                        return Err(self.error(
                            span,
                            format!("set {name:?}: use a list or {{ file = \"path\" }}"),
                        ));
                    }
                };
                let path = self.path.parent().unwrap_or(Path::new(".")).join(file);
                // Named at the set, so that the rules file's line is in it.
                let text = read(&path, "set file", max_file).map_err(|err| {
                    let message = match &err {
                        ConfigError::Read { source, .. } => format!("{err}: {source}"),
                        _ => err.to_string(),
                    };
                    self.error(span.clone(), format!("set {name:?}: {message}"))
                })?;
                parse_set_file(&path, &text)
            }
            _ => Err(self.error(
                span,
                format!("set {name:?}: use a list or {{ file = \"path\" }}"),
            )),
        }
    }
}

/// The set files a rules file at `path` names (for watching them), as far
/// as `text` can be read; an unreadable file names none.
pub fn set_files(path: &Path, text: &str) -> Vec<PathBuf> {
    let Ok(raw) = toml::from_str::<toml::Table>(text) else {
        return Vec::new();
    };
    let base = path.parent().unwrap_or(Path::new("."));
    raw.get("sets")
        .and_then(Value::as_table)
        .into_iter()
        .flat_map(|sets| sets.values())
        .filter_map(|set| set.get("file")?.as_str())
        .map(|file| base.join(file))
        .collect()
}

/// One CIDR per line; '#' starts a comment.
fn parse_set_file(path: &Path, text: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut nets = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or_default();
        let entry = content.trim();
        if entry.is_empty() {
            continue;
        }
        let net = parse_net(entry).map_err(|message| ConfigError::Invalid {
            location: Location {
                file: path.to_owned(),
                line: index + 1,
                column: content.find(entry).unwrap_or(0) + 1,
            },
            message,
        })?;
        nets.push(net);
    }
    Ok(nets)
}

/// A CIDR or a bare address (a /32 or /128). Host bits must be clear.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    if !text.contains('/') {
        let addr: IpAddr = text
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR or an address"))?;
        return Ok(IpNet::from(addr));
    }
    let net: IpNet = text
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR or an address"))?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set (did you mean \"{}\"?)",
            net.trunc()
        ));
    }
    Ok(net)
}

/// A scalar as a one-item list; a list as it is.
fn items(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(values) => values.iter().collect(),
        other => vec![other],
    }
}

/// ICMP and ICMPv6 type names.
fn icmp_type_by_name(name: &str, v6: bool) -> Option<u8> {
    let v4_names: &[(&str, u8)] = &[
        ("echo-reply", 0),
        ("destination-unreachable", 3),
        ("source-quench", 4),
        ("redirect", 5),
        ("echo-request", 8),
        ("router-advertisement", 9),
        ("router-solicitation", 10),
        ("time-exceeded", 11),
        ("parameter-problem", 12),
        ("timestamp-request", 13),
        ("timestamp-reply", 14),
    ];
    let v6_names: &[(&str, u8)] = &[
        ("destination-unreachable", 1),
        ("packet-too-big", 2),
        ("time-exceeded", 3),
        ("parameter-problem", 4),
        ("echo-request", 128),
        ("echo-reply", 129),
        ("mld-listener-query", 130),
        ("mld-listener-report", 131),
        ("mld-listener-done", 132),
        ("router-solicitation", 133),
        ("router-advertisement", 134),
        ("neighbor-solicitation", 135),
        ("neighbour-solicitation", 135),
        ("neighbor-advertisement", 136),
        ("neighbour-advertisement", 136),
        ("redirect", 137),
        ("mld2-listener-report", 143),
    ];
    let names = if v6 { v6_names } else { v4_names };
    names
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, number)| *number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Config {
        parse(Path::new("rules.toml"), text).unwrap_or_else(|err| panic!("{err}"))
    }

    fn error_of(text: &str) -> String {
        parse(Path::new("rules.toml"), text)
            .unwrap_err()
            .to_string()
    }

    const HEAD: &str = "[filter]\ndefault = \"deny\"\n";

    fn with_rule(body: &str) -> String {
        format!("{HEAD}[[rule]]\nname = \"r\"\naction = \"allow\"\n{body}\n")
    }

    #[test]
    fn set_file_errors_name_the_rules_file_line() {
        let missing = error_of(&format!(
            "{HEAD}[sets]\nbad = {{ file = \"/nonexistent/x.txt\" }}\n"
        ));
        assert!(
            missing.starts_with(
                "rules.toml:4:7: set \"bad\": cannot read set file /nonexistent/x.txt: No such file"
            ),
            "{missing}"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big.txt"), "10.0.0.0/8\n".repeat(100_000)).unwrap();
        let rules = dir.path().join("rules.toml");
        let text = "[filter]\ndefault = \"deny\"\nmax_set_file_mib = 1\n[sets]\nbig = { file = \"big.txt\" }\n";
        let err = parse(&rules, text).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:5:7: set \"big\": set file", rules.display()))
                && err.ends_with("larger than 1 MiB, the most filter-agent reads (raise [filter] max_set_file_mib)"),
            "{err}"
        );
        let zero = error_of("[filter]\ndefault = \"deny\"\nmax_map_mib = 0\n");
        assert_eq!(zero, "rules.toml:3:15: must be at least 1 (MiB)");
    }

    #[test]
    fn nesting_past_the_parser_limit_is_located() {
        let deep = format!(
            "{HEAD}# a comment. with [dots]\n{}b = 1\n",
            "a.".repeat(300)
        );
        let err = error_of(&deep);
        assert!(err.starts_with("rules.toml:4:1: "), "{err}");
    }

    #[test]
    fn text_that_is_not_utf8_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.toml");
        std::fs::write(&rules, b"[filter]\ndefault = \"d\xffeny\"\n").unwrap();
        let err = load(&rules).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("{}:2:13: rules file is not UTF-8 text", rules.display())
        );
    }

    #[test]
    fn reads_filter_settings() {
        let config =
            parse_ok("[filter]\ndefault = \"deny\"\nmode = \"monitor\"\nfragments = \"allow\"\n");
        assert_eq!(config.filter.default, Action::Deny);
        assert_eq!(config.filter.mode, Mode::Monitor);
        assert_eq!(config.filter.fragments, Fragments::Allow);
        assert!(config.rules.is_empty());
    }

    #[test]
    fn defaults_are_enforce_and_match_l3() {
        let config = parse_ok("[filter]\ndefault = \"allow\"\n");
        assert_eq!(config.filter.mode, Mode::Enforce);
        assert_eq!(config.filter.fragments, Fragments::MatchL3);
    }

    #[test]
    fn reads_a_full_rule() {
        let config = parse_ok(&with_rule(
            "proto = \"tcp\"\nsrc = [\"203.0.113.0/24\", \"198.51.100.7\"]\ndst = \"10.0.0.0/8\"\n\
             sport = \"1024-65535\"\ndport = [22, \"2222\", \"8000-8080\"]\ntcp_flags = \"syn, !ack\"",
        ));
        let rule = &config.rules[0];
        assert_eq!(rule.name, "r");
        assert_eq!(rule.action, Action::Allow);
        assert_eq!(rule.proto, Some(IPPROTO_TCP));
        let src: Vec<String> = rule
            .src
            .as_ref()
            .unwrap()
            .nets
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(src, ["203.0.113.0/24", "198.51.100.7/32"]);
        assert_eq!(rule.sport, Some(vec![(1024, 65535)]));
        assert_eq!(rule.dport, Some(vec![(22, 22), (2222, 2222), (8000, 8080)]));
        assert_eq!(
            rule.tcp_flags,
            Some(TcpFlags {
                set: tcp_flag::SYN,
                clear: tcp_flag::ACK
            })
        );
        assert_eq!(rule.location.line, 3);
        assert!(rule.needs_l4());
    }

    #[test]
    fn neighbour_discovery_passes_unless_denied_by_name() {
        let config = parse_ok(&with_rule("proto = \"icmpv6\""));
        assert_eq!(
            config.implicit_nd.as_ref().unwrap().icmp_type,
            Some(vec![133, 134, 135, 136, 137])
        );
        assert_eq!(config.effective_rules().count(), 2);
        let denied = format!(
            "{HEAD}[[rule]]\nname = \"no-ra\"\naction = \"deny\"\nproto = \"icmpv6\"\nicmp_type = \"router-advertisement\"\n"
        );
        assert!(parse_ok(&denied).implicit_nd.is_none());
    }

    #[test]
    fn icmp_types_by_name_and_number() {
        let config = parse_ok(&with_rule(
            "proto = \"icmpv6\"\nicmp_type = [\"echo-request\", 135, \"neighbour-advertisement\"]\nicmp_code = 0",
        ));
        assert_eq!(config.rules[0].icmp_type, Some(vec![128, 135, 136]));
        assert_eq!(config.rules[0].icmp_code, Some(vec![0]));
        let config = parse_ok(&with_rule(
            "proto = \"icmp\"\nicmp_type = \"destination-unreachable\"",
        ));
        assert_eq!(config.rules[0].icmp_type, Some(vec![3]));
    }

    #[test]
    fn sets_are_shared_and_expand() {
        let config = parse_ok(&format!(
            "{HEAD}[sets]\nbad = [\"198.51.100.0/24\", \"2001:db8:bad::/48\"]\n\
             [[rule]]\nname = \"a\"\naction = \"deny\"\nsrc = \"@bad\"\n\
             [[rule]]\nname = \"b\"\naction = \"deny\"\ndst = \"@bad\"\n\
             [[rule]]\nname = \"c\"\naction = \"deny\"\nsrc = [\"@bad\", \"192.0.2.1\"]\n"
        ));
        let [a, b, c] = &config.rules[..] else {
            panic!()
        };
        assert!(Arc::ptr_eq(
            a.src.as_ref().unwrap(),
            b.dst.as_ref().unwrap()
        ));
        assert_eq!(a.src.as_ref().unwrap().set.as_deref(), Some("bad"));
        assert_eq!(c.src.as_ref().unwrap().nets.len(), 3);
    }

    #[test]
    fn set_files_relative_to_the_rules_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("partners.txt"),
            "# partners\n192.0.2.0/24\n\n  2001:db8::/32 # v6\n",
        )
        .unwrap();
        let rules = dir.path().join("rules.toml");
        fs::write(&rules, format!("{HEAD}[sets]\np = {{ file = \"partners.txt\" }}\n[[rule]]\nname = \"p\"\naction = \"allow\"\nsrc = \"@p\"\n")).unwrap();
        let config = load(&rules).unwrap();
        assert_eq!(config.rules[0].src.as_ref().unwrap().nets.len(), 2);

        fs::write(
            dir.path().join("partners.txt"),
            "192.0.2.0/24\n  192.0.2.300/24\n",
        )
        .unwrap();
        let message = load(&rules).unwrap_err().to_string();
        let expected = format!("{}:2:3: ", dir.path().join("partners.txt").display());
        assert!(message.starts_with(&expected), "{message}");
    }

    /// Every bad input names file:line:col and what is wrong.
    #[test]
    fn bad_input_is_located() {
        let cases: &[(&str, &str, &str)] = &[
            ("colour = 1", "rules.toml:6:1: ", "unknown field `colour`"),
            ("src = \"10.0.0.300/8\"", "rules.toml:6:7: ", "not a CIDR"),
            (
                "src = [\"10.0.0.0/8\", \"10.0.0.1/8\"]",
                "rules.toml:6:22: ",
                "host bits set",
            ),
            (
                "proto = \"tcp\"\ndport = \"90-80\"",
                "rules.toml:7:9: ",
                "inverted port range",
            ),
            (
                "proto = \"tcp\"\ndport = [22, 70000]",
                "rules.toml:7:14: ",
                "not in 0-65535",
            ),
            (
                "proto = \"icmp\"\ndport = 22",
                "rules.toml:7:9: ",
                "dport needs proto",
            ),
            ("sport = 22", "rules.toml:6:9: ", "sport needs proto"),
            (
                "proto = \"udp\"\ntcp_flags = \"syn\"",
                "rules.toml:7:13: ",
                "tcp_flags needs proto = \"tcp\"",
            ),
            (
                "proto = \"tcp\"\ntcp_flags = \"syn,fyn\"",
                "rules.toml:7:13: ",
                "unknown TCP flag \"fyn\"",
            ),
            (
                "proto = \"icmp\"\nicmp_type = [\"echo-request\", \"ping\"]",
                "rules.toml:7:30: ",
                "unknown icmp_type \"ping\"",
            ),
            (
                "proto = \"tcp\"\nicmp_type = 3",
                "rules.toml:7:13: ",
                "icmp_type needs proto",
            ),
            (
                "proto = \"sctp\"",
                "rules.toml:6:9: ",
                "unknown proto \"sctp\"",
            ),
            ("proto = 300", "rules.toml:6:9: ", "not in 0-255"),
            (
                "src = \"@nothere\"",
                "rules.toml:6:7: ",
                "unknown set \"@nothere\"",
            ),
            (
                "src = \"10.0.0.0/8\"\ndst = \"2001:db8::/32\"",
                "rules.toml:7:7: ",
                "share no address family",
            ),
            (
                "action2 = \"allow\"",
                "rules.toml:6:1: ",
                "unknown field `action2`",
            ),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .map(|(body, location, needle)| (body, location, needle, error_of(&with_rule(body))))
            .filter(|(_, location, needle, message)| {
                !message.starts_with(**location) || !message.contains(**needle)
            })
            .map(|(body, _, _, message)| format!("{body}: {message}"))
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn bad_rule_headers_are_located() {
        let message = error_of(&format!(
            "{HEAD}[[rule]]\nname = \"a\"\naction = \"permit\"\n"
        ));
        assert!(message.starts_with("rules.toml:5:10: "), "{message}");
        assert!(message.contains("permit"), "{message}");
        let message = error_of(&format!(
            "{HEAD}[[rule]]\nname = \"a\"\naction = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\n"
        ));
        assert!(
            message.starts_with("rules.toml:7:8: duplicate rule name \"a\""),
            "{message}"
        );
        let message = error_of(&format!(
            "{HEAD}[[rule]]\nname = \"a b\"\naction = \"allow\"\n"
        ));
        assert!(message.starts_with("rules.toml:4:8: "), "{message}");
        let message = error_of(&format!("{HEAD}[sets]\nx = [\"1.2.3.0/33\"]\n"));
        assert!(message.starts_with("rules.toml:4:6: "), "{message}");
    }

    #[test]
    fn unknown_filter_key_and_bad_value() {
        let message = error_of("[filter]\ndefault = \"deny\"\n  colour = \"red\"\n");
        assert!(message.starts_with("rules.toml:3:3: "), "{message}");
        let message = error_of("[filter]\ndefault = \"maybe\"\n");
        assert!(message.starts_with("rules.toml:2:11: "), "{message}");
        assert!(error_of("[filter]\nmode = \"enforce\"\n").contains("default"));
    }

    #[test]
    fn missing_files_name_their_path() {
        let err = load(Path::new("/nonexistent/rules.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/rules.toml"));
        let message = error_of(&format!(
            "{HEAD}[sets]\np = {{ file = \"/nonexistent/p.txt\" }}\n"
        ));
        assert!(
            message.contains("cannot read set file /nonexistent/p.txt"),
            "{message}"
        );
    }

    #[test]
    fn long_rule_names_are_refused() {
        let long = "r".repeat(MAX_RULE_NAME + 1);
        let message = error_of(&format!(
            "{HEAD}[[rule]]\nname = \"{long}\"\naction = \"allow\"\n"
        ));
        assert!(message.starts_with("rules.toml:4:8: "), "{message}");
        assert!(message.contains("at most 63 characters"), "{message}");
        parse_ok(&format!(
            "{HEAD}[[rule]]\nname = \"{}\"\naction = \"allow\"\n",
            &long[1..]
        ));
    }

    #[test]
    fn set_files_are_found_for_watching() {
        let text = format!(
            "{HEAD}[sets]\na = {{ file = \"a.txt\" }}\nb = [\"10.0.0.0/8\"]\nc = {{ file = \"/etc/c.txt\" }}\n"
        );
        assert_eq!(
            set_files(Path::new("/srv/rules.toml"), &text),
            vec![PathBuf::from("/srv/a.txt"), PathBuf::from("/etc/c.txt")]
        );
        assert!(set_files(Path::new("r.toml"), "not toml [").is_empty());
    }

    #[test]
    fn guard_defaults_to_counting_the_linux_range() {
        let config = parse_ok(HEAD);
        assert_eq!(config.guard, GuardSettings::default());
        assert_eq!(config.guard.action, GuardAction::Count);
        assert_eq!(config.guard.ephemeral, (32768, 60999));
    }

    #[test]
    fn reads_guard_settings() {
        let config = parse_ok(&format!(
            "{HEAD}[guard]\nephemeral = \"49152-65535\"\nservices = [22, \"8000-8080\"]\naction = \"drop\"\n"
        ));
        assert_eq!(config.guard.action, GuardAction::Drop);
        assert_eq!(config.guard.ephemeral, (49152, 65535));
        assert_eq!(config.guard.services, vec![(22, 22), (8000, 8080)]);
    }

    #[test]
    fn bad_guard_settings_are_located() {
        let message = error_of(&format!("{HEAD}[guard]\nephemeral = [1, 2]\n"));
        assert!(
            message.starts_with("rules.toml:4:13: ephemeral is one port range"),
            "{message}"
        );
        let message = error_of(&format!("{HEAD}[guard]\nephemeral = \"60999-32768\"\n"));
        assert!(message.contains("inverted port range"), "{message}");
        let message = error_of(&format!("{HEAD}[guard]\naction = \"log\"\n"));
        assert!(message.starts_with("rules.toml:4:10: "), "{message}");
        let message = error_of(&format!("{HEAD}[guard]\nrange = \"1-2\"\n"));
        assert!(message.contains("unknown field `range`"), "{message}");
    }
}
