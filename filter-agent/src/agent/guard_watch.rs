//! The agent's side of the guard: which local ports are services, and
//! summaries of out-of-range traffic and of the namespace audit.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
};

use tracing::warn;

use super::{interface::Interface, lock};
use crate::{
    host::audit,
    kernel::guard::{self, Listeners},
    metrics::Status,
    rules::config::GuardSettings,
};

/// Ports and peers named in a summary line.
const SUMMARY_TOP: usize = 5;

pub(super) struct GuardWatch {
    pub(super) settings: GuardSettings,
    /// UDP listeners of the previous scan: a UDP port becomes a service
    /// only when seen twice, so short-lived client sockets do not.
    previous_udp: BTreeSet<u16>,
    /// Per interface: out-of-range return and outbound counts at the last
    /// summary.
    last: HashMap<String, (u64, u64)>,
    /// The last scan's result.
    pub(super) listeners: Listeners,
    /// Findings already logged, so each is logged once.
    logged_findings: BTreeSet<(u64, String)>,
    /// `--metrics-hide-processes`.
    hide_processes: bool,
}

impl GuardWatch {
    pub(super) fn new(settings: &GuardSettings, hide_processes: bool) -> Self {
        let mut watch = Self {
            hide_processes,
            settings: settings.clone(),
            previous_udp: BTreeSet::new(),
            last: HashMap::new(),
            listeners: Listeners::default(),
            logged_findings: BTreeSet::new(),
        };
        watch.scan();
        watch
    }

    pub(super) fn on(&self) -> bool {
        self.settings.action != crate::rules::config::GuardAction::Off
    }

    /// Scans the listening sockets; UDP ones count only when the previous
    /// scan saw them too.
    pub(super) fn scan(&mut self) {
        let mut found = Listeners::discover();
        let stable_udp = found
            .udp
            .intersection(&self.previous_udp)
            .copied()
            .collect();
        self.previous_udp = std::mem::replace(&mut found.udp, stable_udp);
        self.listeners = found;
    }

    /// Gives the interface's program the services found by the last scan,
    /// and summarises what its guard counted since the last summary.
    pub(super) fn refresh(&mut self, interface: &mut Interface) {
        if let Err(err) = interface.set_services(&self.settings.services, &self.listeners) {
            warn!(iface = %interface.name, %err, "cannot update the guard's service ports");
        }
        self.summarise(interface);
    }

    /// Starts the summaries from the counts pinned now: what an earlier
    /// agent (or this one, while the guard was off) counted is not new.
    pub(super) fn baseline(&mut self, interface: &Interface) {
        if let Ok(report) = interface.guard_report() {
            self.last
                .insert(interface.name.clone(), report.out_of_range());
        }
    }

    /// One warning per interval in which out-of-range traffic was seen.
    fn summarise(&mut self, interface: &Interface) {
        let report = match interface.guard_report() {
            Ok(report) => report,
            Err(err) => {
                return warn!(iface = %interface.name, %err, "cannot read the guard's counters");
            }
        };
        let (returned, outbound) = report.out_of_range();
        let last = self.last.entry(interface.name.clone()).or_default();
        let (new_return, new_outbound) = (
            returned.saturating_sub(last.0),
            outbound.saturating_sub(last.1),
        );
        *last = (returned, outbound);
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
            iface = %interface.name,
            return_packets = new_return,
            outbound_attempts = new_outbound,
            top_ports = %ports.join(", "),
            "guard: traffic on local ports outside the ephemeral range {low}-{high} (see `filter-agent guard`)"
        );
    }

    /// Logs each new finding once, and publishes the open ones.
    pub(super) fn report_audit(
        &mut self,
        namespaces: &[audit::Namespace],
        upstream: Option<&crate::rules::config::Upstream>,
        status: &Mutex<Status>,
    ) {
        let mut open = Vec::new();
        let mut conntrack = Vec::new();
        let mut upstream_blocked = Vec::new();
        for ns in namespaces {
            let label = if self.hide_processes {
                ns.label_without_processes()
            } else {
                ns.label()
            };
            if let Some(table) = ns.conntrack {
                conntrack.push((label.clone(), table));
            }
            if let (Some(upstream), Some(range)) = (upstream, ns.port_range) {
                upstream_blocked.extend(upstream_series(upstream, &label, range));
            }
            for finding in &ns.findings {
                open.push((label.clone(), finding.kind.name()));
                if self
                    .logged_findings
                    .insert((ns.inode, finding.problem.clone()))
                {
                    warn!(
                        namespace = ?ns.label(),
                        fix = %finding.fix,
                        "audit: {}", finding.problem
                    );
                }
            }
        }
        let mut status = lock(status);
        status.findings = open;
        status.conntrack = conntrack;
        status.upstream_blocked = upstream_blocked;
    }
}

/// How many ports of `range` the upstream ACL blocks, per direction it
/// judges and protocol (zeros included, so an alert can see them clear).
fn upstream_series(
    upstream: &crate::rules::config::Upstream,
    namespace: &str,
    range: (u16, u16),
) -> Vec<crate::metrics::UpstreamBlocked> {
    use crate::rules::upstream::predict;
    let decided = predict::decide(&upstream.acl, range);
    let mut series: Vec<crate::metrics::UpstreamBlocked> = Vec::new();
    for d in decided {
        let ports = if d.allowed {
            0
        } else {
            u64::from(d.ports.1 - d.ports.0) + 1
        };
        match series
            .iter_mut()
            .find(|s| (s.direction, s.proto) == (d.direction, d.proto))
        {
            Some(existing) => existing.ports += ports,
            None => series.push(crate::metrics::UpstreamBlocked {
                namespace: namespace.to_owned(),
                acl: upstream.acl.id.clone(),
                direction: d.direction,
                proto: d.proto,
                ports,
            }),
        }
    }
    series
}
