//! Incident 3 (Docker + AWS Network ACL): a container on Docker's default
//! bridge behind Docker's own MASQUERADE (a real engine, testbed's, in the
//! host's namespace), and a stateless ACL upstream that allows only source
//! ports 49152-65535. NAT keeps the container's port, so connections fail
//! whenever the container picks one below 49152; the host itself, whose
//! range was fixed, is fine. Then Docker's port reuse: once the host has
//! talked to a destination from a port, a container's connection from the
//! same port to it is moved by MASQUERADE to a port from 1024 up, so even
//! a container with the right range loses some; pinning the MASQUERADE's
//! ports (the audit's fix for the bridge) ends that too.

use std::{collections::BTreeSet, io, net::SocketAddr, path::Path};

use anyhow::{Context as _, ensure};
use testbed::{
    Chain, Netns, TestbedError,
    docker::{Container, Docker},
    traffic::{self, Responder},
};

use crate::{
    Agent, nft,
    ports::{self, Attempts, LINUX_DEFAULT, list},
    say, step,
};

const PORT: u16 = 443;
/// The host's own connections go to another port: the same public address
/// and ports would otherwise collide with its earlier connections in the
/// NAT table, and MASQUERADE would pick another source port (from 1024 up).
const HOST_PORT: u16 = 8443;
/// Where the host and the container both connect, from the same ports.
const SHARED_PORT: u16 = 8080;
/// Docker's default bridge (docker0) in the host's namespace.
const BRIDGE: &str = "10.213.0.1/24";
/// What the ACL allows (and the range AWS's guide suggests for Linux).
const ALLOWED: (u16, u16) = (49152, 65535);
const CONNECTIONS: usize = 20;

/// The host only watches: every packet passes, the guard counts.
const RULES: &str = r#"
[filter]
default = "allow"

[guard]
ephemeral = "49152-65535"
"#;

#[derive(Debug)]
pub struct Outcome {
    pub host: Attempts,
    pub container: Attempts,
    /// Post-NAT source ports the host's egress guard recorded out of range.
    pub egress_ports: BTreeSet<u16>,
    pub fix: String,
    pub after: Attempts,
    /// The container's connections from ports the host had used to the
    /// same destination, and the low ports MASQUERADE moved them to.
    pub reused: Attempts,
    pub moved_ports: BTreeSet<u16>,
    /// The same after the audit pinned Docker's MASQUERADE.
    pub pinned: Attempts,
}

pub fn run(binary: &Path) -> anyhow::Result<Outcome> {
    step!(
        "docker-nacl: a Docker container behind Docker's own MASQUERADE; upstream, a stateless ACL \
         that allows only source ports {}-{} (and replies to them)",
        ALLOWED.0,
        ALLOWED.1
    );
    let chain = Chain::create("dkr", &["host", "acl", "srv"])?;
    let (host, acl) = (chain.client(), &chain.namespaces[1]);
    let uplink = chain.left_if(0);
    let docker = Docker::start(host, BRIDGE)?;
    let ctr = docker.run("ctr", &[])?;
    let container = &ctr.netns;
    upstream_acl(&chain)?;
    let _service = Responder::start(chain.server(), PORT)?;
    let _host_service = Responder::start(chain.server(), HOST_PORT)?;
    let _shared_service = Responder::start(chain.server(), SHARED_PORT)?;
    let server = SocketAddr::from((chain.server_addr(), PORT));
    say!(
        "namespaces: container {} (Docker's, on docker0 {BRIDGE}; ip_local_port_range {}-{}, \
         the kernel's default), host {} (range {}-{}, dockerd and its MASQUERADE, filter-agent \
         counting on {uplink}), ACL {}, server {}",
        container.name(),
        LINUX_DEFAULT.0,
        LINUX_DEFAULT.1,
        host.name(),
        ALLOWED.0,
        ALLOWED.1,
        acl.name(),
        chain.server().name()
    );
    let agent = Agent::start(binary, host, &[&uplink], RULES)?;

    let (host_attempts, container_attempts) = first_attempts(&chain, container, server)?;
    let egress_ports = what_filter_agent_shows(
        binary,
        &agent,
        &docker,
        &ctr,
        [host, container],
        &uplink,
        &container_attempts,
    )?;
    let (fix, after) = ports::fix_and_retry(
        &agent,
        Some(docker.host()),
        container,
        server,
        ALLOWED,
        CONNECTIONS,
    )?;

    let (reused, moved_ports, pinned) =
        port_reuse(&agent, &docker, &chain, container, &egress_ports)?;
    agent.stop()?;
    Ok(Outcome {
        host: host_attempts,
        container: container_attempts,
        egress_ports,
        fix,
        after,
        reused,
        moved_ports,
        pinned,
    })
}

/// The stateless ACL in its own namespace, passing only source ports (and
/// replies to them) in the allowed range; the host's own range inside it.
fn upstream_acl(chain: &Chain) -> anyhow::Result<()> {
    let (host, acl) = (chain.client(), &chain.namespaces[1]);
    nft(
        acl,
        &format!(
            "table ip fa_nacl {{ chain forward {{ type filter hook forward priority 0;\n\
             iifname \"{}\" tcp sport != {lo}-{hi} drop\n\
             iifname \"{}\" tcp dport != {lo}-{hi} drop\n}}\n}}\n",
            chain.right_if(0),
            chain.left_if(1),
            lo = ALLOWED.0,
            hi = ALLOWED.1
        ),
    )?;
    host.sysctl(
        "net.ipv4.ip_local_port_range",
        &format!("{} {}", ALLOWED.0, ALLOWED.1),
    )?;
    Ok(())
}

/// Connections from the host, all answered, and from the container, which
/// fail exactly from the ports outside the ACL's range.
fn first_attempts(
    chain: &Chain,
    container: &Netns,
    server: SocketAddr,
) -> anyhow::Result<(Attempts, Attempts)> {
    let host = chain.client();
    let host_server = SocketAddr::from((chain.server_addr(), HOST_PORT));
    let host_attempts = ports::connect_many(host, host_server, ALLOWED, CONNECTIONS)?;
    say!(
        "{} connections from the host: {} answered",
        host_attempts.total(),
        host_attempts.answered.len()
    );
    ensure!(
        host_attempts.failed.is_empty(),
        "the host failed: {host_attempts:?}"
    );
    let container_attempts = ports::connect_many(container, server, LINUX_DEFAULT, CONNECTIONS)?;
    say!(
        "{} connections from the container: {} answered, {} not; failed from {}",
        container_attempts.total(),
        container_attempts.answered.len(),
        container_attempts.failed.len(),
        list(&container_attempts.failed)
    );
    ensure!(
        container_attempts.failed_exactly_outside(ALLOWED),
        "failures are not exactly the ports outside {ALLOWED:?}: {container_attempts:?}"
    );

    Ok((host_attempts, container_attempts))
}

/// The egress guard names the failed ports; `audit --upstream` predicts
/// them from the ACL; `audit` names the container from Docker's API.
fn what_filter_agent_shows(
    binary: &Path,
    agent: &Agent,
    docker: &Docker,
    ctr: &Container,
    [host, container]: [&Netns; 2],
    uplink: &str,
    container_attempts: &Attempts,
) -> anyhow::Result<BTreeSet<u16>> {
    step!("what filter-agent shows: `filter-agent guard --iface {uplink}` on the host");
    let egress_ports = ports::guard_ports(agent, uplink, "egress")?;
    say!(
        "connection attempts that left the host from source ports (after NAT) outside the range: {}",
        list(&egress_ports)
    );
    ensure!(
        egress_ports == container_attempts.failed,
        "the egress guard did not name exactly the failed ports: {egress_ports:?}"
    );
    let Prediction {
        blocked: predicted,
        nat,
    } = predicted_blocked(binary, container.name(), host.name())?;
    say!(
        "`filter-agent audit --upstream` predicts it from the ACL as AWS would print it: replies \
         to the container's TCP ports {} are dropped (rule 100 lets 49152-65535 in, the default \
         denies the rest); on the host it flags Docker's masquerade without a port range: {}",
        predicted
            .iter()
            .map(|(lo, hi)| format!("{lo}-{hi}"))
            .collect::<Vec<_>>()
            .join(", "),
        nat.join(", ")
    );
    ensure!(
        nat.iter().any(|rule| rule.contains("masquerade")),
        "audit --upstream did not flag Docker's MASQUERADE: {nat:?}"
    );
    let blocked = |port: &u16| predicted.iter().any(|&(lo, hi)| lo <= *port && *port <= hi);
    ensure!(
        container_attempts.failed.iter().all(blocked)
            && !container_attempts.answered.iter().any(blocked),
        "the prediction {predicted:?} and the failures {container_attempts:?} disagree"
    );
    let document = agent.audit(Some(docker.host()))?;
    let label = ports::audited(&document, container.name())?["container"].clone();
    let field = |name: &str| label[name].as_str().unwrap_or("?").to_owned();
    say!(
        "`filter-agent audit` names it from Docker's API: {} {} ({})",
        field("runtime"),
        field("name"),
        field("id")
    );
    ensure!(
        label["name"] == container.name()
            && ctr.id.starts_with(label["id"].as_str().unwrap_or("-")),
        "the audit did not name the container {} ({}): {label}",
        container.name(),
        ctr.id
    );
    Ok(egress_ports)
}

/// Docker's MASQUERADE moves a reused port below the range; pinned by the
/// audit's fix, it no longer does.
fn port_reuse(
    agent: &Agent,
    docker: &Docker,
    chain: &Chain,
    container: &Netns,
    egress_ports: &BTreeSet<u16>,
) -> anyhow::Result<(Attempts, BTreeSet<u16>, Attempts)> {
    let (host, uplink) = (chain.client(), chain.left_if(0));
    step!(
        "Docker's port reuse: the host connects to {} from {CONNECTIONS} ports, then the container \
         (now in range) from the same ports to the same place",
        SocketAddr::from((chain.server_addr(), SHARED_PORT))
    );
    let shared = SocketAddr::from((chain.server_addr(), SHARED_PORT));
    let reported = egress_ports.clone();
    let (reused, moved_ports, host_failed) =
        from_the_hosts_ports(agent, &uplink, [host, container], shared, 0, &reported)?;
    ensure!(
        !reused.failed.is_empty() && !moved_ports.is_empty(),
        "no connection from a port the host had used failed: {reused:?}"
    );
    ensure!(
        moved_ports
            .iter()
            .all(|&port| !ports::within(ALLOWED, port))
            && moved_ports.len() <= reused.failed.len() + host_failed,
        "the guard's new ports are not the failed connections' moved ports: {moved_ports:?}"
    );
    let document = agent.audit(Some(docker.host()))?;
    let nat = ports::finding(ports::audited(&document, host.name())?, "nat")?;
    say!(
        "`filter-agent audit` on {}: {}",
        host.name(),
        nat["problem"].as_str().unwrap_or("?")
    );
    ensure!(
        nat["problem"]
            .as_str()
            .is_some_and(|p| p.contains(container.name())),
        "the audit's NAT finding does not name the container: {nat}"
    );
    ports::apply(nat)?;
    let reported = &reported | &moved_ports;
    let (pinned, still_moved, host_failed) =
        from_the_hosts_ports(agent, &uplink, [host, container], shared, 1, &reported)?;
    ensure!(
        pinned.failed.is_empty() && still_moved.len() <= host_failed,
        "still failing with Docker's MASQUERADE pinned: {pinned:?}, moved to {still_moved:?}"
    );
    Ok((reused, moved_ports, pinned))
}

/// The scenario's ACL as `aws ec2 describe-network-acls` would print it:
/// TCP replies in to 49152-65535 only, everything out.
const NACL: &str = r#"{"NetworkAcls": [{"Associations": [], "Entries": [
 {"CidrBlock": "0.0.0.0/0", "Egress": false, "PortRange": {"From": 49152, "To": 65535}, "Protocol": "6", "RuleAction": "allow", "RuleNumber": 100},
 {"CidrBlock": "0.0.0.0/0", "Egress": false, "Protocol": "-1", "RuleAction": "deny", "RuleNumber": 32767},
 {"CidrBlock": "0.0.0.0/0", "Egress": true, "Protocol": "-1", "RuleAction": "allow", "RuleNumber": 100},
 {"CidrBlock": "0.0.0.0/0", "Egress": true, "Protocol": "-1", "RuleAction": "deny", "RuleNumber": 32767}],
 "IsDefault": false, "NetworkAclId": "acl-0d0c4e7a1b2c3d4e5", "OwnerId": "111122223333", "Tags": [],
 "VpcId": "vpc-0fedcba9876543210"}]}"#;

/// What `audit --upstream` predicts for the scenario.
struct Prediction {
    /// The container's TCP ports whose replies are dropped, as ranges.
    blocked: Vec<(u16, u16)>,
    /// The NAT rules it flags on the host.
    nat: Vec<String>,
}

/// `filter-agent audit --upstream` with [`NACL`], for the container's
/// namespace `name` and the host's namespace `host`.
fn predicted_blocked(binary: &Path, name: &str, host: &str) -> anyhow::Result<Prediction> {
    let file = std::env::temp_dir().join(format!("fa-nacl-{}.json", std::process::id()));
    std::fs::write(&file, NACL)?;
    let output = std::process::Command::new(binary)
        .args(["audit", "--upstream"])
        .arg(&file)
        .args(["--upstream-format", "aws-nacl", "--json"])
        .output();
    std::fs::remove_file(&file)?;
    let output = output?;
    // Exit 1: something is flagged, as it should be here.
    ensure!(
        output.status.code() == Some(1),
        "audit --upstream flagged nothing: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let document: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let listed = |name: &str| {
        document["namespaces"]
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|ns| ns["namespace"].as_str().is_some_and(|l| l.contains(name)))
            })
            .with_context(|| format!("audit --upstream did not list {name}"))
    };
    let namespace = listed(name)?;
    let nat = listed(host)?["nat"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|rule| rule["blocked"].as_array().is_some_and(|b| !b.is_empty()))
        .filter_map(|rule| rule["rule"].as_str().map(str::to_owned))
        .collect::<Vec<String>>();
    let blocked = namespace["blocked"]
        .as_array()
        .context("no blocked ranges")?
        .iter()
        .filter(|b| b["proto"] == "tcp" && b["direction"] == "inbound")
        .filter_map(|b| {
            Some((
                b["ports"][0].as_u64()? as u16,
                b["ports"][1].as_u64()? as u16,
            ))
        })
        .collect();
    Ok(Prediction { blocked, nat })
}

/// The host connects to `server` from a fixed port, then `container` from
/// the same port, [`CONNECTIONS`] times (ports of set `round`):
/// MASQUERADE finds each post-NAT address and port taken and moves the
/// container's connection. Returns the container's attempts (by its own
/// ports), the egress guard's out-of-range ports that are new beyond
/// `reported`, and how many of the host's own connections failed: the
/// kernel moves one whose port a container connection already took
/// (conntrack's clash resolution), so it may leave out of range too.
fn from_the_hosts_ports(
    agent: &Agent,
    uplink: &str,
    [host, container]: [&Netns; 2],
    server: SocketAddr,
    round: u16,
    reported: &BTreeSet<u16>,
) -> anyhow::Result<(Attempts, BTreeSet<u16>, usize)> {
    let first = ALLOWED.0 + 1000 + round * 7000;
    let mut candidates = (first..first + 7000).step_by(200);
    let mut attempts = Attempts::default();
    let mut failed_here = 0;
    while attempts.total() < CONNECTIONS {
        let port = candidates
            .next()
            .context("too few free ports for the connections")?;
        // Skipped when the host still holds the port, or when its
        // connection fails because a container connection of this round
        // left through MASQUERADE from that same port to the same server
        // (with the pinned range, it picks ports from 49152 up at random).
        match attempt_from(host, server, port)? {
            Some((true, _)) => {}
            Some((false, _)) => {
                failed_here += 1;
                ensure!(
                    failed_here <= 3,
                    "the host's connections keep failing (last from {port})"
                );
                continue;
            }
            None => continue,
        }
        if let Some(attempt) = attempt_from(container, server, port)? {
            attempts.record(attempt);
        }
    }
    let egress = ports::guard_ports(agent, uplink, "egress")?;
    let moved: BTreeSet<u16> = egress.difference(reported).copied().collect();
    say!(
        "{} connections from the container, each from a port the host had used: {} answered, {} \
         not; the egress guard saw them leave from {} ({failed_here} of the host's own \
         connections failed)",
        attempts.total(),
        attempts.answered.len(),
        attempts.failed.len(),
        list(&moved)
    );
    Ok((attempts, moved, failed_here))
}

/// One connection from `port`, or `None` when the namespace still holds
/// the port (its own earlier connection from it, in TIME_WAIT).
fn attempt_from(ns: &Netns, server: SocketAddr, port: u16) -> anyhow::Result<Option<(bool, u16)>> {
    match traffic::tcp_attempt(ns, server, Some(port)) {
        Ok(attempt) => Ok(Some(attempt)),
        Err(TestbedError::Socket { source, .. }) if source.kind() == io::ErrorKind::AddrInUse => {
            Ok(None)
        }
        Err(err) => Err(err.into()),
    }
}
