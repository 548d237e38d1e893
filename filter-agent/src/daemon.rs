//! The agent itself: attaches the filter and the guard to an interface,
//! keeps the guard's view of local services fresh, reports out-of-range
//! traffic and namespace findings as summaries, and detaches on SIGINT or
//! SIGTERM.

use std::{collections::BTreeSet, time::Duration};

use anyhow::Context as _;
use filter_common::{guard as guard_stat, reason};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior, interval, interval_at},
};
use tracing::{info, warn};

use filter_agent::{
    audit,
    cli::RunArgs,
    compile,
    config::{self, GuardAction, GuardSettings},
    guard::{self, Listeners},
    loader::{self, Filter},
    privileges,
};

/// How often listening sockets are rescanned (and out-of-range traffic
/// summarised).
const SERVICES_EVERY: Duration = Duration::from_secs(10);
/// How often every namespace is audited.
const AUDIT_EVERY: Duration = Duration::from_secs(60);
/// Ports and peers named in a summary line.
const SUMMARY_TOP: usize = 5;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let (Some(iface), Some(rules)) = (args.iface, args.rules) else {
        unreachable!("clap requires --iface and --rules without a subcommand");
    };
    let config = config::load(&rules)?;
    let rule_set = compile::compile(&config)?;
    privileges::check()?;
    let pins = loader::pin_dir(&iface);
    std::fs::create_dir_all(&pins)
        .with_context(|| format!("creating {} (is bpffs mounted?)", pins.display()))?;
    let mut filter = Filter::load_pinned(&rule_set, &pins).context("loading the XDP program")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        if let Some(logger) = filter.logger() {
            forward_program_logs(logger)?;
        }
        // Services first: ACKs to local listeners are not return traffic.
        let mut watch = GuardWatch::new(&config.guard);
        if config.guard.action != GuardAction::Off {
            watch.refresh(&mut filter);
        }
        let mode = filter.attach(&iface, args.xdp_mode)?;
        info!(
            %iface,
            mode,
            rules = %rules.display(),
            count = config.rules.len(),
            default = config.filter.default.name(),
            guard = ?config.guard.action,
            ephemeral = %format!("{}-{}", config.guard.ephemeral.0, config.guard.ephemeral.1),
            "filter attached"
        );
        let result = serve(&mut filter, watch).await;
        log_counters(&filter, &rule_set);
        info!(%iface, "detaching");
        drop(filter);
        loader::remove_pins(&pins);
        result
    })
}

/// Runs until SIGINT or SIGTERM.
async fn serve(filter: &mut Filter, mut watch: GuardWatch) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut services = interval_at(Instant::now() + SERVICES_EVERY, SERVICES_EVERY);
    let mut audits = interval(AUDIT_EVERY);
    services.set_missed_tick_behavior(MissedTickBehavior::Delay);
    audits.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let guard_on = watch.settings.action != GuardAction::Off;
    loop {
        tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM received"); break; }
            _ = interrupt.recv() => { info!("SIGINT received"); break; }
            _ = services.tick(), if guard_on => watch.refresh(filter),
            _ = audits.tick(), if guard_on => {
                let range = watch.settings.ephemeral;
                match tokio::task::spawn_blocking(move || audit::run(range)).await {
                    Ok(namespaces) => watch.report_audit(&namespaces),
                    Err(err) => warn!(%err, "namespace audit failed"),
                }
            }
        }
    }
    Ok(())
}

/// The agent's side of the guard: service discovery and summaries.
struct GuardWatch {
    settings: GuardSettings,
    /// UDP listeners of the previous scan: a UDP port becomes a service
    /// only when seen twice, so short-lived client sockets do not.
    previous_udp: BTreeSet<u16>,
    /// Out-of-range counts at the last summary.
    last_return: u64,
    last_outbound: u64,
    /// Findings already logged, so each is logged once.
    logged_findings: BTreeSet<(u64, String)>,
}

impl GuardWatch {
    fn new(settings: &GuardSettings) -> Self {
        Self {
            settings: settings.clone(),
            previous_udp: BTreeSet::new(),
            last_return: 0,
            last_outbound: 0,
            logged_findings: BTreeSet::new(),
        }
    }

    fn refresh(&mut self, filter: &mut Filter) {
        let mut found = Listeners::discover();
        let stable_udp = found
            .udp
            .intersection(&self.previous_udp)
            .copied()
            .collect();
        self.previous_udp = std::mem::replace(&mut found.udp, stable_udp);
        if let Err(err) = filter.set_services(&self.settings.services, &found) {
            warn!(%err, "cannot update the guard's service ports");
        }
        self.summarise(filter);
    }

    /// One warning per interval in which out-of-range traffic was seen.
    fn summarise(&mut self, filter: &Filter) {
        let report = match filter.guard_report() {
            Ok(report) => report,
            Err(err) => return warn!(%err, "cannot read the guard's counters"),
        };
        let returned = report.stats[guard_stat::RETURN_OUT_OF_RANGE as usize].packets;
        let outbound = report.stats[guard_stat::OUTBOUND_OUT_OF_RANGE as usize].packets;
        let (new_return, new_outbound) = (
            returned.saturating_sub(self.last_return),
            outbound.saturating_sub(self.last_outbound),
        );
        (self.last_return, self.last_outbound) = (returned, outbound);
        if new_return == 0 && new_outbound == 0 {
            return;
        }
        let ports: Vec<String> = report
            .ports
            .iter()
            .take(SUMMARY_TOP)
            .map(|(port, counter)| {
                format!(
                    "{} {}/{} ({})",
                    guard::direction_name(port.direction),
                    guard::proto_name(port.proto),
                    port.port,
                    counter.packets
                )
            })
            .collect();
        let (low, high) = self.settings.ephemeral;
        warn!(
            return_packets = new_return,
            outbound_attempts = new_outbound,
            top_ports = %ports.join(", "),
            "guard: traffic on local ports outside the ephemeral range {low}-{high} (see `filter-agent guard`)"
        );
    }

    fn report_audit(&mut self, namespaces: &[audit::Namespace]) {
        for ns in namespaces {
            for finding in &ns.findings {
                if self
                    .logged_findings
                    .insert((ns.inode, finding.problem.clone()))
                {
                    warn!(
                        namespace = %ns.label(),
                        fix = %finding.fix,
                        "audit: {}", finding.problem
                    );
                }
            }
        }
    }
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
    if let Ok(report) = filter.guard_report() {
        for (name, counter) in guard_stat::STAT_NAMES.iter().zip(report.stats) {
            info!(
                guard = name,
                packets = counter.packets,
                bytes = counter.bytes,
                "counted"
            );
        }
    }
}
