//! The real filter-agent binary: as a daemon in a namespace, and its
//! read-only commands (`stats`, `guard`, `audit`) with `--json`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use testbed::{Daemon, Netns};

/// A running agent and its rules file; stopped (and the filter detached)
/// on drop.
pub struct Agent {
    binary: PathBuf,
    rules: PathBuf,
    daemon: Option<Daemon>,
}

impl Agent {
    /// Starts `binary` in `netns` on `ifaces` with the rules `text`, and
    /// waits until every interface is attached.
    pub fn start(
        binary: &Path,
        netns: &Netns,
        ifaces: &[&str],
        text: &str,
    ) -> anyhow::Result<Self> {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let rules = std::env::temp_dir().join(format!(
            "fa-scenario-{}-{}.toml",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&rules, text)?;
        let mut agent = Self {
            binary: binary.to_owned(),
            rules,
            daemon: None,
        };
        let mut command = netns.command(binary.to_str().context("a non-UTF-8 path")?);
        command.arg("--detach-on-exit");
        for iface in ifaces {
            command.args(["--iface", iface]);
        }
        command.arg("--rules").arg(&agent.rules);
        let mut daemon = Daemon::start(command, None)?;
        if daemon.wait_for("ready", Duration::from_secs(15)).is_none() {
            bail!("filter-agent did not start: {:?}", daemon.seen());
        }
        agent.daemon = Some(daemon);
        Ok(agent)
    }

    pub fn rules(&self) -> &Path {
        &self.rules
    }

    /// `filter-agent ARGS --json`, parsed.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        json(&self.binary, args)
    }

    /// `filter-agent audit --rules RULES --json` (with Docker's API at
    /// `docker_host`, if given), parsed.
    pub fn audit(&self, docker_host: Option<&str>) -> anyhow::Result<Value> {
        let rules = self.rules.to_str().context("a non-UTF-8 path")?;
        let mut command = Command::new(&self.binary);
        command.args(["audit", "--rules", rules]);
        if let Some(host) = docker_host {
            command.env("DOCKER_HOST", host);
        }
        output_json(command, "audit")
    }

    /// Stops the agent; fails unless it exits cleanly.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let daemon = self.daemon.take().context("not running")?;
        let (status, log) = daemon.stop();
        ensure!(
            status.is_some_and(|status| status.success()),
            "filter-agent exited with {status:?}: {log:?}"
        );
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        drop(self.daemon.take());
        let _ = std::fs::remove_file(&self.rules);
    }
}

/// `BINARY ARGS --json`, parsed.
pub fn json(binary: &Path, args: &[&str]) -> anyhow::Result<Value> {
    let mut command = Command::new(binary);
    command.args(args);
    output_json(command, &args.join(" "))
}

/// `BINARY audit --rules RULES --json` run inside `netns`, so that `netns`
/// is the audit's host: the host's namespace in it.
pub fn audit_host(binary: &Path, netns: &Netns, rules: &Path) -> anyhow::Result<Value> {
    let mut command = netns.command(binary.to_str().context("a non-UTF-8 path")?);
    command.arg("audit").arg("--rules").arg(rules);
    let audit = output_json(command, "audit")?;
    audit["namespaces"]
        .as_array()
        .and_then(|all| all.iter().find(|ns| ns["host"] == true))
        .cloned()
        .context("no host namespace in the audit")
}

/// Exit 1 with a document that counts something `flagged` is an audit's
/// report, not a failure.
fn output_json(mut command: Command, what: &str) -> anyhow::Result<Value> {
    let output = command.arg("--json").output()?;
    let document: Option<Value> = serde_json::from_slice(&output.stdout).ok();
    let flagged = document
        .as_ref()
        .is_some_and(|document| document["flagged"].as_u64().is_some_and(|n| n > 0));
    ensure!(
        output.status.success() || (output.status.code() == Some(1) && flagged),
        "filter-agent {what}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    document.with_context(|| format!("filter-agent {what}: no JSON document"))
}

/// Packets of the rule `name` in `filter-agent stats --json` of `iface`.
pub fn rule_packets(stats: &Value, iface: &str, name: &str) -> anyhow::Result<u64> {
    Ok(rule_counts(stats, iface, name)?.0)
}

/// The packets rule `name` decided, and those its rate limit dropped (0
/// without a limit), from `stats --json`.
pub fn rule_counts(stats: &Value, iface: &str, name: &str) -> anyhow::Result<(u64, u64)> {
    let report = interface(stats, iface)?;
    let rule = report["rules"]
        .as_array()
        .context("no rules in stats")?
        .iter()
        .find(|rule| rule["rule"] == name)
        .with_context(|| format!("no rule {name} on {iface}"))?;
    let passed = rule["packets"].as_u64().context("no packets")?;
    Ok((passed, rule["over_limit"]["packets"].as_u64().unwrap_or(0)))
}

fn interface<'a>(reports: &'a Value, iface: &str) -> anyhow::Result<&'a Value> {
    reports
        .as_array()
        .context("not a list of interfaces")?
        .iter()
        .find(|report| report["iface"] == iface)
        .with_context(|| format!("no report for {iface}"))
}
