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
    /// ns/packet (BPF_PROG_TEST_RUN) for 10..10,000 rules next to xdp-filter;
    /// writes target/bench.json. Never part of CI's pass/fail.
    Bench {
        /// Measurement runs per rule-set size (the median is reported).
        #[arg(long, default_value_t = 7)]
        runs: u32,
        /// BPF_PROG_TEST_RUN repetitions per frame and run.
        #[arg(long, default_value_t = 20_000)]
        repeat: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::run(),
        Task::Demo => setup::run().and_then(|()| demo::run()),
        Task::Test => setup::run().and_then(|()| test()),
        Task::Bench { runs, repeat } => setup::run().and_then(|()| bench(runs, repeat)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(runs: u32, repeat: u32) -> anyhow::Result<()> {
    let json = util::workspace_root().join("target/bench.json");
    let json = json.to_str().unwrap_or("target/bench.json");
    let (runs, repeat) = (runs.to_string(), repeat.to_string());
    run_bench(&["--runs", &runs, "--repeat", &repeat, "--json", json])
}

/// `filter-agent/examples/bench.rs`, built in release, with `args`.
fn run_bench(args: &[&str]) -> anyhow::Result<()> {
    let mut command = vec![
        "run",
        "--quiet",
        "--release",
        "--package",
        "filter-agent",
        "--example",
        "bench",
        "--",
    ];
    command.extend_from_slice(args);
    util::cargo(&command)
}

fn test() -> anyhow::Result<()> {
    util::cargo(&["fmt", "--all", "--check"])?;
    util::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    let (passed, failed) = util::cargo_test(&["test", "--all-targets"])?;
    // The benchmark harness, with tiny counts, so that it cannot rot; its
    // figures gate nothing.
    run_bench(&[
        "--runs",
        "1",
        "--repeat",
        "100",
        "--sizes",
        "10,100",
        "--set-sizes",
        "1000",
    ])?;
    // One plain closing line for the whole run, after cargo's per-crate ones.
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        anyhow::bail!("{failed} tests failed");
    }
    Ok(())
}
