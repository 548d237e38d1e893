//! The running agent: one handler per event source, called from one small
//! loop that waits for whichever comes first.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use filter_common::Event;
use sd_notify::NotifyState;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    time::{Instant, Interval, MissedTickBehavior, interval, interval_at},
};
use tracing::{error, info, warn};

use super::{
    AUDIT_EVERY, SUMMARY_EVERY,
    event_lines::EventLines,
    files::FileWatch,
    guard_watch::GuardWatch,
    interface::Interface,
    lock, notify, reload,
    trial::{self, Control, Trial},
};
use crate::{
    control, host::audit, kernel::guard::Listeners, kernel::links::LinkWatch, metrics::Status,
    rules::compile::RuleSet, rules::config::GuardSettings,
};

/// Everything the running agent works with.
pub(super) struct Agent {
    pub(super) rules: PathBuf,
    pub(super) interfaces: Vec<Interface>,
    /// The rules every filtered interface runs.
    pub(super) rule_set: Arc<RuleSet>,
    pub(super) watch: GuardWatch,
    pub(super) files: FileWatch,
    pub(super) links: LinkWatch,
    pub(super) status: Arc<Mutex<Status>>,
    pub(super) metrics: std::net::SocketAddr,
    /// `filter-agent try` and `confirm` (none when another agent has the
    /// socket).
    pub(super) control: Option<Control>,
    pub(super) trial: Option<Trial>,
}

/// SIGINT and SIGTERM stop the agent, SIGHUP reloads.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Self {
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
            hangup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Waits for SIGTERM or SIGINT; returns its name.
    async fn stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }

    /// Waits for any of the three: `Err` names a signal to stop on.
    async fn next(&mut self) -> Result<&'static str, &'static str> {
        tokio::select! {
            _ = self.terminate.recv() => Err("SIGTERM"),
            _ = self.interrupt.recv() => Err("SIGINT"),
            _ = self.hangup.recv() => Ok("SIGHUP"),
        }
    }
}

/// A timer that first fires one period from now, and after a stall once.
fn every(period: Duration) -> Interval {
    let mut timer = interval_at(Instant::now() + period, period);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    timer
}

impl Agent {
    /// Runs until SIGINT or SIGTERM.
    pub(super) async fn serve(&mut self) -> anyhow::Result<()> {
        let mut signals = Signals::install()?;
        let mut events = EventLines::start(self.interfaces.iter().map(|interface| {
            let reading = interface.event_rate > 0;
            (interface.name.as_str(), interface.dir.as_path(), reading)
        }))?;
        let (mut summaries, mut services) = (every(SUMMARY_EVERY), every(SUMMARY_EVERY));
        let mut audits = interval(AUDIT_EVERY);
        audits.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut watchdog = Watchdog::new();
        notify(&[NotifyState::Ready, NotifyState::Status(&self.filtering())]);
        let metrics = self.metrics;
        info!(%metrics, "ready: serving metrics at /metrics, watching the rules file, events for `filter-agent watch`");
        let mut again = false;
        loop {
            let guard_on = self.watch.on();
            let trigger = if std::mem::take(&mut again) {
                "the rules file changed during the last reload"
            } else {
                tokio::select! {
                    signal = signals.next() => match signal {
                        Ok(reload) => reload,
                        Err(stop) => {
                            info!("{stop} received");
                            return Ok(());
                        }
                    },
                    () = self.files.changed() => "the rules file changed",
                    pending = next_request(self.control.as_mut()) => { self.on_control(pending).await; continue }
                    () = trial::revert_due(self.trial.as_mut()) => { self.revert().await; continue }
                    (index, event) = events.next() => { self.on_event(&mut events, index, &event); continue }
                    _ = summaries.tick() => { events.summarise(self.names()); continue }
                    () = watchdog.due() => { notify(&[NotifyState::Watchdog]); continue }
                    changed = self.links.changed() => { self.on_link_change(changed); continue }
                    _ = services.tick(), if guard_on => { self.on_services_due(); continue }
                    _ = audits.tick(), if guard_on => { self.on_audit_due().await; continue }
                }
            };
            match self.on_reload(trigger, &mut signals).await? {
                Some(changed_meanwhile) => again = changed_meanwhile,
                None => return Ok(()),
            }
        }
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.interfaces
            .iter()
            .map(|interface| interface.name.as_str())
    }

    fn on_event(&self, events: &mut EventLines, index: usize, event: &Event) {
        let interface = &self.interfaces[index];
        let range = self.watch.settings.ephemeral;
        events.record(index, &interface.name, event, &interface.rules, range);
    }

    /// An interface may have been deleted or created: each follows its
    /// device, and `/healthz` says which are unfiltered.
    fn on_link_change(&mut self, changed: std::io::Result<()>) {
        if let Err(err) = changed {
            warn!(%err, "cannot read link events; checking the interfaces anyway");
        }
        for interface in &mut self.interfaces {
            interface.follow_link(&self.rule_set, &self.watch.listeners);
        }
        lock(&self.status).unfiltered = self
            .interfaces
            .iter()
            .filter(|interface| !interface.filtered)
            .map(|interface| interface.name.clone())
            .collect();
    }

    /// Rescans the local services and summarises the guard's counts.
    fn on_services_due(&mut self) {
        self.watch.scan();
        for interface in &mut self.interfaces {
            self.watch.refresh(interface);
        }
    }

    /// Audits every namespace, off the runtime.
    async fn on_audit_due(&mut self) {
        let range = self.watch.settings.ephemeral;
        let rule_set = Arc::clone(&self.rule_set);
        match tokio::task::spawn_blocking(move || audit::run(range, &rule_set.notrack)).await {
            Ok(namespaces) => {
                let upstream = self.rule_set.upstream.as_deref();
                self.watch.report_audit(&namespaces, upstream, &self.status)
            }
            Err(err) => warn!(%err, "namespace audit failed"),
        }
    }

    /// The unit's status text: what is being filtered, and a trial.
    pub(super) fn filtering(&self) -> String {
        let names: Vec<&str> = self.interfaces.iter().map(|i| i.name.as_str()).collect();
        let trial = self.trial.as_ref().map_or(String::new(), |trial| {
            format!(
                "; rules on trial until {}",
                control::clock(trial.deadline_unix)
            )
        });
        format!("filtering {}{trial}", names.join(", "))
    }

    /// Reloads the rules; `None` when a signal stopped the agent meanwhile,
    /// else whether the rules file changed again during the reload.
    async fn on_reload(
        &mut self,
        trigger: &'static str,
        signals: &mut Signals,
    ) -> anyhow::Result<Option<bool>> {
        notify(&[NotifyState::Reloading]);
        info!(trigger, "reloading");
        // Reading and compiling a big set takes seconds: off the runtime,
        // so that /healthz, /metrics and signals are served meanwhile.
        let path = self.rules.clone();
        let prepared = tokio::select! {
            prepared = tokio::task::spawn_blocking(move || reload::prepare(&path)) => {
                prepared.context("compiling the rules")?
            }
            signal = signals.stop() => {
                info!("{signal} received during a reload");
                return Ok(None);
            }
        };
        let guard_was_on = self.watch.on();
        let result = match prepared {
            Ok((config, rule_set, cut)) => {
                let count = config.rules.len();
                let swapped = self.swap_in(Arc::new(rule_set), config.guard, count).await;
                if swapped.is_ok() {
                    self.end_trial("the rules file was reloaded: its rules are in force");
                    for session in &cut {
                        warn!("the reloaded rules {session}");
                    }
                    lock(&self.status).reload_cut_sessions += cut.len() as u64;
                }
                swapped
            }
            Err(err) => Err(err),
        };
        if !guard_was_on {
            for interface in &self.interfaces {
                self.watch.baseline(interface);
            }
        }
        notify(&[NotifyState::Ready]);
        Ok(Some(self.reloaded(trigger, result)))
    }

    /// Puts the new rules (`count` of them) on every interface, off the
    /// runtime (loading means a pass of the verifier per interface);
    /// returns their count.
    pub(super) async fn swap_in(
        &mut self,
        new: Arc<RuleSet>,
        guard: GuardSettings,
        count: usize,
    ) -> anyhow::Result<usize> {
        // A new program starts from the scan: TCP listeners the running one
        // learnt from SYN-ACKs since the last one must be in it.
        self.watch.listeners.tcp = Listeners::discover().tcp;
        let listeners = self.watch.listeners.clone();
        let current = Arc::clone(&self.rule_set);
        let mut interfaces = std::mem::take(&mut self.interfaces);
        let swapping = Arc::clone(&new);
        let (interfaces, result) = tokio::task::spawn_blocking(move || {
            let result = reload::reload(&mut interfaces, &swapping, &listeners, &current);
            (interfaces, result)
        })
        .await
        .context("swapping the rules in")?;
        self.interfaces = interfaces;
        result?;
        self.rule_set = new;
        self.watch.settings = guard;
        Ok(count)
    }

    /// Records the reload's outcome in the status and the log, and watches
    /// the set files the new rules name; returns whether the rules file
    /// changed again meanwhile.
    fn reloaded(&mut self, trigger: &'static str, result: anyhow::Result<usize>) -> bool {
        let count = match result {
            Ok(count) => count,
            Err(err) => {
                lock(&self.status).reloads_failed += 1;
                let err = format!("{err:#}");
                error!(
                    trigger,
                    "reload rejected, the previous rules stay in force: {err}"
                );
                // Until the next good reload, `systemctl status` says so.
                let why = err.lines().next().unwrap_or_default();
                let status = format!("{}; reload rejected: {why}", self.filtering());
                notify(&[NotifyState::Status(&status)]);
                return false;
            }
        };
        notify(&[NotifyState::Status(&self.filtering())]);
        {
            let mut status = lock(&self.status);
            status.reloads_succeeded += 1;
            status.rules_loaded = count as u64;
        }
        // Set files may have come or gone. The new watch is in place before
        // the old one goes, and before the reload is reported, so that a
        // change made by whoever waits for that report is not missed.
        let changed_meanwhile = match FileWatch::new(&self.rules) {
            Ok(new) => std::mem::replace(&mut self.files, new).pending(),
            Err(err) => {
                warn!(err = %format!("{err:#}"), "cannot watch the rules file");
                false
            }
        };
        info!(rules = %self.rules.display(), count, trigger, "rules reloaded");
        changed_meanwhile
    }
}

/// The control socket's next request; pending forever without a socket.
async fn next_request(control: Option<&mut Control>) -> trial::Pending {
    match control {
        Some(control) => control.next().await,
        None => std::future::pending().await,
    }
}

/// systemd's watchdog (`WatchdogSec=`): due at half its deadline, checked
/// in the main loop so that a loop that stops turning stops the pings.
struct Watchdog(Option<Interval>);

impl Watchdog {
    fn new() -> Self {
        let mut usec = 0;
        let enabled = sd_notify::watchdog_enabled(false, &mut usec);
        Self(enabled.then(|| interval(Duration::from_micros(usec.max(2_000_000) / 2))))
    }

    async fn due(&mut self) {
        match &mut self.0 {
            Some(ticks) => drop(ticks.tick().await),
            None => std::future::pending().await,
        }
    }
}
