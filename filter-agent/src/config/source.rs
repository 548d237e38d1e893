//! Turning the parsed TOML into validated values, with every error located
//! at its file, line and column.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ops::Range,
    path::Path,
    sync::Arc,
};

use filter_common::wire::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, PROTOCOL_NAMES, tcp_flag,
};
use serde::Deserialize;
use toml::{Spanned, Value};

use super::{
    Action, AddressList, Config, ConfigError, DEFAULT_EPHEMERAL, DEFAULT_MAX_MAP_MIB,
    FilterSettings, Fragments, GuardAction, GuardSettings, IMPLICIT_ND_RULE, Location,
    MAX_FILE_BYTES, MAX_RULE_NAME, Mode, ND_TYPES, Rule, TcpFlags, sets::parse_net,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
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
pub(super) struct RawGuard {
    #[serde(default)]
    action: GuardAction,
    ephemeral: Option<Spanned<Value>>,
    services: Option<Spanned<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
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

/// The text being validated, for turning spans into locations.
pub(super) struct Source<'a> {
    pub(super) path: &'a Path,
    text: &'a str,
    /// Byte offset of every line's start, for locating in O(log n).
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub(super) fn new(path: &'a Path, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            path,
            text,
            line_starts,
        }
    }

    /// The validated form of the whole file.
    pub(super) fn config(&self, raw: &RawConfig) -> Result<Config, ConfigError> {
        let mib = |value: &Option<Spanned<u32>>, default: u32| match value {
            Some(value) if *value.get_ref() == 0 => {
                Err(self.error(value.span(), "must be at least 1 (MiB)".to_owned()))
            }
            Some(value) => Ok(*value.get_ref()),
            None => Ok(default),
        };
        let max_map_mib = mib(&raw.filter.max_map_mib, DEFAULT_MAX_MAP_MIB)?;
        let max_set_file = mib(&raw.filter.max_set_file_mib, (MAX_FILE_BYTES >> 20) as u32)?;
        let sets = raw
            .sets
            .iter()
            .map(|(name, value)| {
                let nets = self.set(name, value, u64::from(max_set_file) << 20)?;
                let set = Some(name.clone());
                Ok((name.clone(), Arc::new(AddressList { set, nets })))
            })
            .collect::<Result<HashMap<_, _>, ConfigError>>()?;
        let rules = self.rules(&raw.rules, &sets)?;
        let guard = match &raw.guard {
            Some(guard) => self.guard(guard)?,
            None => GuardSettings::default(),
        };
        let implicit_nd = (!denies_nd(&rules)).then(|| self.implicit_nd_rule());
        Ok(Config {
            filter: FilterSettings {
                default: raw.filter.default,
                mode: raw.filter.mode,
                fragments: raw.filter.fragments,
                max_map_mib,
            },
            guard,
            rules,
            implicit_nd,
        })
    }

    /// Every rule, in file order; names must be unique.
    fn rules(
        &self,
        raw: &[Spanned<RawRule>],
        sets: &HashMap<String, Arc<AddressList>>,
    ) -> Result<Vec<Rule>, ConfigError> {
        let mut names = HashSet::new();
        raw.iter()
            .map(|rule| {
                let name = &rule.get_ref().name;
                if !names.insert(name.get_ref().clone()) {
                    let message = format!("duplicate rule name {:?}", name.get_ref());
                    return Err(self.error(name.span(), message));
                }
                self.rule(rule, sets)
            })
            .collect()
    }

    /// The rule that lets neighbour discovery through (see
    /// [`IMPLICIT_ND_RULE`]).
    fn implicit_nd_rule(&self) -> Rule {
        Rule {
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
            location: self.locate(None),
        }
    }

    pub(super) fn locate(&self, span: Option<Range<usize>>) -> Location {
        let offset = span.map_or(0, |span| span.start.min(self.text.len()));
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let line_start = self.line_starts[line - 1];
        Location {
            file: self.path.to_owned(),
            line,
            column: self.text[line_start..offset].chars().count() + 1,
        }
    }

    pub(super) fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            location: self.locate(Some(span)),
            message: message.into(),
        }
    }

    /// An error about `item` inside the value at `span`: points at the item
    /// itself when it can be found there.
    pub(super) fn item_error(
        &self,
        span: &Range<usize>,
        item: &Value,
        message: String,
    ) -> ConfigError {
        let needle = item.to_string();
        let within = self.text.get(span.clone()).unwrap_or_default();
        let start = within.find(&needle).map_or(span.start, |i| span.start + i);
        self.error(start..start, message)
    }

    pub(super) fn rule(
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
            Value::String(name) if name == "any" => Ok(None),
            Value::String(name) => match PROTOCOL_NAMES.iter().find(|(known, _)| known == name) {
                Some(&(_, number)) => Ok(Some(number)),
                None => Err(self.error(
                    value.span(),
                    format!(
                        "unknown proto {name:?}: use tcp, udp, icmp, icmpv6, any or a number 0-255"
                    ),
                )),
            },
            Value::Integer(number) => u8::try_from(*number)
                .map(Some)
                .map_err(|_| self.error(value.span(), format!("proto {number} is not in 0-255"))),
            _ => Err(self.error(value.span(), "proto must be a name or a number 0-255")),
        }
    }

    pub(super) fn guard(&self, raw: &RawGuard) -> Result<GuardSettings, ConfigError> {
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
}

/// A scalar as a one-item list; a list as it is.
/// Whether a rule denies some neighbour discovery by name.
fn denies_nd(rules: &[Rule]) -> bool {
    rules.iter().any(|rule| {
        rule.action == Action::Deny
            && rule.proto == Some(IPPROTO_ICMPV6)
            && rule
                .icmp_type
                .as_ref()
                .is_some_and(|types| types.iter().any(|t| ND_TYPES.contains(t)))
    })
}

pub(super) fn items(value: &Value) -> Vec<&Value> {
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
