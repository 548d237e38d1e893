//! The values inside a rule: protocol, ports, TCP flags, ICMP types and
//! codes, and addresses.

use std::{collections::HashMap, sync::Arc};

use filter_common::wire::{PROTOCOL_NAMES, tcp_flag};
use toml::{Spanned, Value};

use super::{AddressList, ConfigError, TcpFlags, sets::parse_net, source::Source};

impl Source<'_> {
    /// `None` for "any".
    pub(super) fn proto(&self, value: &Spanned<Value>) -> Result<Option<u8>, ConfigError> {
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

    pub(super) fn ports(&self, value: &Spanned<Value>) -> Result<Vec<(u16, u16)>, ConfigError> {
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

    pub(super) fn tcp_flags(&self, value: &Spanned<String>) -> Result<TcpFlags, ConfigError> {
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

    pub(super) fn icmp_values(
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

    pub(super) fn addresses(
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

pub(super) fn items(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(values) => values.iter().collect(),
        other => vec![other],
    }
}

/// ICMP and ICMPv6 type names.
pub(super) fn icmp_type_by_name(name: &str, v6: bool) -> Option<u8> {
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
