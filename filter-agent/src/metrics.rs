//! Prometheus metrics. Counters are read from the pinned maps at scrape
//! time, so they are exactly what `filter-agent stats` shows and continue
//! across reloads and restarts; the agent's own state (reloads, audit
//! findings) comes from [`Status`]. Per-CPU values are summed.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{MetricType, gauge::ConstGauge},
    registry::Registry,
};

use filter_common::{guard, reason};

use crate::{kernel::counters, kernel::guard::GuardReport, kernel::layout, kernel::pins};

/// Every metric name starts with this.
pub const PREFIX: &str = "filter_agent";

/// What the agent itself knows, shared with the scrape handler.
#[derive(Debug, Default)]
pub struct Status {
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    /// Rules in the rules file: the implicit neighbour-discovery rule,
    /// which `stats` lists, is not counted.
    pub rules_loaded: u64,
    /// Interfaces the agent should filter and cannot (deleted, or not
    /// attached again): `/healthz` fails while there is one.
    pub unfiltered: std::collections::BTreeSet<String>,
    /// Open audit findings: (namespace, kind).
    pub findings: Vec<(String, &'static str)>,
    /// Each namespace's conntrack table at the last audit.
    pub conntrack: Vec<(String, crate::host::audit::Conntrack)>,
    /// With `[upstream]`: per namespace, the ports of each direction and
    /// protocol whose traffic the cloud's ACL would drop, at the last audit.
    pub upstream_blocked: Vec<UpstreamBlocked>,
    /// While rules are on trial (`filter-agent try`): when they go back.
    pub trial_deadline_unix: Option<u64>,
    /// Trials that ended without a confirm: the previous rules came back.
    pub trial_reverts: u64,
    /// Established sessions that reloads applied anyway would cut.
    pub reload_cut_sessions: u64,
}

/// One series of `filter_agent_upstream_blocked_ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamBlocked {
    pub namespace: String,
    pub acl: String,
    pub direction: &'static str,
    pub proto: &'static str,
    pub ports: u64,
}

/// The collector behind `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    ifaces: Vec<String>,
    status: Arc<Mutex<Status>>,
}

impl Metrics {
    /// A registry with the collector for `ifaces`.
    pub fn registry(ifaces: Vec<String>, status: Arc<Mutex<Status>>) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Metrics { ifaces, status }));
        registry
    }
}

/// One sample of a labelled family.
type Sample = (Vec<(&'static str, String)>, u64);

/// Packets and bytes, per labelled series, of one counter family pair.
#[derive(Default)]
struct Counted {
    packets: Vec<Sample>,
    bytes: Vec<Sample>,
}

impl Counted {
    fn push(&mut self, labels: Vec<(&'static str, String)>, counter: &filter_common::Counter) {
        self.packets.push((labels.clone(), counter.packets));
        self.bytes.push((labels, counter.bytes));
    }
}

impl Metrics {
    /// What the pinned maps counted: (rules, rate limits, reasons, guard).
    fn read_pinned(&self) -> (Counted, Counted, Counted, Counted) {
        let (mut rules, mut limits, mut reasons, mut guard) = Default::default();
        for iface in &self.ifaces {
            let dir = pins::dir(iface);
            let with = |key: &'static str, value: &str| {
                vec![("iface", iface.clone()), (key, value.to_owned())]
            };
            // An interface whose pins cannot be read is left out of this
            // scrape rather than failing all of it.
            if let Ok(snapshot) = counters::read_snapshot(&dir) {
                for rule in &snapshot.rules {
                    let mut labels = with("rule", &rule.name);
                    labels.push(("action", rule.action.name().to_owned()));
                    Counted::push(&mut rules, labels, &rule.counts.decided);
                    if rule.limited {
                        let labels = with("rule", &rule.name);
                        Counted::push(&mut limits, labels, &rule.counts.over_limit);
                    }
                }
                for (name, counter) in reason::NAMES.iter().zip(&snapshot.reasons) {
                    Counted::push(&mut reasons, with("reason", name), counter);
                }
            }
            if let Ok(report) = GuardReport::read_pinned(&dir) {
                for (name, counter) in guard::STAT_NAMES.iter().zip(&report.stats) {
                    Counted::push(&mut guard, with("kind", name), counter);
                }
            }
        }
        (rules, limits, reasons, guard)
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (rules, limits, reasons, guard) = self.read_pinned();
        let status = self
            .status
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let reloads = [
            (
                vec![("result", "success".to_owned())],
                status.reloads_succeeded,
            ),
            (
                vec![("result", "failure".to_owned())],
                status.reloads_failed,
            ),
        ];
        let counters: [(&str, &str, &[Sample]); 9] = [
            (
                "rule_packets",
                "Packets decided by each rule.",
                &rules.packets,
            ),
            ("rule_bytes", "Bytes decided by each rule.", &rules.bytes),
            (
                "rule_over_limit_packets",
                "Packets a rule matched and its rate limit dropped (counted only in monitor mode).",
                &limits.packets,
            ),
            (
                "rule_over_limit_bytes",
                "Bytes a rule matched and its rate limit dropped.",
                &limits.bytes,
            ),
            (
                "packets",
                "Packets no rule decided, by reason (default_allow, default_deny, malformed, ...).",
                &reasons.packets,
            ),
            ("bytes", "Bytes no rule decided, by reason.", &reasons.bytes),
            (
                "guard_packets",
                "Ephemeral-port guard: return traffic and outbound attempts inside and outside the range.",
                &guard.packets,
            ),
            (
                "guard_bytes",
                "Ephemeral-port guard, in bytes.",
                &guard.bytes,
            ),
            (
                "reloads",
                "Rule reloads (SIGHUP or a changed file), by result.",
                &reloads,
            ),
        ];
        for (name, help, samples) in counters {
            let name = format!("{PREFIX}_{name}");
            let mut family = encoder.encode_descriptor(&name, help, None, MetricType::Counter)?;
            for (labels, value) in samples {
                family
                    .encode_family(labels)?
                    .encode_counter::<NoLabelSet, _, u64>(value, None)?;
            }
        }
        encode_trial(&mut encoder, &status)?;
        self.encode_gauges(&mut encoder, &status)
    }
}

/// Rules on trial (`filter-agent try`): whether, until when, and how many
/// trials went back for want of a confirm.
fn encode_trial(encoder: &mut DescriptorEncoder, status: &Status) -> Result<(), std::fmt::Error> {
    let gauges = [
        (
            "trial_active",
            "1 while rules are on trial (filter-agent try), waiting for filter-agent confirm.",
            i64::from(status.trial_deadline_unix.is_some()),
        ),
        (
            "trial_deadline_seconds",
            "When the rules on trial go back unless confirmed (Unix time); 0 without a trial.",
            status.trial_deadline_unix.map_or(0, |at| at as i64),
        ),
    ];
    for (name, help, value) in gauges {
        let gauge = ConstGauge::new(value);
        let name = format!("{PREFIX}_{name}");
        gauge.encode(encoder.encode_descriptor(&name, help, None, gauge.metric_type())?)?;
    }
    let counters = [
        (
            "trial_reverts",
            "Trials whose deadline passed without a confirm: the previous rules came back.",
            status.trial_reverts,
        ),
        (
            "reload_cut_sessions",
            "Established TCP sessions that a reload of the rules file (applied anyway) would cut.",
            status.reload_cut_sessions,
        ),
    ];
    for (name, help, value) in counters {
        let name = format!("{PREFIX}_{name}");
        encoder
            .encode_descriptor(&name, help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

impl Metrics {
    fn encode_gauges(
        &self,
        encoder: &mut DescriptorEncoder,
        status: &Status,
    ) -> Result<(), std::fmt::Error> {
        let rules = ConstGauge::new(status.rules_loaded as i64);
        let name = format!("{PREFIX}_rules_loaded");
        let help = "Rules in the running rule set.";
        rules.encode(encoder.encode_descriptor(&name, help, None, rules.metric_type())?)?;

        let name = format!("{PREFIX}_interface_filtered");
        let help = "1 while the interface is filtered, 0 while it is not (deleted, or not attached again).";
        let mut family = encoder.encode_descriptor(&name, help, None, MetricType::Gauge)?;
        for iface in &self.ifaces {
            let filtered = i64::from(!status.unfiltered.contains(iface));
            family
                .encode_family(&vec![("iface", iface.clone())])?
                .encode_gauge(&filtered)?;
        }

        let name = format!("{PREFIX}_rules_generation");
        let help = "Rule sets put in force on the interface so far (start, reload, trial), as its pins record; it rises by one with each and survives restarts and upgrades.";
        let mut family = encoder.encode_descriptor(&name, help, None, MetricType::Gauge)?;
        for iface in &self.ifaces {
            if let Ok(Some(pinned)) = layout::read(&pins::dir(iface)) {
                family
                    .encode_family(&vec![("iface", iface.clone())])?
                    .encode_gauge(&(pinned.generation as i64))?;
            }
        }

        let name = format!("{PREFIX}_build_info");
        let help = "The running filter-agent's version.";
        let mut info = encoder.encode_descriptor(&name, help, None, MetricType::Gauge)?;
        info.encode_family(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])?
            .encode_gauge(&1i64)?;
        self.encode_audit_gauges(encoder, status)
    }

    /// What the last namespace audit found: findings, conntrack tables and
    /// the ports an upstream ACL would block.
    fn encode_audit_gauges(
        &self,
        encoder: &mut DescriptorEncoder,
        status: &Status,
    ) -> Result<(), std::fmt::Error> {
        let name = format!("{PREFIX}_audit_findings");
        let help = "Open namespace audit findings (1 per finding), by namespace and kind (port_range, nat, conntrack, notrack).";
        let mut family = encoder.encode_descriptor(&name, help, None, MetricType::Gauge)?;
        for (namespace, kind) in &status.findings {
            let labels = vec![
                ("namespace", namespace.clone()),
                ("kind", (*kind).to_owned()),
            ];
            family.encode_family(&labels)?.encode_gauge(&1i64)?;
        }

        for (name, help, value) in [
            (
                "conntrack_entries",
                "Entries in the namespace's conntrack table, at the last audit (every minute).",
                (|table: &crate::host::audit::Conntrack| table.entries) as fn(&_) -> u64,
            ),
            (
                "conntrack_max",
                "The conntrack table's maximum (nf_conntrack_max), at the last audit.",
                |table| table.max,
            ),
        ] {
            let name = format!("{PREFIX}_{name}");
            let mut family = encoder.encode_descriptor(&name, help, None, MetricType::Gauge)?;
            for (namespace, table) in &status.conntrack {
                family
                    .encode_family(&vec![("namespace", namespace.clone())])?
                    .encode_gauge(&(value(table) as i64))?;
            }
        }
        let name = format!("{PREFIX}_upstream_blocked_ports");
        let help = "With [upstream]: ports of the namespace's ephemeral range whose traffic the cloud's ACL would drop (inbound replies, outbound packets), by protocol, at the last audit (every minute).";
        let mut family = encoder.encode_descriptor(&name, help, None, MetricType::Gauge)?;
        for series in &status.upstream_blocked {
            let labels = vec![
                ("namespace", series.namespace.clone()),
                ("acl", series.acl.clone()),
                ("direction", series.direction.to_owned()),
                ("proto", series.proto.to_owned()),
            ];
            family
                .encode_family(&labels)?
                .encode_gauge(&(series.ports as i64))?;
        }

        let name = format!("{PREFIX}_conntrack_drops");
        let help = "Packets conntrack dropped silently in the namespace (drop, early_drop, insert_failed of /proc/net/stat/nf_conntrack), at the last audit.";
        let mut family = encoder.encode_descriptor(&name, help, None, MetricType::Counter)?;
        for (namespace, table) in &status.conntrack {
            for (kind, count) in table.drops() {
                let labels = vec![("namespace", namespace.clone()), ("kind", kind.to_owned())];
                family
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
            }
        }
        Ok(())
    }
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The registry in the Prometheus text format (0.0.4), which every scraper
/// and `promtool check metrics` read. The library escapes label values, so
/// a hostile process or interface name cannot break the page.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, registry);
    text
}
