//! The one-shot subcommands. This module: `check`; [`packets`]: `test`
//! and `replay`; [`upstream`]: `import` and `test --upstream`; [`audit`]:
//! `audit` with or without `--upstream`; [`inspect`]: those that read or
//! remove what a running agent pinned (`stats`, `guard`, `watch`,
//! `detach`); [`trial`]: `try` and `confirm`.

mod audit;
mod inspect;
mod packets;
mod trial;
mod upstream;

pub use audit::{audit_range, audit_upstream};
pub use inspect::{detach, guard, stats, watch};
pub use packets::{replay, test_packets};
pub use trial::{confirm, try_rules};
pub use upstream::{Upstream, import, test_upstream};

use std::path::Path;

use anyhow::Context as _;

use crate::{
    host::privileges::{self, Task},
    host::sessions,
    kernel::loader::xdp_action,
    oracle::packet,
    rules::compile,
    rules::config,
    rules::lint,
};

/// What decides packets: the rules file (if one is named) or a cloud ACL.
pub enum Decider<'a> {
    Rules(Option<&'a Path>),
    Upstream(Upstream<'a>),
}

/// `filter-agent test`, with the rules or with the ACL.
pub fn test(decider: Decider<'_>, packets: &[String]) -> anyhow::Result<()> {
    match decider {
        Decider::Rules(rules) => test_packets(rules.context("no --rules")?, packets),
        Decider::Upstream(acl) => test_upstream(&acl, packets),
    }
}

/// `filter-agent audit`, against the rules' range or the ACL.
pub fn audit(decider: Decider<'_>, json: bool) -> anyhow::Result<()> {
    match decider {
        Decider::Rules(rules) => audit_range(rules, json),
        Decider::Upstream(acl) => audit_upstream(&acl, json),
    }
}

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

fn parse_packets(packets: &[String]) -> anyhow::Result<Vec<packet::PacketSpec>> {
    packets
        .iter()
        .map(|text| {
            packet::parse_description(text)
                .map_err(|err| anyhow::anyhow!("--packet {text:?}: {err}"))
        })
        .collect()
}
