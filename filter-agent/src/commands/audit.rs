//! `audit` and `audit --upstream`: every network namespace and NAT rule
//! held to the guard's range or to a cloud ACL. Both print through one
//! renderer, `ok` or `FLAGGED` per line, and follow one exit rule: 0 when
//! nothing is flagged, 1 when something is (the report is printed first).

use std::path::Path;

use anyhow::Context as _;
use serde_json::json;

use super::{Upstream, plural};
use crate::{
    host::audit::{self, FindingKind, Namespace},
    host::privileges::{self, Task},
    rules::config,
    rules::upstream::predict::{self, Decided},
};

/// Where the detail lines of a report are indented to.
const INDENT: &str = "         ";

/// One line of a report, and the lines under it.
struct Row {
    flagged: bool,
    subject: String,
    details: Vec<(&'static str, String)>,
}

/// Prints the report: a summary, then one status line per row.
fn print(summary: &str, rows: &[Row]) {
    println!("{summary}");
    for row in rows {
        let status = if row.flagged { "FLAGGED" } else { "ok" };
        println!("{status:<8} {}", row.subject);
        for (label, text) in &row.details {
            println!("{INDENT}{label}: {text}");
        }
    }
}

/// The exit rule: an error, so exit 1, when anything is `flagged`.
fn verdict(flagged: usize, against: &str) -> anyhow::Result<()> {
    if flagged > 0 {
        anyhow::bail!(
            "{flagged} {} flagged against {against}",
            plural(flagged, "namespace or NAT rule", "namespaces or NAT rules")
        );
    }
    Ok(())
}

fn ports(range: Option<(u16, u16)>) -> String {
    range.map_or("?".to_owned(), |(low, high)| format!("{low}-{high}"))
}

/// `filter-agent audit`: every namespace's ephemeral range and NAT rules.
pub fn audit_range(rules: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let (range, notrack) = match rules {
        Some(rules) => {
            let config = config::load(rules)?;
            (config.guard.ephemeral, config.rules)
        }
        None => (config::DEFAULT_EPHEMERAL, Vec::new()),
    };
    privileges::check(Task::Audit)?;
    let namespaces = audit::run(range, &notrack);
    let flagged = namespaces
        .iter()
        .filter(|ns| !ns.findings.is_empty())
        .count();
    if json {
        let document =
            json!({"range": [range.0, range.1], "flagged": flagged, "namespaces": namespaces});
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        let findings: usize = namespaces.iter().map(|ns| ns.findings.len()).sum();
        let summary = format!(
            "{} network namespaces, {findings} {} against the return range {}-{}",
            namespaces.len(),
            plural(findings, "finding", "findings"),
            range.0,
            range.1
        );
        print(
            &summary,
            &namespaces.iter().map(namespace_row).collect::<Vec<_>>(),
        );
    }
    verdict(
        flagged,
        &format!("the return range {}-{}", range.0, range.1),
    )
}

fn namespace_row(ns: &Namespace) -> Row {
    let mut details = Vec::new();
    if let Some(error) = &ns.error {
        details.push(("note", error.clone()));
    }
    for finding in &ns.findings {
        details.push(("problem", finding.problem.clone()));
        details.push(("fix", finding.fix.clone()));
        details.extend(finding.keep.clone().map(|keep| ("keep", keep)));
        details.extend(finding.alternative.clone().map(|or| ("or", or)));
    }
    Row {
        flagged: !ns.findings.is_empty(),
        subject: format!("ephemeral {:<12} {}", ports(ns.port_range), ns.label()),
        details,
    }
}

/// What an ACL would block of one namespace: its own range, and each NAT
/// rule's.
struct Blocked<'a> {
    ns: &'a Namespace,
    own: Vec<Decided>,
    nat: Vec<(&'a audit::NatRule, Vec<Decided>)>,
}

impl Blocked<'_> {
    fn flagged(&self) -> usize {
        usize::from(!self.own.is_empty())
            + self
                .nat
                .iter()
                .filter(|(_, blocked)| !blocked.is_empty())
                .count()
    }
}

/// `filter-agent audit --upstream`: which ports of every namespace and
/// NAT rule the upstream ACL would drop replies to, with the deciding
/// entries, and the fixes both ways.
pub fn audit_upstream(upstream: &Upstream<'_>, json: bool) -> anyhow::Result<()> {
    let (acl, _, _) = upstream.load()?;
    let allowed = predict::widest_allowed(&acl).with_context(|| {
        format!(
            "{} passes replies to no port from 1024 up: nothing can connect out",
            acl.id
        )
    })?;
    privileges::check(Task::Audit)?;
    // Judged against the range the ACL passes: the fixes in each owner's
    // form come with it.
    let namespaces = audit::run(allowed, &[]);
    let blocked_in = |range: (u16, u16)| predict::blocked(&acl, range);
    let report: Vec<Blocked> = namespaces
        .iter()
        .map(|ns| Blocked {
            ns,
            own: ns.port_range.map(blocked_in).unwrap_or_default(),
            // Masquerade without a port range may use any port from 1024.
            nat: ns
                .nat
                .iter()
                .map(|rule| (rule, blocked_in(rule.ports.unwrap_or((1024, 65535)))))
                .collect(),
        })
        .collect();
    let flagged: usize = report.iter().map(Blocked::flagged).sum();
    let acl_fixes = |blocked: &[Decided]| predict::acl_fixes(&acl, upstream.format, blocked);
    if json {
        let namespaces: Vec<_> = report
            .iter()
            .map(|blocked| blocked_json(blocked, &acl_fixes))
            .collect();
        let document = json!({
            "acl": acl.id, "format": upstream.format.to_string(), "allowed": [allowed.0, allowed.1],
            "flagged": flagged, "namespaces": namespaces,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        let summary = format!(
            "{} network namespaces against the upstream ACL {} ({}): connections (to TCP 443 and \
             UDP 53 of any peer) pass both ways from {}-{} at most; {flagged} flagged",
            namespaces.len(),
            acl.id,
            upstream.format,
            allowed.0,
            allowed.1
        );
        let rows: Vec<Row> = report
            .iter()
            .flat_map(|blocked| blocked_rows(blocked, allowed, &acl_fixes))
            .collect();
        print(&summary, &rows);
    }
    verdict(flagged, &format!("the upstream ACL {}", acl.id))
}

fn blocked_json(
    blocked: &Blocked,
    acl_fixes: &dyn Fn(&[Decided]) -> Vec<String>,
) -> serde_json::Value {
    let Blocked { ns, own, nat } = blocked;
    let fixes: Vec<_> = ns
        .findings
        .iter()
        .filter(|finding| finding.kind == FindingKind::PortRange && !own.is_empty())
        .collect();
    json!({
        "namespace": ns.label(),
        "inode": ns.inode,
        "port_range": ns.port_range,
        "blocked": own,
        "fixes": fixes,
        "acl_fixes": acl_fixes(own),
        "nat": nat.iter().map(|(rule, blocked)| json!({
            "rule": rule.rule, "ports": rule.ports, "blocked": blocked,
            "acl_fixes": acl_fixes(blocked),
        })).collect::<Vec<_>>(),
    })
}

/// The namespace's row, then one per NAT rule.
fn blocked_rows(
    blocked: &Blocked,
    (low, high): (u16, u16),
    acl_fixes: &dyn Fn(&[Decided]) -> Vec<String>,
) -> Vec<Row> {
    let Blocked { ns, own, nat } = blocked;
    let mut details = Vec::new();
    if !own.is_empty() {
        details.push(("blocked", show(own)));
        for finding in ns
            .findings
            .iter()
            .filter(|f| f.kind == FindingKind::PortRange)
        {
            details.push(("fix", finding.fix.clone()));
            details.extend(finding.keep.clone().map(|keep| ("keep", keep)));
        }
        details.extend(acl_fixes(own).into_iter().map(|fix| ("or the ACL", fix)));
    }
    let mut rows = vec![Row {
        flagged: !own.is_empty(),
        subject: format!("ephemeral {:<12} {}", ports(ns.port_range), ns.label()),
        details,
    }];
    for (rule, blocked) in nat {
        let ports = rule
            .ports
            .map_or("no port range: any port from 1024".to_owned(), |(l, h)| {
                format!("{l}-{h}")
            });
        let mut details = Vec::new();
        if !blocked.is_empty() {
            details.push(("blocked", show(blocked)));
            details.push((
                "fix",
                format!(
                    "give it the ports {low}-{high} (iptables `--to-ports {low}-{high}`, nft \
                     `masquerade to :{low}-{high}`)"
                ),
            ));
            details.extend(
                acl_fixes(blocked)
                    .into_iter()
                    .map(|fix| ("or the ACL", fix)),
            );
        }
        rows.push(Row {
            flagged: !blocked.is_empty(),
            subject: format!("NAT {} ({ports}) in {}", rule.rule, ns.label()),
            details,
        });
    }
    rows
}

/// The blocked replies, with the entry that decides each.
fn show(blocked: &[Decided]) -> String {
    blocked
        .iter()
        .map(|b| {
            let entry = b.entry.as_deref().unwrap_or("no entry: the default");
            format!(
                "{} {} {}-{} ({entry})",
                b.direction, b.proto, b.ports.0, b.ports.1
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
