//! A rule's rate limit: `limit = { rate = "1000/s", burst = 100, per =
//! "source", ipv4_prefix = 24, ipv6_prefix = 64 }`.

use std::ops::Range;

use serde::Deserialize;
use toml::{Spanned, Value};

use super::{Action, ConfigError, Limit, source::Source};

/// The largest burst: a bucket's tolerance must fit the program's 64-bit
/// nanosecond clock at the slowest rate.
pub const MAX_BURST: u64 = 1_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimit {
    rate: Spanned<Value>,
    burst: Option<Spanned<i64>>,
    per: Option<Spanned<String>>,
    ipv4_prefix: Option<Spanned<i64>>,
    ipv6_prefix: Option<Spanned<i64>>,
}

/// Units a rate may be given in, with their length in nanoseconds.
const UNITS: [(&str, u64); 6] = [
    ("s", 1_000_000_000),
    ("second", 1_000_000_000),
    ("min", 60_000_000_000),
    ("minute", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("hour", 3_600_000_000_000),
];

impl Source<'_> {
    pub(super) fn limit(
        &self,
        rule: &str,
        action: Action,
        raw: &Spanned<RawLimit>,
    ) -> Result<Limit, ConfigError> {
        let error = |span: Range<usize>, message: String| {
            self.error(span, format!("rule {rule:?}: {message}"))
        };
        if action != Action::Allow {
            let message = "limit needs action = \"allow\" (a deny rule drops every packet)";
            return Err(error(raw.span(), message.into()));
        }
        let raw = raw.get_ref();
        let (packets, per_ns) = self
            .rate(&raw.rate)
            .map_err(|m| error(raw.rate.span(), m))?;
        let burst = match &raw.burst {
            None => default_burst(packets, per_ns),
            Some(burst) => match u64::try_from(*burst.get_ref()) {
                Ok(value @ 1..=MAX_BURST) => value,
                _ => {
                    let message = format!("burst must be 1-{MAX_BURST} packets");
                    return Err(error(burst.span(), message));
                }
            },
        };
        let per_source = match raw.per.as_ref().map(|per| (per.get_ref().as_str(), per)) {
            None | Some(("rule", _)) => false,
            Some(("source", _)) => true,
            Some((other, per)) => {
                let message = format!("per must be \"rule\" or \"source\", not {other:?}");
                return Err(error(per.span(), message));
            }
        };
        let prefix = |value: &Option<Spanned<i64>>, key: &str, default: u8, max: u8| {
            let Some(value) = value else {
                return Ok(default);
            };
            if !per_source {
                let message = format!("{key} needs per = \"source\"");
                return Err(error(value.span(), message));
            }
            match u8::try_from(*value.get_ref()) {
                Ok(len @ 1..) if len <= max => Ok(len),
                _ => Err(error(value.span(), format!("{key} must be 1-{max}"))),
            }
        };
        let ipv4_prefix = prefix(&raw.ipv4_prefix, "ipv4_prefix", 32, 32)?;
        let ipv6_prefix = prefix(&raw.ipv6_prefix, "ipv6_prefix", 64, 128)?;
        Ok(Limit {
            packets,
            per_ns,
            burst,
            per_source: per_source.then_some((ipv4_prefix, ipv6_prefix)),
        })
    }

    /// `"N/unit"`, or a number of packets per second.
    fn rate(&self, value: &Spanned<Value>) -> Result<(u64, u64), String> {
        let usage = "rate is \"N/s\", \"N/min\" or \"N/hour\" (N packets, at least 1)";
        let (count, per_ns) = match value.get_ref() {
            Value::Integer(count) => (*count, UNITS[0].1),
            Value::String(text) => {
                let (count, unit) = text.split_once('/').ok_or(usage)?;
                let per_ns = UNITS
                    .iter()
                    .find(|(name, _)| *name == unit.trim())
                    .map(|&(_, ns)| ns)
                    .ok_or_else(|| format!("unknown unit {:?}: {usage}", unit.trim()))?;
                let count = count.trim().parse::<i64>().map_err(|_| usage)?;
                (count, per_ns)
            }
            _ => return Err(usage.into()),
        };
        let count = u64::try_from(count).ok().filter(|&n| n >= 1).ok_or(usage)?;
        if per_ns / count == 0 {
            return Err("rate is at most 1000000000/s".into());
        }
        Ok((count, per_ns))
    }
}

/// A tenth of a second's worth of packets, at least one.
fn default_burst(packets: u64, per_ns: u64) -> u64 {
    let tenth = u128::from(packets) * 100_000_000 / u128::from(per_ns);
    tenth.clamp(1, u128::from(MAX_BURST)) as u64
}
