//! Namespace audit: every network namespace's ephemeral port range held
//! against the guard's, NAT rules that do not pin source ports into it,
//! conntrack tables near full, and host rulesets that drop what `notrack`
//! keeps out of conntrack (incidents 1 to 3 of docs/incidents.md).
//!
//! [`discovery`] reads the host (the only I/O); [`parse`] reads what it
//! shows and [`findings`] judges it, both pure; [`run`] does all three.

mod containers;
mod discovery;
mod findings;
mod parse;
mod untracked;

use std::process::Command;

pub use containers::{Container, Runtime};
pub use discovery::{discover, inspect};
pub use findings::judge;
pub use parse::{conntrack_stat, nat_rules};

use crate::rules::config::Rule;
use ipnet::Ipv4Net;
use serde::Serialize;

/// One network namespace and what the audit read in it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Namespace {
    /// The namespace's inode (as in `net:[INODE]`).
    pub inode: u64,
    /// The filter-agent's own namespace (normally the host's).
    pub host: bool,
    /// Names under /run/netns (`ip netns`) or /run/docker/netns.
    pub names: Vec<String>,
    /// A process that lives in it, its command name and container.
    pub pid: Option<u32>,
    pub process: Option<String>,
    pub container: Option<Container>,
    /// `net.ipv4.ip_local_port_range` and `ip_local_reserved_ports`.
    pub port_range: Option<(u16, u16)>,
    pub reserved_ports: Option<String>,
    /// Source-NAT rules (`nft list ruleset`, which shows iptables-nft too).
    pub nat: Vec<NatRule>,
    /// The conntrack table, when conntrack runs in the namespace.
    pub conntrack: Option<Conntrack>,
    /// Why something could not be read, if so.
    pub error: Option<String>,
    /// Filled by [`judge`].
    pub findings: Vec<Finding>,
}

/// A namespace's conntrack table and the counters of its silent drops
/// (`/proc/net/stat/nf_conntrack`, summed over CPUs; they never reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Conntrack {
    pub entries: u64,
    pub max: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
}

impl Conntrack {
    /// The drop counters by name.
    pub fn drops(&self) -> [(&'static str, u64); 3] {
        [
            ("drop", self.drop),
            ("early_drop", self.early_drop),
            ("insert_failed", self.insert_failed),
        ]
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NatRule {
    /// The rule as `nft` prints it.
    pub rule: String,
    /// Its table and chain ("ip nat POSTROUTING").
    pub chain: String,
    /// The source port range it maps to, if it pins one.
    pub ports: Option<(u16, u16)>,
    /// The sources and the protocol it applies to, if it says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Ipv4Net>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The bridge, when this is Docker's MASQUERADE for a bridge network
    /// (`-s SUBNET ! -o BRIDGE -j MASQUERADE`, on docker0 or br-ID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_bridge: Option<String>,
}

/// What a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// The namespace's ephemeral port range reaches outside the guard's.
    PortRange,
    /// A source-NAT rule may pick ports outside it.
    Nat,
    /// The conntrack table is near full or has dropped packets.
    Conntrack,
    /// The host's ruleset drops what a `notrack = true` rule keeps out of
    /// conntrack.
    Notrack,
}

impl FindingKind {
    /// The name in JSON and in the metrics' `kind` label.
    pub fn name(self) -> &'static str {
        match self {
            FindingKind::PortRange => "port_range",
            FindingKind::Nat => "nat",
            FindingKind::Conntrack => "conntrack",
            FindingKind::Notrack => "notrack",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub problem: String,
    /// What to do now: one command to run as printed, where there is one.
    pub fix: String,
    /// How to make the fix outlive a reboot or a new container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<String>,
    /// A fix for every container of a runtime at once, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alternative: Option<String>,
}

impl Namespace {
    /// How an operator recognises the namespace.
    pub fn label(&self) -> String {
        self.label_with(true)
    }

    /// The label without the container and the process in it (pid and
    /// command name), which not every reader should see.
    pub fn label_without_processes(&self) -> String {
        self.label_with(false)
    }

    fn label_with(&self, processes: bool) -> String {
        let mut parts = Vec::new();
        if self.host {
            parts.push("host".to_owned());
        }
        parts.extend(self.names.iter().cloned());
        if let (true, Some(container)) = (processes, &self.container) {
            parts.push(format!("container {}", container.label()));
        }
        if let (true, Some(pid), Some(process)) = (processes, self.pid, &self.process) {
            parts.push(format!("pid {pid} {process}"));
        }
        match parts.is_empty() {
            true => format!("net:[{}]", self.inode),
            false => format!("{} (net:[{}])", parts.join(", "), self.inode),
        }
    }

    /// What runs a command inside this namespace from the host's ("" for
    /// the host itself).
    fn enter(&self) -> String {
        if self.host {
            return String::new();
        }
        match (self.names.first(), self.pid) {
            (Some(name), _) if !name.starts_with("docker:") => format!("ip netns exec {name} "),
            (_, Some(pid)) => format!("nsenter --target {pid} --net "),
            _ => String::new(),
        }
    }

    /// How to keep `range` as the ephemeral range of this namespace, in
    /// the form its owner applies.
    fn keep_range(&self, (low, high): (u16, u16)) -> Option<String> {
        let setting = format!("net.ipv4.ip_local_port_range=\"{low} {high}\"");
        let sysctl_d = format!(
            "net.ipv4.ip_local_port_range = {low} {high} in /etc/sysctl.d/90-ephemeral.conf"
        );
        if self.host {
            return Some(sysctl_d);
        }
        let container = self.container.as_ref()?;
        Some(match container.runtime {
            Runtime::Docker => {
                format!("start the container with docker run --sysctl {setting} ...")
            }
            Runtime::Podman => {
                format!("start the container with podman run --sysctl {setting} ...")
            }
            Runtime::Kubernetes => format!(
                "in the pod spec: securityContext.sysctls: [{{name: net.ipv4.ip_local_port_range, \
                 value: \"{low} {high}\"}}] (a safe sysctl)"
            ),
            Runtime::SystemdNspawn => format!("inside the machine: {sysctl_d}"),
            Runtime::Incus => format!(
                "incus config set {} linux.sysctl.{setting}",
                container.name.as_deref().unwrap_or("NAME")
            ),
            Runtime::Oci => return None,
        })
    }
}

/// Discovers, inspects and judges every namespace against `range`, and
/// the host's own ruleset against the `notrack` rules of the rule set.
pub fn run(range: (u16, u16), notrack: &[Rule]) -> Vec<Namespace> {
    let mut namespaces = discover();
    namespaces.iter_mut().for_each(inspect);
    judge(&mut namespaces, range);
    if notrack.iter().any(|rule| rule.notrack)
        && let Some(host) = namespaces.iter_mut().find(|ns| ns.host)
    {
        match Command::new("nft").args(["-j", "list", "ruleset"]).output() {
            Ok(listed) => match serde_json::from_slice(&listed.stdout) {
                Ok(json) => host.findings.extend(untracked::findings(&json, notrack)),
                Err(err) => host.error = Some(format!("cannot read `nft -j list ruleset`: {err}")),
            },
            Err(err) => host.error = Some(format!("cannot run nft: {err}")),
        }
    }
    namespaces
}

#[cfg(test)]
mod tests;
