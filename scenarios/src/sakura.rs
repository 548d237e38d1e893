//! Incident 1 (Sakura Cloud): a container's ephemeral range is 1024-65000,
//! the stateless filter in front of the VM lets TCP replies reach only
//! 32768-61000, so connections fail whenever the kernel picks a low port.

use std::{collections::BTreeSet, net::SocketAddr, path::Path};

use anyhow::ensure;
use testbed::{Chain, traffic::Responder};

use crate::{
    Agent,
    ports::{self, Attempts, list},
    say, step,
};

const PORT: u16 = 22;
const CONTAINER_RANGE: (u16, u16) = (1024, 65000);
/// Sakura Cloud's preset for return traffic.
const ALLOWED: (u16, u16) = (32768, 61000);
const CONNECTIONS: usize = 20;

/// The stateless filter on the VM's uplink: TCP replies only to 32768-61000.
const RULES: &str = r#"
[filter]
default = "deny"

[guard]
ephemeral = "32768-61000"

[[rule]]
name = "tcp-return"
action = "allow"
proto = "tcp"
tcp_flags = "ack"
dport = "32768-61000"
"#;

#[derive(Debug)]
pub struct Outcome {
    pub before: Attempts,
    /// Local ports the egress guard recorded leaving out of range.
    pub egress_ports: BTreeSet<u16>,
    /// Local ports the ingress guard recorded replies to, out of range.
    pub ingress_ports: BTreeSet<u16>,
    pub fix: String,
    pub after: Attempts,
}

pub fn run(binary: &Path) -> anyhow::Result<Outcome> {
    step!(
        "sakura: a container with ip_local_port_range {}-{} behind a stateless filter \
         that lets TCP replies reach only {}-{}",
        CONTAINER_RANGE.0,
        CONTAINER_RANGE.1,
        ALLOWED.0,
        ALLOWED.1
    );
    let chain = Chain::create("sak", &["ctr", "vm", "srv"])?;
    let (container, vm) = (chain.client(), &chain.namespaces[1]);
    let uplink = chain.left_if(1);
    container.sysctl(
        "net.ipv4.ip_local_port_range",
        &format!("{} {}", CONTAINER_RANGE.0, CONTAINER_RANGE.1),
    )?;
    let _ssh = Responder::start(chain.server(), PORT)?;
    let server = SocketAddr::from((chain.server_addr(), PORT));
    say!(
        "namespaces: container {}, VM {} (the stateless filter: filter-agent on its uplink {uplink}), server {}",
        container.name(),
        vm.name(),
        chain.server().name()
    );
    let agent = Agent::start(binary, vm, &[&uplink], RULES)?;

    let before = ports::connect_many(container, server, CONTAINER_RANGE, CONNECTIONS)?;
    say!(
        "{} connections to {server} from the container: {} answered, {} not",
        before.total(),
        before.answered.len(),
        before.failed.len()
    );
    say!("  failed from local ports {}", list(&before.failed));
    ensure!(
        before.failed_exactly_outside(ALLOWED),
        "failures are not exactly the ports outside {ALLOWED:?}: {before:?}"
    );

    let (egress_ports, ingress_ports) = guard_names(&agent, &uplink, &before)?;
    let (fix, after) = ports::fix_and_retry(&agent, None, container, server, ALLOWED, CONNECTIONS)?;
    ensure!(
        fix.contains(&format!(
            "ip_local_port_range=\"{} {}\"",
            ALLOWED.0, ALLOWED.1
        )),
        "the audit's fix does not set the upstream range: {fix}"
    );
    ensure!(
        after.total() == before.total(),
        "{} connections after the fix, {} before",
        after.total(),
        before.total()
    );
    agent.stop()?;
    Ok(Outcome {
        before,
        egress_ports,
        ingress_ports,
        fix,
        after,
    })
}

/// The guard names exactly the failed ports, leaving and coming back:
/// (egress, ingress).
fn guard_names(
    agent: &Agent,
    uplink: &str,
    before: &Attempts,
) -> anyhow::Result<(BTreeSet<u16>, BTreeSet<u16>)> {
    step!("what filter-agent shows: `filter-agent guard --iface {uplink}`");
    let egress_ports = ports::guard_ports(agent, uplink, "egress")?;
    let ingress_ports = ports::guard_ports(agent, uplink, "ingress")?;
    say!(
        "connection attempts that left from ports outside the range: {}",
        list(&egress_ports)
    );
    say!(
        "replies that came back to ports outside the range:            {}",
        list(&ingress_ports)
    );
    ensure!(
        egress_ports == before.failed && ingress_ports == before.failed,
        "the guard did not name exactly the failed ports"
    );
    Ok((egress_ports, ingress_ports))
}
