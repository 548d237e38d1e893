//! What incidents 1 and 3 share: connections from a namespace's ephemeral
//! range through a stateless filter that allows only part of it, the
//! guard's report of the ports involved, and the audit's fix.

use std::{collections::BTreeSet, net::SocketAddr, process::Command};

use anyhow::{Context as _, ensure};
use serde_json::Value;
use testbed::{Netns, traffic};

use crate::{Agent, say, step};

/// The kernel's default ephemeral range since Linux 4.x.
pub const LINUX_DEFAULT: (u16, u16) = (32768, 60999);

/// Local ports of the connections that were answered and of those that
/// were not, and of every connection made, in order.
#[derive(Debug, Default)]
pub struct Attempts {
    pub answered: BTreeSet<u16>,
    pub failed: BTreeSet<u16>,
    /// One entry per SYN sent, including ports the kernel picked again:
    /// what a counter of outbound attempts on the wire must add up to.
    pub sent_from: Vec<u16>,
}

impl Attempts {
    pub fn total(&self) -> usize {
        self.answered.len() + self.failed.len()
    }

    /// Some connections failed, and exactly those whose local port lies
    /// outside `allowed`: the upstream filter's signature.
    pub fn failed_exactly_outside(&self, allowed: (u16, u16)) -> bool {
        !self.failed.is_empty()
            && self.failed.iter().all(|&port| !within(allowed, port))
            && self.answered.iter().all(|&port| within(allowed, port))
    }

    fn used(&self, port: u16) -> bool {
        self.answered.contains(&port) || self.failed.contains(&port)
    }

    /// Records one `tcp_attempt`: whether it was answered, and its port.
    pub(crate) fn record(&mut self, (answered, port): (bool, u16)) {
        self.sent_from.push(port);
        if answered {
            self.answered.insert(port);
        } else {
            self.failed.insert(port);
        }
    }
}

/// `count` connections from `client` to `server`: first one from each end
/// and quartile of `range` (the client's `ip_local_port_range`), so that
/// every part of it is tried, then from ports the kernel picks (which come
/// in runs of nearby ports).
pub fn connect_many(
    client: &Netns,
    server: SocketAddr,
    range: (u16, u16),
    count: usize,
) -> anyhow::Result<Attempts> {
    let (low, high) = (u32::from(range.0), u32::from(range.1));
    let count = count.max(5);
    // The fixed ports first: the kernel's picks then avoid them.
    let quartiles: Vec<u16> = (0..=4)
        .map(|quarter| (low + (high - low) * quarter / 4) as u16)
        .collect();
    let mut attempts = connect_from(client, server, &quartiles)?;
    // A closed socket leaves no TIME_WAIT behind when the peer closed
    // first, so the kernel may pick one of the ports above again: such a
    // pick is tried again, within a bound, instead of counted twice.
    let mut picks = 0;
    while attempts.total() < count {
        ensure!(
            picks < 2 * count,
            "the kernel picked used local ports {picks} times for {count} connections"
        );
        picks += 1;
        let attempt = traffic::tcp_attempt(client, server, None)?;
        if attempts.used(attempt.1) {
            attempts.sent_from.push(attempt.1);
        } else {
            attempts.record(attempt);
        }
    }
    Ok(attempts)
}

/// One connection from `client` to `server` from each of `ports`.
fn connect_from(client: &Netns, server: SocketAddr, ports: &[u16]) -> anyhow::Result<Attempts> {
    let mut attempts = Attempts::default();
    for &port in ports {
        attempts.record(traffic::tcp_attempt(client, server, Some(port))?);
    }
    Ok(attempts)
}

pub fn within((low, high): (u16, u16), port: u16) -> bool {
    (low..=high).contains(&port)
}

/// The local TCP ports the guard of `iface` recorded out of range in
/// `direction` ("ingress" or "egress").
pub fn guard_ports(agent: &Agent, iface: &str, direction: &str) -> anyhow::Result<BTreeSet<u16>> {
    let reports = agent.json(&["guard", "--top", "1000", "--iface", iface])?;
    let entries = reports[0]["ports"]
        .as_array()
        .context("no ports in the guard report")?;
    Ok(entries
        .iter()
        .filter(|entry| entry["direction"] == direction && entry["proto"] == "tcp")
        .filter_map(|entry| entry["port"].as_u64())
        .map(|port| port as u16)
        .collect())
}

/// The namespace named `name` in an audit document.
pub fn audited<'a>(document: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    document["namespaces"]
        .as_array()
        .context("no namespaces in the audit")?
        .iter()
        .find(|ns| {
            ns["names"]
                .as_array()
                .is_some_and(|names| names.iter().any(|n| n == name))
        })
        .with_context(|| format!("the audit did not find {name}"))
}

/// The first finding of `kind` in an audited namespace.
pub fn finding<'a>(namespace: &'a Value, kind: &'a str) -> anyhow::Result<&'a Value> {
    findings(namespace, kind)
        .next()
        .with_context(|| format!("no {kind} finding in {namespace}"))
}

/// Every finding of `kind` in an audited namespace.
pub fn findings<'a>(namespace: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> {
    namespace["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |finding| finding["kind"] == kind)
}

/// Shows a finding's problem, fix and how to keep it, and runs the fix
/// exactly as printed (as an operator would paste it).
pub fn apply(finding: &Value) -> anyhow::Result<String> {
    let text = |field: &str| finding[field].as_str().map(str::to_owned);
    let fix = text("fix").context("a finding without a fix")?;
    say!("  {fix}");
    for (field, intro) in [("keep", "and to keep it"), ("alternative", "or")] {
        if let Some(value) = text(field) {
            say!("  {intro}: {value}");
        }
    }
    step!("applying the audit's fix as printed");
    let output = Command::new("sh").args(["-c", &fix]).output()?;
    ensure!(
        output.status.success(),
        "{fix}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(fix)
}

/// Shows what `audit` says about `client`'s port range, applies its fix
/// and connects again from the new `range`; fails if any connection still
/// fails. Returns the fix and the new attempts.
pub fn fix_and_retry(
    agent: &Agent,
    docker_host: Option<&str>,
    client: &Netns,
    server: SocketAddr,
    range: (u16, u16),
    count: usize,
) -> anyhow::Result<(String, Attempts)> {
    let document = agent.audit(docker_host)?;
    let namespace = audited(&document, client.name())?;
    let found = &namespace["port_range"];
    say!(
        "`filter-agent audit`: {} has ip_local_port_range {}-{}; fix:",
        client.name(),
        found[0],
        found[1]
    );
    let fix = apply(finding(namespace, "port_range")?)?;
    let after = connect_many(client, server, range, count)?;
    say!(
        "{} connections from {}: {} answered, {} not",
        after.total(),
        client.name(),
        after.answered.len(),
        after.failed.len()
    );
    ensure!(
        after.failed.is_empty(),
        "still failing after the fix: {after:?}"
    );
    Ok((fix, after))
}

/// "1024 5100 40000" (at most 12 ports, then "...").
pub fn list(ports: &BTreeSet<u16>) -> String {
    let mut text: Vec<String> = ports.iter().take(12).map(u16::to_string).collect();
    if ports.len() > 12 {
        text.push(format!("... ({} in all)", ports.len()));
    }
    if text.is_empty() {
        return "none".to_owned();
    }
    text.join(" ")
}
