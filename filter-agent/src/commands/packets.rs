//! `test` and `replay`: packets described or captured, through the real
//! program loaded with the rules (BPF_PROG_TEST_RUN, nothing attached).

use std::{io::Write as _, path::Path};

use anyhow::Context as _;
use filter_common::reason;

use super::{parse_packets, verdict_name};
use crate::{
    host::privileges::{self, Task},
    kernel::loader::{Filter, xdp_action},
    oracle::pcap,
    oracle::reference::{self, Outcome},
    rules::compile,
    rules::config::{self, Action},
};

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
        let counts = (&rule_hits[..], &over_limit[..], &reason_hits[..]);
        let totals = (number, passed, dropped);
        write_summary(&mut out, capture, &rule_set, counts, totals)?;
    }
    out.flush()?;
    Ok(())
}

/// `replay`'s summary: the totals, each rule's hits (and drops over its
/// limit) and the reasons that decided any packet.
fn write_summary(
    out: &mut impl std::io::Write,
    capture: &Path,
    rule_set: &compile::RuleSet,
    (rule_hits, over_limit, reason_hits): (&[u64], &[u64], &[u64]),
    (number, passed, dropped): (u64, u64, u64),
) -> std::io::Result<()> {
    writeln!(
        out,
        "{}: {number} packets, {passed} passed, {dropped} dropped",
        capture.display()
    )?;
    for ((rule, hits), over) in rule_set.rules.iter().zip(rule_hits).zip(over_limit) {
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
        if *hits > 0 {
            writeln!(out, "  {hits:>10}  {}", name.replace('_', " "))?;
        }
    }
    Ok(())
}
