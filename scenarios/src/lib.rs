//! The five incidents that filter-agent exists for (docs/scenarios.md),
//! each reproduced in throwaway network namespaces with real traffic and
//! real tools: first what went wrong, then what filter-agent shows or
//! changes. Every scenario checks its own story and fails if the incident
//! does not reproduce or filter-agent does not do what it should; the
//! tests (`filter-agent/tests/scenarios.rs`) also check the figures each
//! returns. Run one with `cargo xtask scenario NAME`.

mod agent;
pub mod asymmetric;
pub mod conntrack_full;
pub mod docker_nacl;
pub mod lvs_dr;
pub mod ports;
pub mod sakura;

use std::{
    io::Write as _,
    path::Path,
    process::{Output, Stdio},
};

use anyhow::{Context as _, ensure};
use testbed::Netns;

pub use agent::Agent;

/// Every scenario, by the name `cargo xtask scenario` takes.
pub const NAMES: [&str; 5] = [
    "sakura",
    "asymmetric",
    "docker-nacl",
    "conntrack-full",
    "lvs-dr",
];

/// Runs the scenario `name` with the filter-agent binary at `agent`.
pub fn run(name: &str, agent: &Path) -> anyhow::Result<()> {
    match name {
        "sakura" => sakura::run(agent).map(drop),
        "asymmetric" => asymmetric::run(agent).map(drop),
        "docker-nacl" => docker_nacl::run(agent).map(drop),
        "conntrack-full" => conntrack_full::run(agent).map(drop),
        "lvs-dr" => lvs_dr::run(agent).map(drop),
        other => anyhow::bail!(
            "no scenario {other:?}; the scenarios are {}",
            NAMES.join(", ")
        ),
    }
}

/// One line of a scenario's narrative.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { println!("  {}", format_args!($($arg)*)) };
}

/// A step of a scenario's narrative.
#[macro_export]
macro_rules! step {
    ($($arg:tt)*) => { println!("\n{}", format_args!($($arg)*)) };
}

/// Loads an nftables ruleset in `netns` (`nft -f -`).
pub(crate) fn nft(netns: &Netns, script: &str) -> anyhow::Result<()> {
    with_input(netns, "nft", &["-f", "-"], script).map(drop)
}

/// Runs `program ARGS` in `netns` with `input` on its standard input;
/// fails unless it succeeds.
pub(crate) fn with_input(
    netns: &Netns,
    program: &str,
    args: &[&str],
    input: &str,
) -> anyhow::Result<Output> {
    let mut child = netns
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(output)
}
