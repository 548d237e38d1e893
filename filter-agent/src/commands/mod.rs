//! The one-shot subcommands. This module: those that work on a rules file
//! (`check`, `test`, `replay`) and the namespace `audit`; [`inspect`]: those
//! that read or remove what a running agent pinned (`stats`, `guard`,
//! `watch`, `detach`).

mod inspect;
mod trial;

pub use inspect::{detach, guard, stats, watch};
pub use trial::{confirm, try_rules};

use std::{io::Write as _, path::Path};

use crate::{
    host::audit,
    host::privileges::{self, Task},
    host::sessions,
    kernel::loader::{Filter, xdp_action},
    oracle::packet,
    oracle::pcap,
    oracle::reference::{self, Outcome},
    rules::compile,
    rules::config::{self, Action},
    rules::lint,
    rules::upstream,
};
use anyhow::Context as _;
use filter_common::reason;
use serde_json::json;

fn verdict_name(xdp_action: u32) -> &'static str {
    if xdp_action == xdp_action::DROP {
        "drop"
    } else {
        "pass"
    }
}

pub fn check(rules: &Path, live: bool) -> anyhow::Result<()> {
    let config = config::load(rules)?;
    let rule_set = compile::compile(&config)?;
    if live {
        privileges::check(Task::TestRun)?;
        let cut = sessions::cut_by(&rule_set, &sessions::established())
            .context("loading the XDP program")?;
        for session in &cut {
            println!("{session}");
        }
        if !cut.is_empty() {
            anyhow::bail!(
                "{}: the rules would cut {} established TCP {} of this host",
                rules.display(),
                cut.len(),
                plural(cut.len(), "session", "sessions")
            );
        }
    }
    let warnings = lint::lint(&config);
    for warning in &warnings {
        println!("{warning}");
    }
    println!(
        "{}: ok ({} {}, default {}, {} {}, {:.1} MiB of maps)",
        rules.display(),
        config.rules.len(),
        plural(config.rules.len(), "rule", "rules"),
        config.filter.default.name(),
        warnings.len(),
        plural(warnings.len(), "warning", "warnings"),
        rule_set.map_bytes() as f64 / f64::from(1 << 20),
    );
    Ok(())
}

fn plural(count: usize, one: &'static str, many: &'static str) -> &'static str {
    if count == 1 { one } else { many }
}

/// `filter-agent test`: each packet through the real program, not attached.
pub fn test_packets(rules: &Path, packets: &[String]) -> anyhow::Result<()> {
    let config = config::load(rules)?;
    let specs = parse_packets(packets)?;
    let rule_set = compile::compile(&config)?;
    privileges::check(Task::TestRun)?;
    let filter = Filter::load_traced(&rule_set).context("loading the XDP program")?;
    let mut limited = false;
    for (text, spec) in packets.iter().zip(specs) {
        let (xdp_action, outcome) = filter.trace_frame(&spec.build())?;
        let verdict = verdict_name(xdp_action);
        let decided = match outcome {
            Outcome::Rule(index) | Outcome::OverLimit(index) => {
                let rule = &rule_set.rules[index];
                let limit = rule.limit.map_or(String::new(), |limit| {
                    limited = true;
                    format!(", limit {limit}")
                });
                let over = if matches!(outcome, Outcome::OverLimit(_)) {
                    " over its limit"
                } else {
                    ""
                };
                format!("rule {:?} ({}{limit}){over}", rule.name, rule.action.name())
            }
            Outcome::Reason(why) => reason::NAMES[why as usize].replace('_', " "),
        };
        let would_drop =
            reference::action_of(outcome, &rule_set.rules, |rule| rule.action) == Action::Deny;
        let note = if config.filter.mode == config::Mode::Monitor && would_drop {
            " (monitor mode: enforce would drop)"
        } else {
            ""
        };
        println!("{text}: {verdict} by {decided}{note}");
    }
    if limited {
        println!(
            "(rate limits: the packets of one test arrive at the same instant, in order, \
             so a limited rule passes its burst and drops the rest as over its limit)"
        );
    }
    Ok(())
}

/// One line of `replay --json`.
#[derive(serde::Serialize)]
struct ReplayedPacket<'a> {
    packet: u64,
    /// What the program returned: "pass" or "drop".
    verdict: &'static str,
    /// What enforce mode does: "allow" or "deny" (differs from the verdict
    /// in monitor mode).
    action: &'static str,
    /// The deciding rule, or null when no rule decided.
    rule: Option<&'a str>,
    /// "rule", "over_limit" (the rule's rate limit dropped it), or why no
    /// rule decided: "default_deny", "malformed", ...
    reason: &'static str,
}

/// `filter-agent replay`: every packet of a capture through the program,
/// at the capture's pace as far as rate limits are concerned.
pub fn replay(rules: &Path, capture: &Path, json: bool) -> anyhow::Result<()> {
    let config = config::load(rules)?;
    let rule_set = compile::compile(&config)?;
    privileges::check(Task::TestRun)?;
    let mut filter = Filter::load_traced(&rule_set).context("loading the XDP program")?;
    let mut rule_hits = vec![0u64; rule_set.rules.len()];
    let mut over_limit = vec![0u64; rule_set.rules.len()];
    let mut reason_hits = [0u64; reason::COUNT as usize];
    let (mut passed, mut dropped, mut number) = (0u64, 0u64, 0u64);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    pcap::for_each_frame(capture, |time, frame| -> anyhow::Result<()> {
        number += 1;
        let clock = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
        let (xdp_action, outcome) = filter.trace_frame_at(frame, clock)?;
        let verdict = verdict_name(xdp_action);
        if xdp_action == xdp_action::DROP {
            dropped += 1;
        } else {
            passed += 1;
        }
        let action = reference::action_of(outcome, &rule_set.rules, |rule| rule.action).name();
        let (rule, reason) = match outcome {
            Outcome::Rule(index) => {
                rule_hits[index] += 1;
                (Some(rule_set.rules[index].name.as_str()), "rule")
            }
            Outcome::OverLimit(index) => {
                over_limit[index] += 1;
                (Some(rule_set.rules[index].name.as_str()), "over_limit")
            }
            Outcome::Reason(why) => {
                reason_hits[why as usize] += 1;
                (None, reason::NAMES[why as usize])
            }
        };
        if json {
            let line = ReplayedPacket {
                packet: number,
                verdict,
                action,
                rule,
                reason,
            };
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
        }
        Ok(())
    })?;
    if !json {
        writeln!(
            out,
            "{}: {number} packets, {passed} passed, {dropped} dropped",
            capture.display()
        )?;
        for ((rule, hits), over) in rule_set.rules.iter().zip(&rule_hits).zip(&over_limit) {
            writeln!(
                out,
                "  {hits:>10}  rule {:?} ({})",
                rule.name,
                rule.action.name()
            )?;
            if let Some(limit) = rule.limit {
                writeln!(out, "  {over:>10}  over its limit ({limit})")?;
            }
        }
        for (name, hits) in reason::NAMES.iter().zip(reason_hits) {
            if hits > 0 {
                writeln!(out, "  {hits:>10}  {}", name.replace('_', " "))?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// An upstream ACL file and the part of it asked about.
pub struct Upstream<'a> {
    pub file: &'a Path,
    pub format: upstream::Format,
    /// Which ACL of the file, when it holds several.
    pub acl: Option<&'a str>,
    pub direction: upstream::Direction,
}

impl Upstream<'_> {
    /// The ACL, and its rules file for the direction (validated).
    fn load(&self) -> anyhow::Result<(upstream::Acl, String, config::Config)> {
        let file = self.file;
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let acl = upstream::read(self.format, &text, self.acl)
            .with_context(|| file.display().to_string())?;
        let rules = upstream::rules_toml(&acl, self.direction)?;
        let config = config::parse(Path::new("imported.toml"), &rules)?;
        Ok((acl, rules, config))
    }
}

/// `filter-agent import`: an upstream ACL as a rules file for one
/// direction, checked as `check` would before it is written.
pub fn import(upstream: &Upstream<'_>, output: Option<&Path>) -> anyhow::Result<()> {
    let (_, rules, config) = upstream.load()?;
    compile::compile(&config)?;
    match output {
        Some(path) => std::fs::write(path, rules)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{rules}"),
    }
    Ok(())
}

/// `filter-agent test --upstream`: would the cloud's ACL pass each packet,
/// and which entry decides? The ACL runs, imported, in the real program.
pub fn test_upstream(upstream: &Upstream<'_>, packets: &[String]) -> anyhow::Result<()> {
    let specs = parse_packets(packets)?;
    let (acl, _, config) = upstream.load()?;
    let rule_set = compile::compile(&config)?;
    privileges::check(Task::TestRun)?;
    let filter = Filter::load_traced(&rule_set).context("loading the XDP program")?;
    let labels: Vec<&str> = acl
        .entries
        .iter()
        .filter(|entry| entry.direction == upstream.direction)
        .map(|entry| entry.label.as_str())
        .collect();
    let default = if acl.default == Action::Allow {
        "passes"
    } else {
        "drops"
    };
    for (text, spec) in packets.iter().zip(specs) {
        let (xdp_action, outcome) = filter.trace_frame(&spec.build())?;
        let verdict = if xdp_action == xdp_action::DROP {
            "drops"
        } else {
            "passes"
        };
        // The rules are the entries in order, after the implicit ones.
        let implicit = rule_set.rules.len() - labels.len();
        let decided = match outcome {
            Outcome::Rule(index) if index >= implicit => {
                format!("entry {}", labels[index - implicit])
            }
            Outcome::Rule(_) => "IPv6 neighbour discovery, which no cloud ACL sees".to_owned(),
            Outcome::Reason(reason::FRAGMENT_ALLOW | reason::FRAGMENT_DENY) => {
                "its fragment entry (a non-first fragment)".to_owned()
            }
            Outcome::Reason(_) => format!("no entry matches: its default {default} it"),
            Outcome::OverLimit(_) => unreachable!("imported rules have no limits"),
        };
        println!(
            "{text}: {} {verdict} it ({} {}): {decided}",
            acl.id,
            upstream.format,
            upstream.direction.name()
        );
    }
    Ok(())
}

fn parse_packets(packets: &[String]) -> anyhow::Result<Vec<packet::PacketSpec>> {
    packets
        .iter()
        .map(|text| {
            packet::parse_description(text)
                .map_err(|err| anyhow::anyhow!("--packet {text:?}: {err}"))
        })
        .collect()
}

/// `filter-agent audit --upstream`: which ports of every namespace and
/// NAT rule the upstream ACL would drop replies to, with the deciding
/// entries, and the fixes both ways. Fails (exit 1) when any would.
pub fn audit_upstream(upstream: &Upstream<'_>, json: bool) -> anyhow::Result<()> {
    use upstream::predict;
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
    let mut flagged = 0;
    let mut report = Vec::new();
    for ns in &namespaces {
        let own = ns.port_range.map(blocked_in).unwrap_or_default();
        let nat: Vec<_> = ns
            .nat
            .iter()
            // Masquerade without a port range may use any port from 1024.
            .map(|rule| (rule, blocked_in(rule.ports.unwrap_or((1024, 65535)))))
            .collect();
        let flagged_nat = nat
            .iter()
            .filter(|(_, blocked)| !blocked.is_empty())
            .count();
        flagged += usize::from(!own.is_empty()) + flagged_nat;
        report.push((ns, own, nat));
    }
    let acl_fixes =
        |blocked: &[predict::Decided]| predict::acl_fixes(&acl, upstream.format, blocked);
    if json {
        let namespaces: Vec<_> = report
            .iter()
            .map(|(ns, own, nat)| {
                json!({
                    "namespace": ns.label(),
                    "inode": ns.inode,
                    "port_range": ns.port_range,
                    "blocked": own,
                    "fixes": ns.findings.iter().filter(|f| f.kind == audit::FindingKind::PortRange && !own.is_empty()).collect::<Vec<_>>(),
                    "acl_fixes": acl_fixes(own),
                    "nat": nat.iter().map(|(rule, blocked)| json!({
                        "rule": rule.rule, "ports": rule.ports, "blocked": blocked,
                    "acl_fixes": acl_fixes(blocked),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let document = json!({
            "acl": acl.id, "format": upstream.format.to_string(), "allowed": [allowed.0, allowed.1],
            "flagged": flagged, "namespaces": namespaces,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        println!(
            "{} network namespaces against the upstream ACL {} ({}): connections (to TCP 443 and \
             UDP 53 of any peer) pass both ways from {}-{} at most; {flagged} flagged",
            namespaces.len(),
            acl.id,
            upstream.format,
            allowed.0,
            allowed.1
        );
        let show = |blocked: &[predict::Decided]| {
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
        };
        for (ns, own, nat) in &report {
            let ports = ns
                .port_range
                .map_or("?".to_owned(), |(low, high)| format!("{low}-{high}"));
            let status = if own.is_empty() { "OK" } else { "FLAGGED" };
            println!("{status:<8} ephemeral {ports:<12} {}", ns.label());
            if !own.is_empty() {
                println!("         blocked: {}", show(own));
                for finding in ns
                    .findings
                    .iter()
                    .filter(|f| f.kind == audit::FindingKind::PortRange)
                {
                    println!("         fix: {}", finding.fix);
                    if let Some(keep) = &finding.keep {
                        println!("         keep: {keep}");
                    }
                }
                for fix in acl_fixes(own) {
                    println!("         or the ACL: {fix}");
                }
            }
            for (rule, blocked) in nat {
                let ports = rule
                    .ports
                    .map_or("no port range: any port from 1024".to_owned(), |(l, h)| {
                        format!("{l}-{h}")
                    });
                if blocked.is_empty() {
                    println!("OK       NAT {} ({ports}) in {}", rule.rule, ns.label());
                    continue;
                }
                println!("FLAGGED  NAT {} ({ports}) in {}", rule.rule, ns.label());
                println!("         blocked: {}", show(blocked));
                println!(
                    "         fix: give it the ports {}-{} (iptables `--to-ports {}-{}`, nft `masquerade to :{}-{}`)",
                    allowed.0, allowed.1, allowed.0, allowed.1, allowed.0, allowed.1
                );
                for fix in acl_fixes(blocked) {
                    println!("         or the ACL: {fix}");
                }
            }
        }
    }
    if flagged > 0 {
        anyhow::bail!(
            "the upstream ACL {} would drop connections of {flagged} namespaces or NAT rules",
            acl.id
        );
    }
    Ok(())
}

/// `filter-agent audit`: every namespace's ephemeral range and NAT rules.
pub fn audit(rules: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let (range, notrack) = match rules {
        Some(rules) => {
            let config = config::load(rules)?;
            (config.guard.ephemeral, config.rules)
        }
        None => (config::DEFAULT_EPHEMERAL, Vec::new()),
    };
    privileges::check(Task::Audit)?;
    let namespaces = audit::run(range, &notrack);
    if json {
        let document = json!({"range": [range.0, range.1], "namespaces": namespaces});
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    let findings: usize = namespaces.iter().map(|ns| ns.findings.len()).sum();
    println!(
        "{} network namespaces, {findings} {} against the return range {}-{}",
        namespaces.len(),
        plural(findings, "finding", "findings"),
        range.0,
        range.1
    );
    for ns in &namespaces {
        let ports = ns
            .port_range
            .map_or("?".to_owned(), |(low, high)| format!("{low}-{high}"));
        let status = if ns.findings.is_empty() {
            "ok"
        } else {
            "FLAGGED"
        };
        println!("{status:<8} ephemeral {ports:<12} {}", ns.label());
        if let Some(error) = &ns.error {
            println!("         note: {error}");
        }
        for finding in &ns.findings {
            println!("         problem: {}", finding.problem);
            println!("         fix: {}", finding.fix);
            if let Some(keep) = &finding.keep {
                println!("         keep: {keep}");
            }
            if let Some(alternative) = &finding.alternative {
                println!("         or: {alternative}");
            }
        }
    }
    Ok(())
}
