//! Turning the parsed TOML into validated values, with every error located
//! at its file, line and column.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use filter_common::wire::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use serde::Deserialize;
use toml::{Spanned, Value};

use super::{
    Action, AddressList, Config, ConfigError, DEFAULT_EPHEMERAL, DEFAULT_LIMIT_SOURCES,
    DEFAULT_MAX_MAP_MIB, FilterSettings, Fragments, GuardAction, GuardSettings, IMPLICIT_ND_RULE,
    Location, MAX_FILE_BYTES, MAX_LIMIT_SOURCES, MAX_NOTRACK_PREFIXES, MAX_RULE_NAME, Mode,
    ND_TYPES, Rule, Upstream,
    fields::{icmp_type_by_name, items},
    geoip,
    limit::RawLimit,
};

/// `@country:XX` names the country's set from the GeoIP files.
const COUNTRY_PREFIX: &str = "country:";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    filter: RawFilter,
    guard: Option<RawGuard>,
    upstream: Option<Spanned<RawUpstream>>,
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
    limit_sources: Option<Spanned<u32>>,
    /// The directory of the GeoIP country files (`@country:XX`).
    geoip: Option<Spanned<String>>,
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
pub(super) struct RawUpstream {
    file: Spanned<String>,
    format: Spanned<String>,
    acl: Option<String>,
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
    notrack: Option<Spanned<bool>>,
    limit: Option<Spanned<RawLimit>>,
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
        let limit_sources = match &raw.filter.limit_sources {
            Some(value) if !(1..=MAX_LIMIT_SOURCES).contains(value.get_ref()) => {
                let message = format!("limit_sources must be 1-{MAX_LIMIT_SOURCES}");
                return Err(self.error(value.span(), message));
            }
            Some(value) => *value.get_ref(),
            None => DEFAULT_LIMIT_SOURCES,
        };
        let mut sets = raw
            .sets
            .iter()
            .map(|(name, value)| {
                let nets = self.set(name, value, u64::from(max_set_file) << 20)?;
                let set = Some(name.clone());
                Ok((name.clone(), Arc::new(AddressList { set, nets })))
            })
            .collect::<Result<HashMap<_, _>, ConfigError>>()?;
        let geoip = self.geoip_dir(raw.filter.geoip.as_ref().map(Spanned::get_ref));
        self.country_sets(&raw.rules, &geoip, &mut sets)?;
        let rules = self.rules(&raw.rules, &sets)?;
        let guard = match &raw.guard {
            Some(guard) => self.guard(guard)?,
            None => GuardSettings::default(),
        };
        let implicit_nd = (!denies_nd(&rules)).then(|| self.implicit_nd_rule());
        let upstream = raw
            .upstream
            .as_ref()
            .map(|raw| self.upstream(raw))
            .transpose()?;
        Ok(Config {
            filter: FilterSettings {
                default: raw.filter.default,
                mode: raw.filter.mode,
                fragments: raw.filter.fragments,
                max_map_mib,
                limit_sources,
            },
            guard,
            rules,
            implicit_nd,
            upstream,
        })
    }

    /// Where the GeoIP files are: `[filter] geoip` (relative to the rules
    /// file) or Debian's place for them.
    fn geoip_dir(&self, configured: Option<&String>) -> PathBuf {
        let base = self.path.parent().unwrap_or(Path::new("."));
        base.join(configured.map_or(geoip::DEFAULT_DIR, String::as_str))
    }

    /// Adds a set `country:XX` for every `@country:XX` the rules name,
    /// reading the GeoIP files once, only if any is named.
    fn country_sets(
        &self,
        raw: &[Spanned<RawRule>],
        dir: &Path,
        sets: &mut HashMap<String, Arc<AddressList>>,
    ) -> Result<(), ConfigError> {
        let mut countries = None;
        for rule in raw {
            let rule = rule.get_ref();
            for value in [&rule.src, &rule.dst].into_iter().flatten() {
                let span = value.span();
                for item in items(value.get_ref()) {
                    let Value::String(text) = item else { continue };
                    let Some(name) = text.strip_prefix('@') else {
                        continue;
                    };
                    let Some(code) = name.strip_prefix(COUNTRY_PREFIX) else {
                        continue;
                    };
                    if sets.contains_key(name) {
                        continue;
                    }
                    let error = |message: String| self.item_error(&span, item, message);
                    if countries.is_none() {
                        let read = geoip::Countries::read(dir);
                        countries = Some(read.map_err(|err| error(err.to_string()))?);
                    }
                    let nets = countries.as_ref().and_then(|all| all.get(code));
                    let nets = nets.ok_or_else(|| {
                        error(format!(
                            "unknown country {code:?}: use an ISO 3166 code as the GeoIP \
                             database has it, such as \"DE\""
                        ))
                    })?;
                    let set = Some(name.to_owned());
                    let list = AddressList {
                        set,
                        nets: nets.to_vec(),
                    };
                    sets.insert(name.to_owned(), Arc::new(list));
                }
            }
        }
        Ok(())
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
            proto: Some(IPPROTO_ICMPV6),
            icmp_type: Some(ND_TYPES.collect()),
            ..Rule::matching_all(IMPLICIT_ND_RULE, Action::Allow, self.locate(None))
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
        self.check_rule_name(&raw.name)?;
        let proto = raw
            .proto
            .as_ref()
            .map(|proto| self.proto(proto))
            .transpose()?
            .flatten();
        let needs = |span: Range<usize>, key: &str, wanted: &str| {
            self.error(span, format!("rule {name:?}: {key} needs proto = {wanted}"))
        };
        let ports = |field: &Option<Spanned<Value>>, key: &str| match field {
            None => Ok(None),
            Some(value) if matches!(proto, Some(IPPROTO_TCP | IPPROTO_UDP)) => {
                self.ports(value).map(Some)
            }
            Some(value) => Err(needs(value.span(), key, "\"tcp\" or \"udp\"")),
        };
        let tcp_flags = match &raw.tcp_flags {
            None => None,
            Some(flags) if proto == Some(IPPROTO_TCP) => Some(self.tcp_flags(flags)?),
            Some(flags) => return Err(needs(flags.span(), "tcp_flags", "\"tcp\"")),
        };
        let icmp = |field: &Option<Spanned<Value>>, key: &str, by_name: IcmpNames| {
            let Some(value) = field else { return Ok(None) };
            let v6 = match proto {
                Some(IPPROTO_ICMP) => false,
                Some(IPPROTO_ICMPV6) => true,
                _ => return Err(needs(value.span(), key, "\"icmp\" or \"icmpv6\"")),
            };
            let values = self.icmp_values(value, key, |text| by_name(text, v6))?;
            Ok(Some(values))
        };
        let (src, dst) = self.rule_addresses(raw, sets)?;
        let notrack = match &raw.notrack {
            Some(notrack) if *notrack.get_ref() => {
                let (span, flags) = (notrack.span(), &raw.tcp_flags);
                self.check_notrack(name, span, raw.action, proto, flags, [&src, &dst])?;
                true
            }
            _ => false,
        };
        let limit = raw.limit.as_ref();
        let limit = limit.map(|limit| self.limit(name, raw.action, limit));
        Ok(Rule {
            name: name.clone(),
            action: raw.action,
            proto,
            src,
            dst,
            sport: ports(&raw.sport, "sport")?,
            dport: ports(&raw.dport, "dport")?,
            tcp_flags,
            icmp_type: icmp(&raw.icmp_type, "icmp_type", icmp_type_by_name)?,
            icmp_code: icmp(&raw.icmp_code, "icmp_code", |_, _| None)?,
            notrack,
            limit: limit.transpose()?,
            location: self.locate(Some(span)),
        })
    }

    /// The rule's `src` and `dst`, which must share an address family.
    #[allow(clippy::type_complexity)]
    fn rule_addresses(
        &self,
        raw: &RawRule,
        sets: &HashMap<String, Arc<AddressList>>,
    ) -> Result<(Option<Arc<AddressList>>, Option<Arc<AddressList>>), ConfigError> {
        let addresses = |field: &Option<Spanned<Value>>| {
            let value = field.as_ref();
            value.map(|value| self.addresses(value, sets)).transpose()
        };
        let (src, dst) = (addresses(&raw.src)?, addresses(&raw.dst)?);
        if let (Some(src), Some(dst), Some(value)) = (&src, &dst, &raw.dst)
            && !share_a_family(src, dst)
        {
            let message = "src and dst share no address family, so the rule can never match";
            let name = raw.name.get_ref();
            return Err(self.error(value.span(), format!("rule {name:?}: {message}")));
        }
        Ok((src, dst))
    }

    /// `notrack` is for whole flows that the rule allows, which nftables
    /// can describe: tcp or udp, no TCP flags, a bounded number of prefixes.
    fn check_notrack(
        &self,
        name: &str,
        span: Range<usize>,
        action: Action,
        proto: Option<u8>,
        tcp_flags: &Option<Spanned<String>>,
        addresses: [&Option<Arc<AddressList>>; 2],
    ) -> Result<(), ConfigError> {
        let problem = if action != Action::Allow {
            Some(
                "notrack needs action = \"allow\" (conntrack never sees what XDP drops)".to_owned(),
            )
        } else if !matches!(proto, Some(IPPROTO_TCP | IPPROTO_UDP)) {
            Some("notrack needs proto = \"tcp\" or \"udp\"".to_owned())
        } else if tcp_flags.is_some() {
            Some("notrack applies to whole flows: it cannot go with tcp_flags".to_owned())
        } else {
            addresses.into_iter().flatten().find_map(|list| {
                (list.nets.len() > MAX_NOTRACK_PREFIXES).then(|| {
                    format!(
                        "notrack rules may name at most {MAX_NOTRACK_PREFIXES} prefixes per \
                         field (nftables holds them), not {}",
                        list.nets.len()
                    )
                })
            })
        };
        match problem {
            Some(problem) => Err(self.error(span, format!("rule {name:?}: {problem}"))),
            None => Ok(()),
        }
    }

    /// Letters, digits, '-', '_' and '.', at most [`MAX_RULE_NAME`] of them.
    fn check_rule_name(&self, name: &Spanned<String>) -> Result<(), ConfigError> {
        let text = name.get_ref();
        let message = if text.is_empty()
            || !text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            "names may only use letters, digits, '-', '_' and '.'".to_owned()
        } else if text.len() > MAX_RULE_NAME {
            format!("names are at most {MAX_RULE_NAME} characters")
        } else {
            return Ok(());
        };
        Err(self.error(name.span(), format!("rule {text:?}: {message}")))
    }

    /// The `[upstream]` table: the cloud's ACL, read now so that `check`
    /// and a reload fail on a bad one (located at the key).
    fn upstream(&self, raw: &Spanned<RawUpstream>) -> Result<Arc<Upstream>, ConfigError> {
        let raw = raw.get_ref();
        let format =
            crate::rules::upstream::Format::from_name(raw.format.get_ref()).ok_or_else(|| {
                let message = "format must be aws-nacl, sakura or ibm-vpc";
                self.error(raw.format.span(), message)
            })?;
        let base = self.path.parent().unwrap_or(Path::new("."));
        let path = base.join(raw.file.get_ref());
        let text = super::read(&path, "upstream ACL", MAX_FILE_BYTES)?;
        let acl = crate::rules::upstream::read(format, &text, raw.acl.as_deref())
            .map_err(|err| self.error(raw.file.span(), format!("{}: {err}", path.display())))?;
        Ok(Arc::new(Upstream { path, format, acl }))
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
}

/// A scalar as a one-item list; a list as it is.
/// ICMP or ICMPv6 (the flag) names of types or codes.
type IcmpNames = fn(&str, bool) -> Option<u8>;

/// Whether a packet could match both lists: they share an address family.
fn share_a_family(src: &AddressList, dst: &AddressList) -> bool {
    let has = |list: &AddressList, v4: bool| list.nets.iter().any(|net| net.addr().is_ipv4() == v4);
    (has(src, true) && has(dst, true)) || (has(src, false) && has(dst, false))
}

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
