//! The project's helper: `cargo xtask setup | demo | test | package |
//! vm-test | bench | fuzz | soak | scenario NAME`.

mod daemonset;
mod demo;
mod fuzz;
mod image;
mod limits;
mod package;
mod setup;
mod soak;
mod util;
mod vm;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
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
    /// Reproduce an incident of docs/scenarios.md in throwaway namespaces:
    /// sakura, asymmetric, docker-nacl, conntrack-full, lvs-dr (or all).
    Scenario { name: String },
    /// Check the size limits: files <= 500 lines, functions <= 70.
    Limits,
    /// Run the coverage-guided fuzzers (fuzz/): each replays its
    /// regressions, then fuzzes from its seeds. Needs root (the packet
    /// path runs the real program).
    Fuzz {
        /// One of rules_text, rules_structured, upstream, pcap, packet_path
        /// (default: all).
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Lint, then run every test (unit and real-kernel integration tests),
    /// then `vm-test` on every kernel.
    Test,
    /// Build static binaries for x86-64 and arm64 and from them the Debian
    /// packages (target/debian/filter-agent_VERSION_{amd64,arm64}.deb) and
    /// tarballs (target/dist/filter-agent-VERSION-{x86_64,aarch64}-linux.tar.gz),
    /// with SHA256SUMS. Installs only what packaging needs.
    Package,
    /// Build the container image (from scratch: the static x86-64 binary),
    /// target/dist/filter-agent-VERSION-image.tar, for `docker load`.
    Image {
        /// Then run it under a Docker engine of its own as the DaemonSet
        /// runs it (installs the test stack; part of `cargo xtask test`).
        #[arg(long)]
        check: bool,
    },
    /// Boot Debian's stock kernels (bullseye 5.10, bookworm 6.1, trixie
    /// 6.12, and bookworm's arm64 6.1) in qemu and run the packaged agent
    /// in each, then Debian 11, 12 and 13 with systemd that install the
    /// package: one line per check.
    VmTest {
        /// Only these guests: bullseye, bookworm, trixie, bookworm-arm64,
        /// systemd, systemd-bullseye, systemd-trixie (default: all).
        #[arg(long = "guest", alias = "kernel", value_name = "GUEST")]
        guests: Vec<String>,
    },
    /// The agent under churn for MINUTES with traffic throughout: the
    /// rules rewritten every second (up to 100,000 prefixes), the
    /// interface re-created every 30 s, the agent killed with SIGKILL and
    /// restarted every minute, stats, /metrics and watch read all along;
    /// then every promise checked (nothing denied delivered, nothing
    /// allowed lost, every reload in force, no leak, no pin left).
    Soak {
        #[arg(long, default_value_t = 60.0)]
        minutes: f64,
    },
    /// ns/packet (BPF_PROG_TEST_RUN) for 10..10,000 rules next to xdp-filter,
    /// and 10..16,384 of ClassBench-shaped sets on early, late and unmatched frames;
    /// writes target/bench.json. With --live: whole-path cost with live
    /// traffic next to nftables, iptables and ipset; writes
    /// target/bench-live.json. Never part of CI's pass/fail.
    Bench(BenchArgs),
}

/// `cargo xtask bench`'s options, passed on to the harness.
#[derive(clap::Args)]
struct BenchArgs {
    /// Live traffic through veth instead of BPF_PROG_TEST_RUN alone.
    #[arg(long)]
    live: bool,
    /// Measurement runs per rule-set size (the median is reported).
    #[arg(long, default_value_t = 7)]
    runs: u32,
    /// BPF_PROG_TEST_RUN repetitions per frame and run.
    #[arg(long, default_value_t = 20_000)]
    repeat: u32,
    /// Length of one live run, in seconds.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// A ClassBench filter set: its first 10 to 16,384 rules timed on its
    /// trace's early, late and unmatched frames, instead of the rest.
    #[arg(long, requires = "trace")]
    classbench: Option<PathBuf>,
    /// The ClassBench trace of `--classbench`'s set.
    #[arg(long, requires = "classbench")]
    trace: Option<PathBuf>,
    /// Only these parts: rule-sets, limits, sets, families (comma-separated).
    #[arg(long)]
    only: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::run(),
        Task::Limits => limits::check(),
        Task::Fuzz { target, seconds } => setup::run().and_then(|()| fuzz_targets(target, seconds)),
        Task::Demo => setup::run().and_then(|()| demo::run()),
        Task::Test => setup::run().and_then(|()| test()),
        Task::Scenario { name } => scenario(&name),
        Task::Package => setup::packaging().and_then(|()| package::run().map(drop)),
        Task::Image { check: false } => setup::packaging().and_then(|()| image::build().map(drop)),
        Task::Image { check: true } => setup::run().and_then(|()| image_check().map(drop)),
        Task::VmTest { guests } => setup::run().and_then(|()| vm_test(&guests)),
        Task::Soak { minutes } => setup::run().and_then(|()| soak::run(minutes)),
        Task::Bench(args) => setup::run().and_then(|()| bench(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn scenario(name: &str) -> anyhow::Result<()> {
    let names: Vec<&str> = match name {
        "all" => scenarios::NAMES.to_vec(),
        name if scenarios::NAMES.contains(&name) => vec![name],
        other => anyhow::bail!(
            "no scenario {other:?}; the scenarios are {} (or all)",
            scenarios::NAMES.join(", ")
        ),
    };
    setup::run()?;
    util::cargo(&["build", "--quiet", "--package", "filter-agent"])?;
    let agent = util::workspace_root().join("target/debug/filter-agent");
    // Ctrl-C also stops the tools the scenario runs; the scenario itself
    // stops at its next step and undoes what it set up.
    ctrlc::set_handler(scenarios::interrupt).context("installing the Ctrl-C handler")?;
    for name in names {
        scenarios::run(name, &agent)?;
    }
    Ok(())
}

fn fuzz_targets(target: Option<String>, seconds: u64) -> anyhow::Result<()> {
    let targets: Vec<&'static str> = match target {
        None => fuzz::TARGETS.to_vec(),
        Some(name) => vec![
            fuzz::TARGETS
                .into_iter()
                .find(|known| *known == name)
                .with_context(|| {
                    format!(
                        "no fuzz target {name:?}; the targets are {}",
                        fuzz::TARGETS.join(", ")
                    )
                })?,
        ],
    };
    let runs = fuzz::run(&targets, seconds)?;
    let total: u64 = runs.iter().map(|run| run.executions).sum();
    println!("fuzz: {total} executions in all");
    Ok(())
}

fn vm_test(guests: &[String]) -> anyhow::Result<()> {
    let (passed, failed) = vm_checks(guests)?;
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        anyhow::bail!("{failed} vm checks failed");
    }
    Ok(())
}

/// `vm-test`'s checks in `guests` (all when empty): passed and failed.
fn vm_checks(guests: &[String]) -> anyhow::Result<(u32, u32)> {
    let known = vm::guest_names();
    if let Some(unknown) = guests.iter().find(|name| !known.contains(&name.as_str())) {
        anyhow::bail!("no guest {unknown:?}; the guests are {}", known.join(", "));
    }
    let chosen: Vec<&str> = if guests.is_empty() {
        known
    } else {
        guests.iter().map(String::as_str).collect()
    };
    vm::run(&chosen)
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let file = match (args.live, &args.classbench) {
        (true, _) => "bench-live.json",
        (false, Some(_)) => "bench-classbench.json",
        (false, None) => "bench.json",
    };
    let json = util::workspace_root().join("target").join(file);
    let json = json.to_str().context("a non-UTF-8 workspace path")?;
    let (runs, repeat, seconds) = (
        args.runs.to_string(),
        args.repeat.to_string(),
        args.seconds.to_string(),
    );
    let mut passed = vec!["--runs", &runs, "--json", json];
    if args.live {
        passed.extend(["--live", "--seconds", &seconds]);
    } else {
        passed.extend(["--repeat", &repeat]);
    }
    let path = |path: &Option<PathBuf>| -> anyhow::Result<Option<String>> {
        let Some(path) = path else { return Ok(None) };
        let full = std::fs::canonicalize(path).with_context(|| path.display().to_string())?;
        Ok(Some(full.to_string_lossy().into_owned()))
    };
    let (classbench, trace) = (path(&args.classbench)?, path(&args.trace)?);
    if let (Some(classbench), Some(trace)) = (&classbench, &trace) {
        passed.extend(["--classbench", classbench, "--trace", trace]);
    }
    if let Some(only) = &args.only {
        passed.extend(["--only", only]);
    }
    run_bench(Profile::Release, &passed)
}

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SECONDS: u64 = 20;
/// The soak's length in `cargo xtask test` (the long runs are by hand).
const SOAK_MINUTES: f64 = 2.0;

/// How `run_bench` builds the bench.
#[derive(Clone, Copy)]
enum Profile {
    /// For figures.
    Release,
    /// For the smoke runs in `cargo xtask test`, whose figures gate
    /// nothing: the debug build its other steps share
    /// ([`util::dev_build`]), where release would build the whole tree
    /// once more (3-4 minutes).
    Dev,
}

/// `filter-agent/examples/bench.rs`, built in `profile`, with `args`.
fn run_bench(profile: Profile, args: &[&str]) -> anyhow::Result<()> {
    let mut command = match profile {
        Profile::Release => {
            let mut cargo = std::process::Command::new(util::cargo_program());
            cargo.args(["run", "--quiet", "--release", "--package", "filter-agent"]);
            cargo.args(["--example", "bench", "--"]);
            cargo
        }
        Profile::Dev => std::process::Command::new(util::dev_example("bench")?),
    };
    command.args(args).current_dir(util::workspace_root());
    util::run(&mut command).with_context(|| format!("the bench with {args:?}"))
}

/// Builds the image and runs it as the DaemonSet does.
fn image_check() -> anyhow::Result<()> {
    let seen = daemonset::test(&image::build()?)?;
    println!("image: as the DaemonSet runs it: {seen}");
    Ok(())
}

fn test() -> anyhow::Result<()> {
    timed("lints", || {
        util::cargo(&["fmt", "--all", "--check"])?;
        util::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
        limits::check()
    })?;
    // Every test binary runs, whichever fails first.
    let (mut passed, mut failed) = timed("cargo test", || {
        util::cargo_test(&["test", "--all-targets", "--no-fail-fast"])
    })?;
    let mut outcomes = timed("bench smoke runs", smoke_benches);
    // Every fuzzer briefly: its regressions, then 20 s from its seeds.
    let fuzzed = timed("fuzz", || fuzz::run(&fuzz::TARGETS, FUZZ_SECONDS));
    outcomes.push(("fuzz", fuzzed.map(drop)));
    // The Debian packages build, and lintian finds no error in them.
    let packaged = timed("package", || {
        package::run().and_then(|built| built.debs.iter().try_for_each(|deb| package::lint(deb)))
    });
    outcomes.push(("package", packaged));
    // The DaemonSet passes Kubernetes' schemas, and its image runs under
    // Docker as the DaemonSet runs it.
    let schema = package::validate_manifest();
    outcomes.push(("package (DaemonSet schema)", schema));
    outcomes.push(("image --check", timed("image --check", image_check)));
    let soaked = timed("soak", || soak::run(SOAK_MINUTES));
    outcomes.push(("soak --minutes 2", soaked));
    for (name, outcome) in outcomes {
        match outcome {
            Ok(()) => passed += 1,
            Err(err) => {
                eprintln!("`cargo xtask {name}` FAILED: {err:#}");
                failed += 1;
            }
        }
    }
    // The agent on Debian's own kernels, in qemu.
    let (vm_passed, vm_failed) = vm_checks(&[])?;
    let (passed, failed) = (passed + u64::from(vm_passed), failed + u64::from(vm_failed));
    // One plain closing line for the whole run, after cargo's per-crate ones.
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        anyhow::bail!("{failed} tests failed");
    }
    Ok(())
}

/// Runs one step of `cargo xtask test` and says how long it took, so that
/// a slow CI run shows where its time went.
fn timed<T>(step: &str, run: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let outcome = run();
    println!(
        "cargo xtask test: {step} took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    outcome
}

/// The benchmark harness, with tiny counts, so that it cannot rot; its
/// figures gate nothing, but a missing peer fails it. And the live
/// benchmark: every receiver, a few thousand packets each, every packet
/// accounted for in the receiver's counters.
fn smoke_benches() -> Vec<(&'static str, anyhow::Result<()>)> {
    // Few rounds and repeats, and xdp-filter must be there.
    let quick = ["--require-peer", "--runs", "1", "--repeat", "100"];
    let default = [&quick[..], &["--sizes", "10,100", "--set-sizes", "1000"]].concat();
    let smoke: [(&str, &[&str]); 2] = [
        ("bench", &default),
        (
            "bench --live",
            &[
                "--live",
                "--runs",
                "1",
                "--seconds",
                "0.01",
                "--sizes",
                "1,100",
            ],
        ),
    ];
    let mut outcomes: Vec<_> = smoke
        .into_iter()
        .map(|(name, args)| (name, run_bench(Profile::Dev, args)))
        .collect();
    // The ClassBench reader on a small set of the format's own shape.
    let fixtures = util::workspace_root().join("filter-agent/examples/bench/fixtures");
    let (rules, trace) = (fixtures.join("small.rules"), fixtures.join("small.trace"));
    let (rules, trace) = (rules.to_string_lossy(), trace.to_string_lossy());
    let classbench = [
        &quick[..],
        &[
            "--sizes",
            "10,40",
            "--classbench",
            &rules,
            "--trace",
            &trace,
        ],
    ]
    .concat();
    outcomes.push(("bench --classbench", run_bench(Profile::Dev, &classbench)));
    outcomes
}
