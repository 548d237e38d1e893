//! filter-agent: loads the stateless XDP filter onto an interface and keeps
//! it there until told to stop.

mod commands;

use std::{io::IsTerminal as _, process::ExitCode};

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
    compile, config,
    loader::Filter,
    privileges,
};

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
        Some(Command::Check { rules }) => commands::check(&rules),
        Some(Command::Test { rules, packet }) => commands::test_packets(&rules, &packet),
        Some(Command::Replay { rules, pcap, json }) => commands::replay(&rules, &pcap, json),
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
