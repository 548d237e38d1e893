//! Namespace audit: every network namespace's ephemeral port range held
//! against the guard's, and NAT rules that do not pin source ports into it
//! (incidents 1 and 3 of shared/CONTEXT.md).
//!
//! [`discover`] and [`inspect`] read the host; [`findings`] and
//! [`nat_rules`] are pure.

mod containers;
mod untracked;

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread,
};

pub use containers::{Container, Runtime};

use crate::config::Rule;
use ipnet::Ipv4Net;
use serde::Serialize;

/// Directories where tools keep named network namespaces.
const NAMED_NETNS_DIRS: [&str; 3] = ["/run/netns", "/var/run/netns", "/run/docker/netns"];

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

/// Sums the named columns of `/proc/net/stat/nf_conntrack` (a header of
/// names, then a line of hexadecimal numbers per CPU).
pub fn conntrack_stat(text: &str) -> Conntrack {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let mut sums = Conntrack::default();
    for line in lines {
        for (name, value) in header.iter().zip(line.split_whitespace()) {
            let value = u64::from_str_radix(value, 16).unwrap_or(0);
            match *name {
                "drop" => sums.drop += value,
                "early_drop" => sums.early_drop += value,
                "insert_failed" => sums.insert_failed += value,
                _ => {}
            }
        }
    }
    sums
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// "port_range", "nat" or "conntrack".
    pub kind: &'static str,
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

/// Docker's MASQUERADE for one bridge network, and where it is.
struct DockerNat {
    bridge: String,
    subnet: Ipv4Net,
    /// How to run a command where the rule is.
    enter: String,
    /// The containers on the bridge.
    containers: Vec<String>,
}

impl DockerNat {
    /// Every Docker MASQUERADE rule in `namespaces`, with the containers
    /// behind it.
    fn all(namespaces: &[Namespace]) -> Vec<Self> {
        let mut found = Vec::new();
        for ns in namespaces {
            for rule in &ns.nat {
                if let (Some(bridge), Some(subnet)) = (&rule.docker_bridge, rule.source) {
                    let containers = namespaces
                        .iter()
                        .filter_map(|other| other.container.as_ref())
                        .filter(|c| c.addresses.iter().any(|address| subnet.contains(address)))
                        .map(Container::label)
                        .collect();
                    found.push(Self {
                        bridge: bridge.clone(),
                        subnet,
                        enter: ns.enter(),
                        containers,
                    });
                }
            }
        }
        found
    }

    /// Rules ahead of Docker's that map the bridge's TCP and UDP into
    /// `(low, high)`: one command to run as printed.
    fn pin(&self, (low, high): (u16, u16)) -> String {
        ["tcp", "udp"]
            .map(|protocol| {
                format!(
                    "{}iptables -t nat -I POSTROUTING -s {} ! -o {} -p {protocol} \
                     -j MASQUERADE --to-ports {low}-{high}",
                    self.enter, self.subnet, self.bridge
                )
            })
            .join(" && ")
    }
}

/// How to keep the rules [`DockerNat::pin`] inserts.
const KEEP_PINNED_NAT: &str = "dockerd re-creates only its own rules: save these with \
     netfilter-persistent (iptables-persistent) or run them from a unit ordered After=docker.service";

/// Judges every inspected namespace against the guard's `range`.
pub fn judge(namespaces: &mut [Namespace], range: (u16, u16)) {
    let docker = DockerNat::all(namespaces);
    for ns in namespaces {
        ns.findings = findings(ns, range, &docker);
    }
}

fn findings(ns: &Namespace, range: (u16, u16), docker: &[DockerNat]) -> Vec<Finding> {
    let (low, high) = range;
    let mut found = Vec::new();
    if let Some((from, to)) = ns.port_range
        && (from < low || to > high)
    {
        let bridge = ns.container.as_ref().and_then(|container| {
            docker.iter().find(|nat| {
                container
                    .addresses
                    .iter()
                    .any(|address| nat.subnet.contains(address))
            })
        });
        found.push(Finding {
            kind: "port_range",
            problem: format!(
                "ephemeral ports {from}-{to} are not inside the allowed return range \
                 {low}-{high}: connections from ports outside it will fail at random"
            ),
            fix: format!(
                "{}sysctl -w net.ipv4.ip_local_port_range=\"{low} {high}\"",
                ns.enter()
            ),
            keep: ns.keep_range(range),
            alternative: bridge.map(|nat| {
                format!(
                    "for every container on {} at once, map their ports in Docker's NAT \
                     (Docker has no daemon-wide sysctl default): {}",
                    nat.bridge,
                    nat.pin(range)
                )
            }),
        });
    }
    if let Some(table) = ns.conntrack {
        found.extend(conntrack_finding(table));
    }
    for (at, nat) in ns.nat.iter().enumerate() {
        let pinned = |(from, to): (u16, u16)| from >= low && to <= high;
        if nat.ports.is_some_and(pinned) || covered(&ns.nat[..at], nat, pinned) {
            continue;
        }
        let docker_nat = nat.docker_bridge.as_ref().and_then(|bridge| {
            docker
                .iter()
                .find(|d| &d.bridge == bridge && Some(d.subnet) == nat.source)
        });
        let finding = match (docker_nat, nat.ports) {
            (Some(docker_nat), None) => Finding {
                kind: "nat",
                problem: format!(
                    "Docker's MASQUERADE for {} ({}{}) has no port range: it keeps a \
                     container's source port unless another connection to the same destination \
                     holds it (the host's own, or another container's), and then moves it to a \
                     port from 1024 up, outside {low}-{high} whatever the container's \
                     ip_local_port_range: {}",
                    docker_nat.bridge,
                    docker_nat.subnet,
                    match docker_nat.containers.is_empty() {
                        true => String::new(),
                        false => format!("; {}", docker_nat.containers.join(", ")),
                    },
                    nat.rule
                ),
                fix: docker_nat.pin(range),
                keep: Some(KEEP_PINNED_NAT.to_owned()),
                alternative: None,
            },
            (_, None) => Finding {
                kind: "nat",
                problem: format!(
                    "source NAT without a port range may pick source ports outside \
                     {low}-{high} (from 1024 upward): {}",
                    nat.rule
                ),
                fix: pin_ports_advice(range),
                keep: None,
                alternative: None,
            },
            (_, Some((from, to))) => Finding {
                kind: "nat",
                problem: format!(
                    "source NAT maps to ports {from}-{to}, not inside {low}-{high}: {}",
                    nat.rule
                ),
                fix: pin_ports_advice(range),
                keep: None,
                alternative: None,
            },
        };
        found.push(finding);
    }
    found
}

/// A table over 80% full, or conntrack's silent drop counters above zero.
fn conntrack_finding(table: Conntrack) -> Option<Finding> {
    let full = table.max > 0 && table.entries * 5 > table.max * 4;
    let dropped: Vec<String> = table
        .drops()
        .iter()
        .filter(|(_, count)| *count > 0)
        .map(|(name, count)| format!("{name} {count}"))
        .collect();
    if !full && dropped.is_empty() {
        return None;
    }
    let mut facts = Vec::new();
    if full {
        facts.push(format!(
            "the conntrack table is {}% full ({} of {} entries): once full, new flows are dropped",
            table.entries * 100 / table.max,
            table.entries,
            table.max
        ));
    }
    if !dropped.is_empty() {
        facts.push(format!(
            "conntrack has dropped packets ({}, since the namespace began; see `conntrack -S`)",
            dropped.join(", ")
        ));
    }
    let max = (table.max * 2).max(65536);
    Some(Finding {
        kind: "conntrack",
        problem: facts.join("; "),
        // The table's size is the host's (the sysctl is global).
        fix: format!("sysctl -w net.netfilter.nf_conntrack_max={max}"),
        keep: Some(format!(
            "net.netfilter.nf_conntrack_max = {max} in /etc/sysctl.d/90-conntrack.conf"
        )),
        alternative: Some(
            "keep a public service's flows out of the table: `notrack = true` on its allow rule"
                .to_owned(),
        ),
    })
}

fn pin_ports_advice((low, high): (u16, u16)) -> String {
    format!(
        "pin the ports: nft `masquerade to :{low}-{high}` / `snat to ADDR:{low}-{high}`, \
         or iptables `-p tcp ... -j MASQUERADE --to-ports {low}-{high}` (and -p udp)"
    )
}

/// Whether rules `before` `rule` in its chain already map its sources'
/// TCP and UDP to pinned ports, so that it sees no TCP or UDP.
fn covered(before: &[NatRule], rule: &NatRule, pinned: impl Fn((u16, u16)) -> bool) -> bool {
    ["tcp", "udp"].iter().all(|protocol| {
        before.iter().any(|earlier| {
            earlier.chain == rule.chain
                && earlier.source == rule.source
                && earlier.protocol.as_deref() == Some(protocol)
                && earlier.ports.is_some_and(&pinned)
        })
    })
}

/// Source-NAT rules in `nft list ruleset` output, in order, with the port
/// range they pin (`masquerade to :32768-60999`, `snat to
/// 192.0.2.1:32768-60999`).
pub fn nat_rules(ruleset: &str) -> Vec<NatRule> {
    let (mut table, mut chain) = (String::new(), "");
    let mut rules = Vec::new();
    for line in ruleset.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["table", family, name, "{"] => table = format!("{family} {name}"),
            ["chain", name, "{"] => chain = name,
            _ if words.contains(&"masquerade") || words.contains(&"snat") => {
                let after = |first: &str, second: &str| {
                    words
                        .windows(3)
                        .find_map(|w| (w[0] == first && w[1] == second).then_some(w[2]))
                };
                let docker_bridge = after("oifname", "!=")
                    .map(|bridge| bridge.trim_matches('"'))
                    .filter(|bridge| *bridge == "docker0" || bridge.starts_with("br-"))
                    .filter(|_| words.last() == Some(&"masquerade"))
                    .map(str::to_owned);
                rules.push(NatRule {
                    rule: line.to_owned(),
                    chain: format!("{table} {chain}"),
                    ports: nat_ports(line),
                    source: after("ip", "saddr").and_then(|net| net.parse().ok()),
                    protocol: after("meta", "l4proto")
                        .or(after("ip", "protocol"))
                        .map(str::to_owned),
                    docker_bridge,
                });
            }
            _ => {}
        }
    }
    rules
}

fn nat_ports(rule: &str) -> Option<(u16, u16)> {
    let target = rule.split_whitespace().skip_while(|w| *w != "to").nth(1)?;
    let (_, ports) = target.rsplit_once(':')?;
    let ports = ports.trim_end_matches(|c: char| !c.is_ascii_digit());
    let (from, to) = ports.split_once('-').unwrap_or((ports, ports));
    Some((from.parse().ok()?, to.parse().ok()?))
}

/// Every network namespace on the host, found through /proc/*/ns/net and
/// the directories where `ip netns` and Docker keep named ones.
pub fn discover() -> Vec<Namespace> {
    let own = fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let mut found: BTreeMap<u64, Namespace> = BTreeMap::new();
    for dir in NAMED_NETNS_DIRS {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = fs::metadata(entry.path()) else {
                continue;
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            let name = if dir.contains("docker") {
                format!("docker:{name}")
            } else {
                name
            };
            let ns = entry_for(&mut found, own, meta.ino());
            if !ns.names.contains(&name) {
                ns.names.push(name);
            }
        }
    }
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let Ok(meta) = fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        let ns = entry_for(&mut found, own, meta.ino());
        if ns.pid.is_none() {
            ns.pid = Some(pid);
            ns.process = fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|comm| comm.trim().to_owned());
        }
        if ns.container.is_none() {
            ns.container = fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .ok()
                .and_then(|cgroup| containers::from_cgroup(&cgroup));
        }
    }
    let mut namespaces: Vec<Namespace> = found.into_values().collect();
    name_docker_containers(&mut namespaces);
    namespaces
}

/// Names Docker's containers and learns their addresses from its API.
/// Without an API socket they keep the id from their cgroup; a socket that
/// does not answer is noted on each.
fn name_docker_containers(namespaces: &mut [Namespace]) {
    let docker: Vec<&mut Namespace> = namespaces
        .iter_mut()
        .filter(|ns| {
            ns.container
                .as_ref()
                .is_some_and(|container| container.runtime == Runtime::Docker)
        })
        .collect();
    let Some(socket) = containers::docker_socket().filter(|_| !docker.is_empty()) else {
        return;
    };
    if !Path::new(&socket).exists() {
        return;
    }
    match containers::docker_containers(Path::new(&socket)) {
        Ok(listed) => {
            for container in docker.into_iter().filter_map(|ns| ns.container.as_mut()) {
                if let Some(entry) = listed.iter().find(|entry| entry.is(container)) {
                    entry.describe(container);
                }
            }
        }
        Err(err) => {
            let note = format!("Docker's API on {socket}: {err}; named by cgroup id only");
            for ns in docker {
                ns.error = Some(note.clone());
            }
        }
    }
}

/// The entry for namespace `inode`, created on first sight; `own` is the
/// agent's namespace.
fn entry_for(found: &mut BTreeMap<u64, Namespace>, own: Option<u64>, inode: u64) -> &mut Namespace {
    found.entry(inode).or_insert_with(|| Namespace {
        inode,
        host: Some(inode) == own,
        ..Namespace::default()
    })
}

/// Reads the port sysctls and NAT rules inside `ns` (from a thread that
/// enters it, so the host's own namespace is never left).
pub fn inspect(ns: &mut Namespace) {
    let path = match (ns.names.first(), ns.pid) {
        (Some(name), _) => named_path(name),
        (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        (None, None) => return,
    };
    let result = File::open(&path).and_then(|file| {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on this short-lived thread only.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let sysctl = |name: &str| {
                        fs::read_to_string(Path::new("/proc/sys/net/ipv4").join(name))
                            .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
                    };
                    let range = sysctl("ip_local_port_range")?;
                    let reserved = sysctl("ip_local_reserved_ports")?;
                    let conntrack = read_conntrack();
                    // Child processes start in this thread's namespace.
                    let ruleset = Command::new("nft")
                        .args(["list", "ruleset"])
                        .output()
                        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
                    Ok((range, reserved, ruleset, conntrack))
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("audit thread panicked")))
        })
    });
    match result {
        Ok((range, reserved, ruleset, conntrack)) => {
            ns.conntrack = conntrack;
            ns.port_range = parse_range(&range);
            ns.reserved_ports = Some(reserved).filter(|r| !r.is_empty());
            match ruleset {
                Ok(ruleset) => ns.nat = nat_rules(&ruleset),
                Err(err) => ns.error = Some(format!("cannot run nft: {err}")),
            }
        }
        Err(err) => ns.error = Some(format!("cannot enter {}: {err}", path.display())),
    }
}

/// The calling thread's namespace's conntrack table, if conntrack runs
/// there. The maximum is global; namespaces other than the first may show
/// it only under /proc/sys/net/nf_conntrack_max.
fn read_conntrack() -> Option<Conntrack> {
    let number = |path: &str| fs::read_to_string(path).ok()?.trim().parse::<u64>().ok();
    let entries = number("/proc/sys/net/netfilter/nf_conntrack_count")?;
    let max = number("/proc/sys/net/netfilter/nf_conntrack_max")
        .or_else(|| number("/proc/sys/net/nf_conntrack_max"))?;
    let stat = fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack").unwrap_or_default();
    Some(Conntrack {
        entries,
        max,
        ..conntrack_stat(&stat)
    })
}

fn named_path(name: &str) -> PathBuf {
    match name.strip_prefix("docker:") {
        Some(docker) => Path::new("/run/docker/netns").join(docker),
        None => Path::new("/run/netns").join(name),
    }
}

fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
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
mod tests {
    use super::*;

    const RULESET: &str = r#"table ip nat {
	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "eth0" counter packets 0 bytes 0 masquerade
		ip saddr 10.1.0.0/16 meta l4proto tcp counter packets 0 bytes 0 masquerade to :32768-60999
		ip saddr 10.2.0.0/16 meta l4proto udp snat to 192.0.2.1:1024-65535
	}
}
"#;

    /// What `nft list ruleset` shows of dockerd's NAT (through
    /// iptables-nft), once with the audit's fix inserted ahead of it.
    const DOCKER: &str = r#"table ip nat {
	chain DOCKER {
		iifname "docker0" counter packets 0 bytes 0 return
	}

	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		oifname != "docker0" ip saddr 10.213.0.0/24 counter packets 0 bytes 0 masquerade
	}
}
"#;
    const DOCKER_PINNED: &str = r#"table ip nat {
	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		oifname != "docker0" meta l4proto udp ip saddr 10.213.0.0/24 counter packets 0 bytes 0 masquerade to :49152-65535
		oifname != "docker0" meta l4proto tcp ip saddr 10.213.0.0/24 counter packets 0 bytes 0 masquerade to :49152-65535
		oifname != "docker0" ip saddr 10.213.0.0/24 counter packets 0 bytes 0 masquerade
	}
}
"#;

    fn judged(namespaces: &mut [Namespace], range: (u16, u16)) -> Vec<Vec<Finding>> {
        judge(namespaces, range);
        namespaces.iter().map(|ns| ns.findings.clone()).collect()
    }

    #[test]
    fn finds_nat_rules_and_their_port_ranges() {
        let rules = nat_rules(RULESET);
        let ports: Vec<_> = rules.iter().map(|rule| rule.ports).collect();
        assert_eq!(ports, vec![None, Some((32768, 60999)), Some((1024, 65535))]);
        assert!(rules[0].rule.starts_with("oifname \"eth0\""));
        assert_eq!(rules[1].chain, "ip nat POSTROUTING");
        assert_eq!(rules[2].protocol.as_deref(), Some("udp"));
        assert!(rules.iter().all(|rule| rule.docker_bridge.is_none()));
        assert!(nat_rules("table inet filter {\n}\n").is_empty());

        let docker = nat_rules(DOCKER);
        assert_eq!(docker.len(), 1);
        assert_eq!(docker[0].docker_bridge.as_deref(), Some("docker0"));
        assert_eq!(docker[0].source, Some("10.213.0.0/24".parse().unwrap()));
    }

    #[test]
    fn flags_ranges_and_nat_outside_the_guard() {
        let mut namespaces = [Namespace {
            inode: 7,
            names: vec!["blue".into()],
            port_range: Some((1024, 65000)),
            nat: nat_rules(RULESET),
            ..Namespace::default()
        }];
        let found = &judged(&mut namespaces, (32768, 60999))[0];
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found[0].problem.contains("1024-65000"));
        assert_eq!(
            found[0].fix,
            "ip netns exec blue sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\""
        );
        assert!(found[1].problem.contains("without a port range"));
        assert!(found[2].problem.contains("1024-65535"));

        let ns = &mut namespaces[0];
        ns.port_range = Some((32768, 60999));
        ns.nat.clear();
        assert!(judged(&mut namespaces, (32768, 60999))[0].is_empty());
        namespaces[0].port_range = Some((40000, 50000));
        assert!(judged(&mut namespaces, (32768, 60999))[0].is_empty());
    }

    fn docker_container(pid: u32, range: (u16, u16)) -> Namespace {
        let id = "4f8e2c0a".repeat(8);
        let mut container = containers::from_cgroup(&format!("0::/docker/{id}\n")).unwrap();
        container.name = Some("web".into());
        container.addresses = vec!["10.213.0.2".parse().unwrap()];
        Namespace {
            pid: Some(pid),
            container: Some(container),
            port_range: Some(range),
            ..Namespace::default()
        }
    }

    #[test]
    fn docker_findings_speak_dockers_language() {
        let dockerd = Namespace {
            names: vec!["engine".into()],
            port_range: Some((49152, 65535)),
            nat: nat_rules(DOCKER),
            ..Namespace::default()
        };
        let mut namespaces = [dockerd, docker_container(4242, (32768, 60999))];
        let found = judged(&mut namespaces, (49152, 65535));

        let nat = &found[0][0];
        assert!(
            nat.problem.starts_with(
                "Docker's MASQUERADE for docker0 (10.213.0.0/24; docker web (4f8e2c0a4f8e))"
            ),
            "{}",
            nat.problem
        );
        assert!(nat.problem.contains("from 1024 up"));
        let pin = "ip netns exec engine iptables -t nat -I POSTROUTING -s 10.213.0.0/24 ! -o docker0 \
                   -p tcp -j MASQUERADE --to-ports 49152-65535 && ip netns exec engine iptables -t nat \
                   -I POSTROUTING -s 10.213.0.0/24 ! -o docker0 -p udp -j MASQUERADE --to-ports 49152-65535";
        assert_eq!(nat.fix, pin);

        let range = &found[1][0];
        assert_eq!(
            range.fix,
            "nsenter --target 4242 --net sysctl -w net.ipv4.ip_local_port_range=\"49152 65535\""
        );
        assert_eq!(
            range.keep.as_deref(),
            Some(
                "start the container with docker run --sysctl net.ipv4.ip_local_port_range=\"49152 65535\" ..."
            )
        );
        assert!(
            range
                .alternative
                .as_deref()
                .unwrap_or_default()
                .ends_with(pin)
        );
        assert!(
            namespaces[1]
                .label()
                .contains("container docker web (4f8e2c0a4f8e)")
        );

        // Docker's rule behind the pinned ones takes no TCP or UDP.
        namespaces[0].nat = nat_rules(DOCKER_PINNED);
        let pinned = judged(&mut namespaces, (49152, 65535));
        assert!(pinned[0].is_empty(), "{:#?}", pinned[0]);
        // Not pinned into a narrower range: the range, both rules, Docker's.
        assert_eq!(judged(&mut namespaces, (50000, 65535))[0].len(), 4);
    }

    #[test]
    fn keeps_are_in_each_runtimes_form() {
        let keep = |cgroup: &str| {
            let mut namespaces = [Namespace {
                pid: Some(1),
                container: containers::from_cgroup(cgroup),
                port_range: Some((1024, 65535)),
                ..Namespace::default()
            }];
            judged(&mut namespaces, (49152, 65535))[0][0]
                .keep
                .clone()
                .unwrap_or_default()
        };
        assert!(keep("0::/lxc.payload.db/init.scope").starts_with(
            "incus config set db linux.sysctl.net.ipv4.ip_local_port_range=\"49152 65535\""
        ));
        assert!(
            keep("0::/machine.slice/systemd-nspawn@web.service")
                .starts_with("inside the machine: net.ipv4.ip_local_port_range = 49152 65535")
        );
        assert!(
            keep(&format!("0::/kubepods/pod1/{}", "a".repeat(64)))
                .contains("securityContext.sysctls")
        );
        let host = Namespace {
            host: true,
            port_range: Some((1024, 65535)),
            ..Namespace::default()
        };
        let found = &judged(&mut [host], (49152, 65535))[0][0];
        assert!(found.fix.starts_with("sysctl -w"));
        assert!(
            found
                .keep
                .as_deref()
                .unwrap_or_default()
                .contains("/etc/sysctl.d/")
        );
    }

    #[test]
    fn conntrack_full_or_dropping_is_flagged() {
        let stat = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
0000000f  00000000 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000001 0000001a 00000000 00000000  00000000 00000000 00000000 00000000
0000000f  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000006 00000003 00000000  00000000 00000000 00000000 00000000
";
        let counted = conntrack_stat(stat);
        assert_eq!(
            (counted.drop, counted.early_drop, counted.insert_failed),
            (32, 3, 1)
        );
        let calm = Conntrack {
            entries: 100,
            max: 512,
            ..Conntrack::default()
        };
        assert_eq!(conntrack_finding(calm), None);
        let full = conntrack_finding(Conntrack {
            entries: 500,
            ..calm
        })
        .unwrap();
        assert!(
            full.problem
                .starts_with("the conntrack table is 97% full (500 of 512 entries)")
        );
        assert_eq!(full.fix, "sysctl -w net.netfilter.nf_conntrack_max=65536");
        let dropping = conntrack_finding(Conntrack { ..counted }).unwrap();
        assert!(
            dropping
                .problem
                .contains("drop 32, early_drop 3, insert_failed 1"),
            "{}",
            dropping.problem
        );
    }
}
