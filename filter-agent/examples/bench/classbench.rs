//! ClassBench's file formats: a filter set (`@src/len dst/len slo : shi
//! dlo : dhi proto/mask [flags/mask]`, one rule per line, first match) and
//! its trace (`src dst sport dport proto ...`, one packet per line,
//! addresses as decimal integers or written out). ClassBench and
//! ClassBench-ng write them, and VPP-ACL publishes acl/fw/ipc sets in them.

use std::{net::IpAddr, sync::Arc};

use anyhow::{Context as _, bail};
use filter_agent::{
    oracle::packet::{self, PacketSpec, Transport, tcp_flag},
    rules::config::{Action, AddressList, Config, GuardSettings, Rule},
};
use ipnet::IpNet;

use crate::workload::{bare_rule, settings};

/// A filter set as rules, every rule allowing and the default allowing
/// too, so that every frame costs the classification alone (ClassBench
/// sets have no actions).
pub(crate) struct FilterSet {
    pub(crate) config: Config,
    /// Lines the rules file cannot say: a protocol mask other than exact
    /// or any, or ports without TCP or UDP.
    pub(crate) skipped: usize,
}

/// Reads a ClassBench filter set.
pub(crate) fn filter_set(text: &str) -> anyhow::Result<FilterSet> {
    let mut rules = Vec::new();
    let mut skipped = 0;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let parsed = rule(line, rules.len()).with_context(|| format!("line {}", index + 1))?;
        match parsed {
            Some(rule) => rules.push(rule),
            None => skipped += 1,
        }
    }
    Ok(FilterSet {
        config: Config {
            filter: settings(Action::Allow),
            guard: GuardSettings::default(),
            rules,
            implicit_nd: None,
            upstream: None,
        },
        skipped,
    })
}

/// One filter line as a rule named after its place; `None` when the rules
/// file cannot say it.
fn rule(line: &str, index: usize) -> anyhow::Result<Option<Rule>> {
    let line = line
        .strip_prefix('@')
        .context("a filter line starts with '@'")?;
    let fields: Vec<&str> = line
        .split_whitespace()
        .filter(|field| *field != ":")
        .collect();
    // A trailing flags field is not read: its bits are not TCP's flags
    // byte, and the classifier's cost is in the other five.
    let [src, dst, slo, shi, dlo, dhi, proto, ..] = fields.as_slice() else {
        bail!("expected 'src dst slo : shi dlo : dhi proto/mask', got {line:?}");
    };
    let sport = ports(slo, shi)?;
    let dport = ports(dlo, dhi)?;
    let proto = match masked(proto)? {
        (_, 0) => None,
        (proto, 0xff) => Some(u8::try_from(proto).context("protocol over 255")?),
        _ => return Ok(None),
    };
    let transport = [Some(packet::IPPROTO_TCP), Some(packet::IPPROTO_UDP)].contains(&proto);
    if (sport.is_some() || dport.is_some()) && !transport {
        return Ok(None);
    }
    let mut rule = bare_rule(&format!("cb{index}"), Action::Allow);
    rule.location.line = index + 1;
    Ok(Some(Rule {
        proto,
        src: prefix(src)?,
        dst: prefix(dst)?,
        sport,
        dport,
        ..rule
    }))
}

/// `value/mask` in hexadecimal (`0x06/0xFF`).
fn masked(field: &str) -> anyhow::Result<(u32, u32)> {
    let (value, mask) = field.split_once('/').context("expected value/mask")?;
    let hex = |text: &str| {
        let digits = text.trim_start_matches("0x").trim_start_matches("0X");
        u32::from_str_radix(digits, 16).with_context(|| format!("not hexadecimal: {text:?}"))
    };
    Ok((hex(value)?, hex(mask)?))
}

/// A port range; the whole range is no condition.
fn ports(low: &str, high: &str) -> anyhow::Result<Option<Vec<(u16, u16)>>> {
    let (low, high): (u16, u16) = (low.parse()?, high.parse()?);
    if low > high {
        bail!("port range {low} : {high} is empty");
    }
    Ok((low, high).ne(&(0, u16::MAX)).then(|| vec![(low, high)]))
}

/// An address prefix; /0 is no condition.
fn prefix(text: &str) -> anyhow::Result<Option<Arc<AddressList>>> {
    let net: IpNet = text
        .parse()
        .with_context(|| format!("not a prefix: {text:?}"))?;
    Ok((net.prefix_len() != 0).then(|| {
        Arc::new(AddressList {
            set: None,
            nets: vec![net.trunc()],
        })
    }))
}

/// Reads a ClassBench trace as frames ([`header_frame`]).
pub(crate) fn trace(text: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut frames = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let frame = trace_frame(&fields).with_context(|| format!("trace line {}", index + 1))?;
        frames.push(frame);
    }
    Ok(frames)
}

fn trace_frame(fields: &[&str]) -> anyhow::Result<Vec<u8>> {
    let [src, dst, sport, dport, proto, ..] = fields else {
        bail!("expected 'src dst sport dport proto', got {fields:?}");
    };
    let (sport, dport, proto): (u16, u16, u8) = (sport.parse()?, dport.parse()?, proto.parse()?);
    Ok(header_frame(
        address(src)?,
        address(dst)?,
        sport,
        dport,
        proto,
    ))
}

/// A trace line's frame: a TCP ACK for TCP (what a flood of
/// established-looking traffic is), a UDP datagram, or eight zero bytes
/// of another protocol.
pub(crate) fn header_frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> Vec<u8> {
    let transport = match proto {
        packet::IPPROTO_TCP => Transport::Tcp {
            sport,
            dport,
            flags: tcp_flag::ACK,
        },
        packet::IPPROTO_UDP => Transport::Udp { sport, dport },
        _ => Transport::Other {
            proto,
            payload: vec![0; 8],
        },
    };
    PacketSpec::new(src, dst, transport).build()
}

/// A trace address: a decimal integer (IPv4) or written out.
fn address(text: &str) -> anyhow::Result<IpAddr> {
    match text.parse::<u32>() {
        Ok(value) => Ok(IpAddr::V4(value.into())),
        Err(_) => text
            .parse()
            .with_context(|| format!("not an address: {text:?}")),
    }
}
