//! The five incidents that filter-agent exists for (docs/scenarios.md),
//! each reproduced in throwaway network namespaces with real traffic and
//! real tools: first what went wrong, then what filter-agent shows or
//! changes. Every scenario checks its own story and fails if the incident
//! does not reproduce or filter-agent does not do what it should; the
//! tests (`filter-agent/tests/scenarios.rs`) also check the figures each
//! returns. Run one with `cargo xtask scenario NAME`.

pub mod agent;
pub mod asymmetric;
pub mod conntrack_full;
pub mod docker_nacl;
pub mod lvs_dr;
pub mod ports;
pub mod sakura;

use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

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
    }?;
    println!("\n{name}: reproduced, and filter-agent did what it should");
    Ok(())
}

/// One line of a scenario's narrative.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { println!("  {}", format_args!($($arg)*)) };
}

/// A step of a scenario's narrative. Returns from the scenario with an
/// error (so that everything set up is dropped and cleaned up) once
/// [`interrupt`] was called.
#[macro_export]
macro_rules! step {
    ($($arg:tt)*) => {
        $crate::checkpoint()?;
        println!("\n{}", format_args!($($arg)*));
    };
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Makes the running scenario stop at its next step (for Ctrl-C).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

#[doc(hidden)]
pub fn checkpoint() -> anyhow::Result<()> {
    anyhow::ensure!(
        !INTERRUPTED.load(Ordering::Relaxed),
        "interrupted; cleaned up"
    );
    Ok(())
}

/// Loads an nftables ruleset in `netns` (`nft -f -`).
pub(crate) fn nft(netns: &Netns, script: &str) -> anyhow::Result<()> {
    netns.exec_with_input("nft", &["-f", "-"], script)?;
    Ok(())
}
