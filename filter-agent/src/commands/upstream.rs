//! `import` and `test --upstream`: a cloud provider's ACL read, turned into
//! a rules file, and asked about packets.

use std::path::Path;

use anyhow::Context as _;
use filter_common::reason;

use super::parse_packets;
use crate::{
    host::privileges::{self, Task},
    kernel::loader::{Filter, xdp_action},
    oracle::reference::Outcome,
    rules::compile,
    rules::config::{self, Action},
    rules::upstream,
};

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
    pub(super) fn load(&self) -> anyhow::Result<(upstream::Acl, String, config::Config)> {
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
            // Imported rules carry no limits; said plainly all the same.
            Outcome::OverLimit(_) => "a rate limit (no cloud ACL has one)".to_owned(),
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
