//! The agent itself: attaches the filter and the guard to each interface
//! through pinned links (taking over what an earlier agent left, without a
//! gap), reloads the rules on SIGHUP and on file changes, keeps the guard's
//! view of local services fresh, serves metrics and `watch` clients, logs
//! summaries of events, out-of-range traffic and namespace findings, and on
//! SIGINT/SIGTERM leaves the filter in place (or detaches it).
//!
//! `run` starts it; [`serve`] holds the loop and one handler per event
//! source; the other modules each own one of those sources.

mod event_lines;
mod files;
mod guard_watch;
mod http;
mod interface;
mod reload;
mod serve;
mod trial;
mod trial_requests;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use sd_notify::NotifyState;
use tracing::{info, warn};

use crate::{
    host::privileges,
    kernel::links::LinkWatch,
    kernel::loader,
    kernel::pins::{self, InterfaceLock},
    metrics::{Metrics, Status},
    rules::compile::{self, RuleSet},
    rules::config::{self, Config},
};
use files::FileWatch;
use guard_watch::GuardWatch;
use interface::Interface;
use serve::Agent;

/// How often listening sockets are rescanned, and out-of-range traffic and
/// events summarised.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// How often every namespace is audited.
const AUDIT_EVERY: Duration = Duration::from_secs(60);

/// How the daemon runs: what its command line says.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The interfaces to filter, each with its own attachment.
    pub iface: Vec<String>,
    pub rules: PathBuf,
    /// Seconds to wait for an interface that does not exist yet.
    pub iface_timeout: u64,
    pub xdp_mode: loader::AttachMode,
    /// Where /metrics and /healthz are served.
    pub metrics: SocketAddr,
    pub metrics_hide_processes: bool,
    /// Events sampled in the kernel per second and CPU (0: none).
    pub events_per_second: u32,
    pub detach_on_exit: bool,
    pub control_socket: PathBuf,
}

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(args: Settings) -> anyhow::Result<()> {
    let rules = args.rules.clone();
    let config = config::load(&rules)?;
    let rule_set = compile::compile(&config)?;
    privileges::check(privileges::Task::Attach)?;
    loader::check_kernel()?;
    let status = Arc::new(Mutex::new(Status {
        rules_loaded: config.rules.len() as u64,
        ..Status::default()
    }));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        // Opened first: an interface created meanwhile is not missed.
        let mut links = LinkWatch::open().context("watching link events (rtnetlink)")?;
        let timeout = Duration::from_secs(args.iface_timeout);
        wait_for_interfaces(&args.iface, timeout, &mut links).await?;
        let (locks, metrics_listener) = claim(&args)?;
        let status = Arc::clone(&status);
        let started = start(
            &args,
            rules,
            &config,
            rule_set,
            locks,
            links,
            Arc::clone(&status),
        );
        let mut agent = started?;
        let registry = Metrics::registry(args.iface.clone(), Arc::clone(&status));
        let result = tokio::select! {
            result = agent.serve() => result,
            result = http::serve(metrics_listener, registry, status) => {
                result.context("serving metrics")
            }
        };
        notify(&[NotifyState::Stopping]);
        for interface in agent.interfaces {
            interface.stop(args.detach_on_exit);
        }
        result
    });
    // A reload still compiling on its blocking thread is abandoned.
    runtime.shutdown_background();
    result
}

/// Returns once every interface in `ifaces` exists, or fails naming one
/// that did not appear within `timeout` (at once when it is zero). All or
/// none: an unknown second interface must not leave the first attached.
async fn wait_for_interfaces(
    ifaces: &[String],
    timeout: Duration,
    links: &mut LinkWatch,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut waiting_for = None;
    while let Some(missing) = ifaces.iter().find(|i| !loader::interface_exists(i)) {
        let unknown = loader::LoadError::UnknownInterface(missing.clone());
        if timeout.is_zero() {
            anyhow::bail!(unknown);
        }
        if waiting_for.replace(missing) != Some(missing) {
            info!(iface = %missing, "waiting for the interface to appear (--iface-timeout)");
        }
        if tokio::time::timeout_at(deadline, links.changed())
            .await
            .is_err()
        {
            anyhow::bail!(
                "{unknown} after waiting {}s (--iface-timeout)",
                timeout.as_secs()
            );
        }
    }
    Ok(())
}

/// Claims what the agent needs: each interface's lock and the metrics
/// port. Nothing is attached yet.
fn claim(args: &Settings) -> anyhow::Result<(Vec<InterfaceLock>, std::net::TcpListener)> {
    for vanished in pins::vanished(loader::interface_exists) {
        loader::detach(&vanished.dir);
        let iface = vanished.iface;
        info!(%iface, "removed the pins of an interface that no longer exists");
    }
    // Another agent on one of the interfaces is the likelier conflict: say
    // so before anything else can fail.
    let locks = args
        .iface
        .iter()
        .map(|iface| InterfaceLock::acquire(iface))
        .collect::<Result<Vec<_>, _>>()?;
    // Before anything is attached: a busy port fails the start cleanly.
    let listener = std::net::TcpListener::bind(args.metrics).map_err(|err| {
        // Nothing was attached: the lock directories just made go again.
        for iface in &args.iface {
            let _ = std::fs::remove_dir(pins::dir(iface));
        }
        let _ = std::fs::remove_dir(pins::ROOT);
        anyhow::anyhow!(
            "cannot listen for metrics on {} (--metrics): {err}",
            args.metrics
        )
    })?;
    Ok((locks, listener))
}

/// Attaches every interface and sets up what the running agent watches.
/// A failed start removes what it added, on every interface: a filter an
/// earlier agent left in place stays.
fn start(
    args: &Settings,
    rules: PathBuf,
    config: &Config,
    rule_set: RuleSet,
    locks: Vec<InterfaceLock>,
    links: LinkWatch,
    status: Arc<Mutex<Status>>,
) -> anyhow::Result<Agent> {
    // Watching starts first: a change made while attaching is not missed.
    let files = FileWatch::new(&rules)?;
    // Services first: ACKs to local listeners are not return traffic.
    let mut watch = GuardWatch::new(&config.guard, args.metrics_hide_processes);
    let fresh: Vec<PathBuf> = args
        .iface
        .iter()
        .map(|iface| pins::dir(iface))
        .filter(|dir| !dir.join(pins::XDP_LINK).exists())
        .collect();
    let mut interfaces = Vec::new();
    for (iface, lock) in args.iface.iter().zip(locks) {
        let mode = args.xdp_mode;
        let rate = args.events_per_second;
        match Interface::attach(iface, lock, &rule_set, &watch.listeners, mode, rate) {
            Ok(interface) => interfaces.push(interface),
            Err(err) => {
                drop(interfaces);
                fresh.iter().for_each(|dir| loader::detach(dir));
                return Err(err);
            }
        }
    }
    interfaces.iter().for_each(|i| watch.baseline(i));
    let control = control_socket(&args.control_socket)?;
    let (low, high) = config.guard.ephemeral;
    info!(
        rules = %rules.display(),
        count = config.rules.len(),
        default = config.filter.default.name(),
        guard = ?config.guard.action,
        ephemeral = %format!("{low}-{high}"),
        "rules loaded"
    );
    Ok(Agent {
        rules,
        interfaces,
        rule_set: Arc::new(rule_set),
        watch,
        files,
        links,
        status,
        metrics: args.metrics,
        control,
        trial: None,
    })
}

/// The control socket at `path`, unless another agent already serves it
/// (agents on other interfaces of the host): then this one takes no trials.
fn control_socket(path: &std::path::Path) -> anyhow::Result<Option<trial::Control>> {
    let served_elsewhere = || {
        warn!(
            socket = %path.display(),
            "another agent serves the control socket: `filter-agent try` goes to that one"
        );
        Ok(None)
    };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return served_elsewhere();
    }
    match trial::Control::bind(path) {
        // Another agent bound it since the check: the same.
        Err(err)
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|err| err.kind() == std::io::ErrorKind::AddrInUse) =>
        {
            served_elsewhere()
        }
        bound => bound.map(Some),
    }
}

/// Tells systemd (`Type=notify`) about the agent's state; a no-op when not
/// run by systemd.
fn notify(state: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(false, state) {
        warn!(%err, "cannot notify systemd");
    }
}

fn lock(status: &Mutex<Status>) -> std::sync::MutexGuard<'_, Status> {
    status.lock().unwrap_or_else(|poison| poison.into_inner())
}
