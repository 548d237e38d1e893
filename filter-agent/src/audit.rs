//! Namespace audit: every network namespace's ephemeral port range held
//! against the guard's, and NAT rules that do not pin source ports into it
//! (incidents 1 and 3 of shared/CONTEXT.md).
//!
//! [`discover`] and [`inspect`] read the host; [`findings`] and
//! [`nat_rules`] are pure.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread,
};

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
    /// A process that lives in it, its command name and container id.
    pub pid: Option<u32>,
    pub process: Option<String>,
    pub container: Option<String>,
    /// `net.ipv4.ip_local_port_range` and `ip_local_reserved_ports`.
    pub port_range: Option<(u16, u16)>,
    pub reserved_ports: Option<String>,
    /// Source-NAT rules (`nft list ruleset`, which shows iptables-nft too).
    pub nat: Vec<NatRule>,
    /// Why something could not be read, if so.
    pub error: Option<String>,
    /// Filled by [`findings`].
    pub findings: Vec<Finding>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NatRule {
    /// The rule as `nft` prints it.
    pub rule: String,
    /// The source port range it maps to, if it pins one.
    pub ports: Option<(u16, u16)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// "port_range" or "nat".
    pub kind: &'static str,
    pub problem: String,
    /// What to do now; for a port range, one command to run as printed.
    pub fix: String,
    /// How to make the fix outlive a reboot or a new container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<String>,
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
            parts.push(format!("container {container}"));
        }
        if let (true, Some(pid), Some(process)) = (processes, self.pid, &self.process) {
            parts.push(format!("pid {pid} {process}"));
        }
        match parts.is_empty() {
            true => format!("net:[{}]", self.inode),
            false => format!("{} (net:[{}])", parts.join(", "), self.inode),
        }
    }

    /// The command that sets `range` as this namespace's ephemeral range,
    /// and how to keep it.
    fn range_fix(&self, (low, high): (u16, u16)) -> (String, Option<String>) {
        let sysctl = format!("sysctl -w net.ipv4.ip_local_port_range=\"{low} {high}\"");
        if self.host {
            let keep = format!(
                "net.ipv4.ip_local_port_range = {low} {high} in /etc/sysctl.d/90-ephemeral.conf"
            );
            return (sysctl, Some(keep));
        }
        let now = match (self.names.first(), self.pid) {
            (Some(name), _) if !name.starts_with("docker:") => {
                format!("ip netns exec {name} {sysctl}")
            }
            (_, Some(pid)) => format!("nsenter --target {pid} --net {sysctl}"),
            _ => sysctl,
        };
        let keep = self.container.as_ref().map(|_| {
            format!(
                "start the container with docker run --sysctl \
                 net.ipv4.ip_local_port_range=\"{low} {high}\" ..."
            )
        });
        (now, keep)
    }
}

/// Judges one inspected namespace against the guard's `range`.
pub fn findings(ns: &Namespace, range: (u16, u16)) -> Vec<Finding> {
    let (low, high) = range;
    let mut found = Vec::new();
    if let Some((from, to)) = ns.port_range
        && (from < low || to > high)
    {
        let (fix, keep) = ns.range_fix(range);
        found.push(Finding {
            kind: "port_range",
            problem: format!(
                "ephemeral ports {from}-{to} are not inside the allowed return range \
                 {low}-{high}: connections from ports outside it will fail at random"
            ),
            fix,
            keep,
        });
    }
    for nat in &ns.nat {
        let problem = match nat.ports {
            None => format!(
                "source NAT without a port range may pick source ports outside \
                 {low}-{high} (from 1024 upward): {}",
                nat.rule
            ),
            Some((from, to)) if from < low || to > high => format!(
                "source NAT maps to ports {from}-{to}, not inside {low}-{high}: {}",
                nat.rule
            ),
            Some(_) => continue,
        };
        found.push(Finding {
            kind: "nat",
            problem,
            fix: format!(
                "pin the ports: nft `masquerade to :{low}-{high}` / `snat to ADDR:{low}-{high}`, \
                 or iptables `-p tcp ... -j MASQUERADE --to-ports {low}-{high}` (and -p udp)"
            ),
            keep: None,
        });
    }
    found
}

/// Source-NAT rules in `nft list ruleset` output, with the port range they
/// pin (`masquerade to :32768-60999`, `snat to 192.0.2.1:32768-60999`).
pub fn nat_rules(ruleset: &str) -> Vec<NatRule> {
    ruleset
        .lines()
        .map(str::trim)
        .filter(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            words.contains(&"masquerade") || words.contains(&"snat")
        })
        .map(|line| NatRule {
            rule: line.to_owned(),
            ports: nat_ports(line),
        })
        .collect()
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
                .and_then(|cgroup| container_id(&cgroup));
        }
    }
    found.into_values().collect()
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

/// A container id (12 hex digits) in a `/proc/PID/cgroup` file, as Docker,
/// containerd and Podman name their cgroups.
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup.split(['/', '-', '.', ':', '\n']).find_map(|part| {
        (part.len() == 64 && part.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| part[..12].to_owned())
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
                    // Child processes start in this thread's namespace.
                    let ruleset = Command::new("nft")
                        .args(["list", "ruleset"])
                        .output()
                        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
                    Ok((range, reserved, ruleset))
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("audit thread panicked")))
        })
    });
    match result {
        Ok((range, reserved, ruleset)) => {
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

/// Discovers, inspects and judges every namespace against `range`.
pub fn run(range: (u16, u16)) -> Vec<Namespace> {
    let mut namespaces = discover();
    for ns in &mut namespaces {
        inspect(ns);
        ns.findings = findings(ns, range);
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

    #[test]
    fn finds_nat_rules_and_their_port_ranges() {
        let rules = nat_rules(RULESET);
        let ports: Vec<_> = rules.iter().map(|rule| rule.ports).collect();
        assert_eq!(ports, vec![None, Some((32768, 60999)), Some((1024, 65535))]);
        assert!(rules[0].rule.starts_with("oifname \"eth0\""));
        assert!(nat_rules("table inet filter {\n}\n").is_empty());
    }

    #[test]
    fn flags_ranges_and_nat_outside_the_guard() {
        let mut ns = Namespace {
            inode: 7,
            names: vec!["blue".into()],
            port_range: Some((1024, 65000)),
            nat: nat_rules(RULESET),
            ..Namespace::default()
        };
        let found = findings(&ns, (32768, 60999));
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found[0].problem.contains("1024-65000"));
        assert_eq!(
            found[0].fix,
            "ip netns exec blue sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\""
        );
        assert!(found[1].problem.contains("without a port range"));
        assert!(found[2].problem.contains("1024-65535"));

        ns.port_range = Some((32768, 60999));
        ns.nat.clear();
        assert!(findings(&ns, (32768, 60999)).is_empty());
        ns.port_range = Some((40000, 50000));
        assert!(findings(&ns, (32768, 60999)).is_empty());
    }

    #[test]
    fn fixes_name_the_way_into_the_namespace() {
        let container = Namespace {
            pid: Some(4242),
            container: Some("0123456789ab".into()),
            port_range: Some((1024, 65535)),
            ..Namespace::default()
        };
        let finding = &findings(&container, (49152, 65535))[0];
        assert_eq!(
            finding.fix,
            "nsenter --target 4242 --net sysctl -w net.ipv4.ip_local_port_range=\"49152 65535\""
        );
        let keep = finding.keep.as_deref().unwrap_or_default();
        assert!(keep.contains("docker run --sysctl net.ipv4.ip_local_port_range=\"49152 65535\""));
        let host = Namespace {
            host: true,
            port_range: Some((1024, 65535)),
            ..Namespace::default()
        };
        assert!(
            findings(&host, (49152, 65535))[0]
                .fix
                .starts_with("sysctl -w")
        );
    }

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = "4f8e2c0a".repeat(8);
        for cgroup in [
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("12:pids:/docker/{id}\n"),
            format!("0::/kubepods/burstable/pod1/cri-containerd-{id}.scope\n"),
        ] {
            assert_eq!(container_id(&cgroup).as_deref(), Some("4f8e2c0a4f8e"));
        }
        assert_eq!(container_id("0::/user.slice/session-1.scope\n"), None);
    }
}
