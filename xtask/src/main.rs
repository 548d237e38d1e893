//! The project's helper: `cargo xtask setup | demo | test`.

mod demo;
mod setup;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "filter-agent's build, demo and test helper"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent; fast when done).
    Setup,
    /// Run filter-agent on throwaway namespaces with real traffic.
    Demo,
    /// Lint, then run every test (unit and real-kernel integration tests).
    Test,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::run(),
        Task::Demo => setup::run().and_then(|()| demo::run()),
        Task::Test => setup::run().and_then(|()| test()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn test() -> anyhow::Result<()> {
    util::cargo(&["fmt", "--all", "--check"])?;
    util::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    let (passed, failed) = util::cargo_test(&["test", "--all-targets"])?;
    // One plain closing line for the whole run, after cargo's per-crate ones.
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        anyhow::bail!("{failed} tests failed");
    }
    Ok(())
}
