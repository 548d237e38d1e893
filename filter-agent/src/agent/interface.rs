//! One interface the agent filters: its program, its rules and the device
//! it is attached to.

use std::path::PathBuf;

use anyhow::Context as _;
use filter_common::{guard as guard_stat, reason};
use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

use crate::{
    host::notrack,
    kernel::counters::{self, RuleCounts},
    kernel::guard::{GuardReport, Listeners},
    kernel::loader::{self, AttachMode, Attached, Filter},
    kernel::pins::{self, InterfaceLock},
    kernel::{events, layout},
    rules::compile::{RuleInfo, RuleSet},
    rules::config::GuardAction,
};

pub(super) struct Interface {
    pub(super) name: String,
    /// The device the filter is attached to: a re-created interface with
    /// the same name is another device, with another index.
    ifindex: u32,
    /// False while the interface is gone (or could not be attached again).
    pub(super) filtered: bool,
    /// A reload happened while it was gone: it needs the new rules.
    pub(super) behind: bool,
    pub(super) dir: PathBuf,
    mode: AttachMode,
    pub(super) event_rate: u32,
    filter: Filter,
    pub(super) rules: Vec<RuleInfo>,
    /// Per rule: what it counted under earlier rule sets.
    bases: Vec<RuleCounts>,
    _lock: InterfaceLock,
}

impl Interface {
    /// Loads `rule_set` for the (locked) interface and attaches it, taking
    /// over the links a previous agent left pinned (without a gap) if any.
    pub(super) fn attach(
        iface: &str,
        lock: InterfaceLock,
        rule_set: &RuleSet,
        listeners: &Listeners,
        mode: AttachMode,
        event_rate: u32,
    ) -> anyhow::Result<Self> {
        let dir = pins::dir(iface);
        // Read before attaching: a re-creation in between shows as a change.
        let ifindex = loader::if_index(iface).unwrap_or_default();
        take_over_pins(iface, &dir)?;
        let mut filter = load(rule_set, &dir, listeners, event_rate)?;
        if let Some(logger) = filter.logger() {
            forward_program_logs(logger)?;
        }
        notrack::apply(iface, &rule_set.notrack)?;
        let installed = filter.install(iface, mode, &dir, &rule_set.rules)?;
        if rule_set.guard.action != GuardAction::Off && !loader::has_tcx() {
            info!(
                %iface,
                kernel = %loader::kernel_version().map_or_else(String::new, |v| v.to_string()),
                "no TCX before Linux 6.6: the guard's egress program runs as a tc filter on a clsact qdisc instead (kept across restarts, removed by detach)"
            );
        }
        let generation = installed.generation;
        match installed.attached {
            Attached::Fresh(mode) => info!(%iface, mode, generation, "filter attached"),
            Attached::Adopted => info!(
                %iface,
                generation,
                "filter attached: took over the pinned filter, new rules swapped in without a gap"
            ),
        }
        Ok(Self {
            name: iface.to_owned(),
            ifindex,
            filtered: true,
            behind: false,
            dir,
            mode,
            event_rate,
            filter,
            rules: rule_set.rules.clone(),
            bases: installed.bases,
            _lock: lock,
        })
    }

    /// Loads `rule_set` for this interface, not yet attached.
    pub(super) fn load(&self, rule_set: &RuleSet, listeners: &Listeners) -> anyhow::Result<Filter> {
        load(rule_set, &self.dir, listeners, self.event_rate)
    }

    /// Puts `filter` (loaded with `rule_set`) in place of the running one.
    /// Its aya-log buffer is not read: the program logs only on a path that
    /// cannot be taken, and the first instance's forwarding shows whether
    /// it ever is.
    pub(super) fn swap(&mut self, mut filter: Filter, rule_set: &RuleSet) -> anyhow::Result<()> {
        // The conntrack bypass first: if nftables refuses it, nothing of
        // this interface has changed.
        notrack::apply(&self.name, &rule_set.notrack)?;
        let installed = filter.install(&self.name, self.mode, &self.dir, &rule_set.rules)?;
        info!(iface = %self.name, generation = installed.generation, "rules in force");
        self.filter = filter;
        self.rules = rule_set.rules.clone();
        self.bases = installed.bases;
        Ok(())
    }

    /// Follows the interface's device: when it was deleted, the interface
    /// is unfiltered until one with its name comes back; a new one gets the
    /// filter at once (the defunct pinned links are replaced).
    pub(super) fn follow_link(&mut self, rule_set: &RuleSet, listeners: &Listeners) {
        let now = loader::if_index(&self.name);
        if self.filtered && now == Some(self.ifindex) {
            return;
        }
        if std::mem::take(&mut self.filtered) {
            warn!(
                iface = %self.name,
                index = self.ifindex,
                "interface deleted: it is not filtered until an interface with its name comes back"
            );
        }
        let Some(index) = now else { return };
        let started = std::time::Instant::now();
        let attached = if self.behind {
            self.load(rule_set, listeners)
                .and_then(|filter| self.swap(filter, rule_set))
        } else {
            // The program it ran is still loaded: attached to the new
            // device as it is, without another pass of the verifier.
            self.filter
                .attach_pinned(&self.name, self.mode, &self.dir)
                .map(drop)
                .map_err(anyhow::Error::from)
        };
        match attached {
            Ok(()) => {
                self.ifindex = index;
                self.filtered = true;
                self.behind = false;
                info!(
                    iface = %self.name,
                    index,
                    took_ms = started.elapsed().as_millis() as u64,
                    "interface created again: filter attached"
                );
            }
            Err(err) => error!(
                iface = %self.name,
                index,
                "interface created again, but the filter cannot be attached; it stays unfiltered: {err:#}"
            ),
        }
    }

    pub(super) fn set_services(
        &mut self,
        services: &[(u16, u16)],
        listeners: &Listeners,
    ) -> Result<(), loader::LoadError> {
        self.filter.set_services(services, listeners)
    }

    pub(super) fn guard_report(&self) -> Result<GuardReport, loader::LoadError> {
        self.filter.guard_report()
    }

    /// Logs the counters and leaves the filter in place, or removes it.
    pub(super) fn stop(self, detach: bool) {
        let _ = std::fs::remove_file(events::socket_path(&self.name));
        let _ = std::fs::remove_dir(events::SOCKET_DIR);
        self.log_counters();
        if detach {
            info!(iface = %self.name, "detaching");
            loader::detach(&self.dir);
            if let Err(err) = notrack::remove(&self.name) {
                warn!(iface = %self.name, %err, "the notrack table stays");
            }
        } else {
            info!(
                iface = %self.name,
                "leaving the filter in place (fail-static); `filter-agent detach` removes it"
            );
        }
    }

    /// Per rule: name, action, total counts (earlier rule sets included).
    fn rule_totals(&self) -> anyhow::Result<Vec<(&RuleInfo, RuleCounts)>> {
        let decided = self.filter.rule_counters()?;
        let over_limit = self.filter.over_limit_counters()?;
        Ok(self
            .rules
            .iter()
            .zip(decided.into_iter().zip(over_limit))
            .zip(&self.bases)
            .map(|((rule, (decided, over_limit)), base)| {
                let mut total = *base;
                total.add(&RuleCounts {
                    decided,
                    over_limit,
                });
                (rule, total)
            })
            .collect())
    }

    fn log_counters(&self) {
        let iface = &self.name;
        match self.rule_totals() {
            Ok(totals) => {
                for (rule, counts) in totals {
                    let (packets, bytes) = (counts.decided.packets, counts.decided.bytes);
                    let action = rule.action.name();
                    info!(%iface, rule = rule.name, action, packets, bytes, "counted");
                    if rule.limit.is_some() {
                        let over = counts.over_limit;
                        let (packets, bytes) = (over.packets, over.bytes);
                        info!(%iface, rule = rule.name, packets, bytes, "over its rate limit");
                    }
                }
            }
            Err(err) => warn!(%iface, %err, "cannot read rule counters"),
        }
        match self.filter.counters() {
            Ok(reasons) => {
                for (reason, counter) in reason::NAMES.iter().zip(reasons) {
                    let (packets, bytes) = (counter.packets, counter.bytes);
                    info!(%iface, reason, packets, bytes, "counted");
                }
            }
            Err(err) => warn!(%iface, %err, "cannot read counters"),
        }
        if let Ok(report) = self.filter.guard_report() {
            for (guard, counter) in guard_stat::STAT_NAMES.iter().zip(report.stats) {
                let (packets, bytes) = (counter.packets, counter.bytes);
                info!(%iface, guard, packets, bytes, "counted");
            }
        }
    }
}

/// Makes the pins in `dir`, if any, ready for this release's program: a
/// newer layout is refused, maps whose shape changed start afresh. Says
/// what an older layout kept and what it reset.
fn take_over_pins(iface: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut wanted = loader::shared_map_shapes()?;
    wanted.push((pins::RULES, counters::RULE_TABLE));
    let Some(takeover) = layout::take_over(dir, iface, &wanted)? else {
        return Ok(());
    };
    for reset in &takeover.reset {
        warn!(%iface, map = %reset, "pinned map of another shape: counting starts afresh");
    }
    if takeover.from != layout::CURRENT {
        info!(
            %iface,
            from = takeover.from,
            to = layout::CURRENT,
            carried = %takeover.carried.join(" "),
            reset = %if takeover.reset.is_empty() { "none".to_owned() } else { takeover.reset.join("; ") },
            "taking over the pins of an older release"
        );
    }
    Ok(())
}

/// Loads `rule_set` with the interface's shared maps from `dir`.
fn load(
    rule_set: &RuleSet,
    dir: &std::path::Path,
    listeners: &Listeners,
    event_rate: u32,
) -> anyhow::Result<Filter> {
    let mut filter =
        Filter::load_pinned(rule_set, dir, event_rate).context("loading the XDP program")?;
    filter.set_services(&rule_set.guard.services, listeners)?;
    Ok(filter)
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
