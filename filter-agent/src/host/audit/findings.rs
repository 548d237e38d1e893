//! The findings: each namespace's port range, NAT rules and conntrack
//! table judged against the guard's range, with the fix in the form its
//! owner (sysctl, Docker, nftables) takes. Pure.

use ipnet::Ipv4Net;

use super::{Conntrack, Container, Finding, FindingKind, Namespace, NatRule};

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
        found.push(port_range_finding(ns, (from, to), range, docker));
    }
    if let Some(table) = ns.conntrack {
        found.extend(conntrack_finding(table));
    }
    for (at, nat) in ns.nat.iter().enumerate() {
        let pinned = |(from, to): (u16, u16)| from >= low && to <= high;
        if nat.ports.is_some_and(pinned) || covered(&ns.nat[..at], nat, pinned) {
            continue;
        }
        found.push(nat_finding(nat, range, docker));
    }
    found
}

/// The namespace's own range, `from`-`to`, reaches outside `range`.
fn port_range_finding(
    ns: &Namespace,
    (from, to): (u16, u16),
    range: (u16, u16),
    docker: &[DockerNat],
) -> Finding {
    let (low, high) = range;
    let bridge = ns.container.as_ref().and_then(|container| {
        docker.iter().find(|nat| {
            container
                .addresses
                .iter()
                .any(|address| nat.subnet.contains(address))
        })
    });
    Finding {
        kind: FindingKind::PortRange,
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
    }
}

/// A source-NAT rule that does not pin its ports inside `range`.
fn nat_finding(nat: &NatRule, (low, high): (u16, u16), docker: &[DockerNat]) -> Finding {
    let range = (low, high);
    let docker_nat = nat.docker_bridge.as_ref().and_then(|bridge| {
        docker
            .iter()
            .find(|d| &d.bridge == bridge && Some(d.subnet) == nat.source)
    });
    match (docker_nat, nat.ports) {
        (Some(docker_nat), None) => Finding {
            kind: FindingKind::Nat,
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
            kind: FindingKind::Nat,
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
            kind: FindingKind::Nat,
            problem: format!(
                "source NAT maps to ports {from}-{to}, not inside {low}-{high}: {}",
                nat.rule
            ),
            fix: pin_ports_advice(range),
            keep: None,
            alternative: None,
        },
    }
}

/// A table over 80% full, or conntrack's silent drop counters above zero.
pub(super) fn conntrack_finding(table: Conntrack) -> Option<Finding> {
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
        kind: FindingKind::Conntrack,
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
