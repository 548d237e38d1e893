//! filter-agent: loads the stateless XDP filter onto an interface and keeps
//! it there until told to stop.

use std::{
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Parser as _;
use filter_common::reason;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use filter_agent::{
    cli::{self, Cli, Command, RunArgs},
    compile, config, lint,
    loader::Filter,
    packet, pcap, privileges,
    reference::Outcome,
};

/// XDP_DROP, as BPF_PROG_TEST_RUN reports it.
const XDP_DROP: u32 = 1;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("error: {}", cli::one_line_error(&err));
            return ExitCode::from(2);
        }
    };
    init_logging();
    let result = match cli.command {
        Some(Command::Check { rules }) => check(&rules),
        Some(Command::Test { rules, packet }) => test_packets(&rules, &packet),
        Some(Command::Replay { rules, pcap, json }) => replay(&rules, &pcap, json),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::{EnvFilter, fmt, prelude::*};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false),
        )
        .with(filter)
        .init();
}

fn check(rules: &std::path::Path) -> anyhow::Result<()> {
    let config = config::load(rules)?;
    let rule_set = compile::compile(&config)?;
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

/// `filter-agent test`: each packet through the real program, not attached.
fn test_packets(rules: &std::path::Path, packets: &[String]) -> anyhow::Result<()> {
    let config = config::load(rules)?;
    let specs = packets
        .iter()
        .map(|text| {
            packet::parse_description(text)
                .map_err(|err| anyhow::anyhow!("--packet {text:?}: {err}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rule_set = compile::compile(&config)?;
    privileges::check()?;
    let filter = Filter::load_traced(&rule_set).context("loading the XDP program")?;
    for (text, spec) in packets.iter().zip(specs) {
        let (xdp_action, outcome) = filter.trace_frame(&spec.build())?;
        let verdict = if xdp_action == XDP_DROP {
            "drop"
        } else {
            "pass"
        };
        let decided = match outcome {
            Outcome::Rule(index) => {
                let rule = &rule_set.rules[index];
                format!("rule {:?} ({})", rule.name, rule.action.name())
            }
            Outcome::Reason(why) => reason::NAMES[why as usize].replace('_', " "),
        };
        let would_drop = match outcome {
            Outcome::Rule(index) => rule_set.rules[index].action == config::Action::Deny,
            Outcome::Reason(why) => [
                reason::DEFAULT_DENY,
                reason::MALFORMED,
                reason::FRAGMENT_DENY,
            ]
            .contains(&why),
        };
        let note = if config.filter.mode == config::Mode::Monitor && would_drop {
            " (monitor mode: enforce would drop)"
        } else {
            ""
        };
        println!("{text}: {verdict} by {decided}{note}");
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
    /// "rule", or why no rule decided: "default_deny", "malformed", ...
    reason: &'static str,
}

/// `filter-agent replay`: every packet of a capture through the program.
fn replay(rules: &std::path::Path, capture: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let config = config::load(rules)?;
    let rule_set = compile::compile(&config)?;
    privileges::check()?;
    let filter = Filter::load_traced(&rule_set).context("loading the XDP program")?;
    let mut rule_hits = vec![0u64; rule_set.rules.len()];
    let mut reason_hits = [0u64; reason::COUNT as usize];
    let (mut passed, mut dropped, mut number) = (0u64, 0u64, 0u64);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    pcap::for_each_frame(capture, |frame| -> anyhow::Result<()> {
        number += 1;
        let (xdp_action, outcome) = filter.trace_frame(frame)?;
        let verdict = if xdp_action == XDP_DROP {
            dropped += 1;
            "drop"
        } else {
            passed += 1;
            "pass"
        };
        let (rule, reason, action) = match outcome {
            Outcome::Rule(index) => {
                rule_hits[index] += 1;
                let rule = &rule_set.rules[index];
                (Some(rule.name.as_str()), "rule", rule.action.name())
            }
            Outcome::Reason(why) => {
                reason_hits[why as usize] += 1;
                let denies = [
                    reason::DEFAULT_DENY,
                    reason::MALFORMED,
                    reason::FRAGMENT_DENY,
                ];
                (
                    None,
                    reason::NAMES[why as usize],
                    if denies.contains(&why) {
                        "deny"
                    } else {
                        "allow"
                    },
                )
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
        writeln!(
            out,
            "{}: {number} packets, {passed} passed, {dropped} dropped",
            capture.display()
        )?;
        for (rule, hits) in rule_set.rules.iter().zip(&rule_hits) {
            writeln!(
                out,
                "  {hits:>10}  rule {:?} ({})",
                rule.name,
                rule.action.name()
            )?;
        }
        for (name, hits) in reason::NAMES.iter().zip(reason_hits) {
            if hits > 0 {
                writeln!(out, "  {hits:>10}  {}", name.replace('_', " "))?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let (Some(iface), Some(rules)) = (args.iface, args.rules) else {
        unreachable!("clap requires --iface and --rules without a subcommand");
    };
    let config = config::load(&rules)?;
    let rule_set = compile::compile(&config)?;
    privileges::check()?;
    let mut filter = Filter::load(&rule_set).context("loading the XDP program")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        if let Some(logger) = filter.logger() {
            forward_program_logs(logger)?;
        }
        let mode = filter.attach(&iface, args.xdp_mode)?;
        info!(
            %iface,
            mode,
            rules = %rules.display(),
            count = config.rules.len(),
            default = config.filter.default.name(),
            "filter attached"
        );
        wait_for_shutdown().await?;
        log_counters(&filter, &rule_set);
        info!(%iface, "detaching");
        Ok(())
    })
}

/// Forwards aya-log records from the program to `log` (and so to tracing).
fn forward_program_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the logger, so its fd outlives the registration.
    let mut logger =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .context("watching the eBPF log buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                break;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM received"),
        _ = interrupt.recv() => info!("SIGINT received"),
    }
    Ok(())
}

fn log_counters(filter: &Filter, rule_set: &compile::RuleSet) {
    let counters = filter
        .counters()
        .and_then(|reasons| Ok((reasons, filter.rule_counters()?)));
    match counters {
        Ok((reasons, rules)) => {
            for (rule, counter) in rule_set.rules.iter().zip(rules) {
                info!(
                    rule = rule.name,
                    action = rule.action.name(),
                    packets = counter.packets,
                    bytes = counter.bytes,
                    "counted"
                );
            }
            for (name, counter) in reason::NAMES.iter().zip(reasons) {
                info!(
                    reason = name,
                    packets = counter.packets,
                    bytes = counter.bytes,
                    "counted"
                );
            }
        }
        Err(err) => warn!(%err, "cannot read counters"),
    }
}
