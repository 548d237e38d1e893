//! `cargo xtask fuzz [TARGET] [--seconds N]`: the coverage-guided fuzzers
//! of fuzz/ (libFuzzer through libfuzzer-sys), built with nightly's
//! coverage instrumentation. Each target first replays its committed
//! regressions (fuzz/regressions/TARGET: what a fuzzer once found), then
//! fuzzes for N seconds from its committed seeds (fuzz/seeds/TARGET) and
//! the corpus it grew before (target/fuzz/corpus/TARGET). A failing input
//! is kept in target/fuzz/artifacts/TARGET and named.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{package, util};

/// The targets, in the order `cargo xtask fuzz` runs them.
pub const TARGETS: [&str; 5] = [
    "rules_text",
    "rules_structured",
    "upstream",
    "pcap",
    "packet_path",
];

/// What cargo-fuzz passes to rustc for libFuzzer: edge counters, the PC
/// table and comparison tracing, with debug assertions and overflow checks.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// One target's run.
pub struct Run {
    pub target: &'static str,
    pub regressions: usize,
    pub executions: u64,
    pub seconds: u64,
    /// libFuzzer's coverage (edges) and features at the end.
    pub coverage: u64,
    pub features: u64,
    pub corpus: u64,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fuzz {}: {} executions in {} s ({}/s), coverage {} edges, {} features, corpus {}; \
             {} regressions replayed",
            self.target,
            self.executions,
            self.seconds,
            self.executions / self.seconds.max(1),
            self.coverage,
            self.features,
            self.corpus,
            self.regressions
        )
    }
}

/// Builds the targets, then runs each of `targets` for `seconds`.
pub fn run(targets: &[&'static str], seconds: u64) -> anyhow::Result<Vec<Run>> {
    let root = util::workspace_root();
    // The eBPF object, built by the project's own build, embedded as is.
    util::dev_build()?;
    let object = package::embedded_object(&root.join("target/debug/build"))?;
    util::run(
        Command::new("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "build",
                "--quiet",
                "--release",
                "--bins",
            ])
            .args(["--target", &triple()])
            .current_dir(root.join("fuzz"))
            .env("RUSTFLAGS", RUSTFLAGS)
            .env("FILTER_AGENT_EBPF_OBJECT", object),
    )
    .context("building the fuzz targets")?;
    // Two at a time: a fuzzer keeps one CPU busy, and CI's machine has two.
    let mut runs = Vec::new();
    for pair in targets.chunks(2) {
        let ended: Vec<anyhow::Result<Run>> = std::thread::scope(|scope| {
            let fuzzers: Vec<_> = pair
                .iter()
                .map(|&target| scope.spawn(|| fuzz(&root, target, seconds)))
                .collect();
            fuzzers
                .into_iter()
                .map(|fuzzer| fuzzer.join().expect("a fuzz thread panicked"))
                .collect()
        });
        for run in ended {
            let run = run?;
            println!("{run}");
            runs.push(run);
        }
    }
    Ok(runs)
}

/// The host's target triple: the fuzz targets run here.
fn triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

fn fuzz(root: &Path, target: &'static str, seconds: u64) -> anyhow::Result<Run> {
    let binary = root
        .join("fuzz/target")
        .join(triple())
        .join("release")
        .join(target);
    let dir = |parts: &[&str]| -> anyhow::Result<PathBuf> {
        let dir = parts
            .iter()
            .fold(root.to_path_buf(), |dir, part| dir.join(part))
            .join(target);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    };
    let (regressions, seeds) = (dir(&["fuzz", "regressions"])?, dir(&["fuzz", "seeds"])?);
    let (corpus, artifacts) = (
        dir(&["target/fuzz/corpus"])?,
        dir(&["target/fuzz/artifacts"])?,
    );
    let replayed = std::fs::read_dir(&regressions)?.count();
    libfuzzer(&binary, &[&regressions], &["-runs=0"])
        .with_context(|| format!("{target}: a regression fails again"))?;
    let artifact_prefix = format!("-artifact_prefix={}/", artifacts.display());
    let max_time = format!("-max_total_time={seconds}");
    let flags = [
        max_time.as_str(),
        &artifact_prefix,
        "-print_final_stats=1",
        "-max_len=8192",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-malloc_limit_mb=1024",
    ];
    let log = libfuzzer(&binary, &[&corpus, &seeds], &flags)
        .with_context(|| format!("{target} found a failing input"))?;
    let stat = |name: &str| {
        log.lines()
            .find_map(|line| line.strip_prefix(&format!("stat::{name}:")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    };
    let (coverage, features, corpus) = last_status(&log);
    Ok(Run {
        target,
        regressions: replayed,
        executions: stat("number_of_executed_units"),
        seconds,
        coverage,
        features,
        corpus,
    })
}

/// Runs a fuzz binary on `dirs` with `flags`; its log, or an error with
/// the log's end (and where libFuzzer kept the failing input).
fn libfuzzer(binary: &Path, dirs: &[&Path], flags: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(binary)
        .args(flags)
        .args(dirs)
        .output()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        return Ok(log);
    }
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    anyhow::bail!(
        "{} ({})\n{}",
        binary.display(),
        output.status,
        tail.join("\n")
    )
}

/// `cov`, `ft` and `corp` of libFuzzer's last status line.
fn last_status(log: &str) -> (u64, u64, u64) {
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains(" cov: "))
        .unwrap_or_default();
    let after = |key: &str| {
        line.split_whitespace()
            .skip_while(|word| *word != key)
            .nth(1)
            .and_then(|value| value.split('/').next()?.parse().ok())
            .unwrap_or(0)
    };
    (after("cov:"), after("ft:"), after("corp:"))
}
