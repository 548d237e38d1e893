//! Incident 3 (Docker + AWS Network ACL): a container on Docker's default
//! bridge behind Docker's own MASQUERADE (a real engine, testbed's, in the
//! host's namespace), and a stateless ACL upstream that allows only source
//! ports 49152-65535. NAT keeps the container's port, so connections fail
//! whenever the container picks one below 49152; the host itself, whose
//! range was fixed, is fine.

use std::{collections::BTreeSet, net::SocketAddr, path::Path};

use anyhow::ensure;
use testbed::{Chain, docker::Docker, traffic::Responder};

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
    let container = docker.run("ctr", &[])?;
    let container = &container.netns;
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
    let _service = Responder::start(chain.server(), PORT)?;
    let _host_service = Responder::start(chain.server(), HOST_PORT)?;
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

    step!("what filter-agent shows: `filter-agent guard --iface {uplink}` on the host");
    let egress_ports = ports::guard_ports(&agent, &uplink, "egress")?;
    say!(
        "connection attempts that left the host from source ports (after NAT) outside the range: {}",
        list(&egress_ports)
    );
    ensure!(
        egress_ports == container_attempts.failed,
        "the egress guard did not name exactly the failed ports: {egress_ports:?}"
    );
    let (fix, after) = ports::fix_and_retry(&agent, container, server, ALLOWED, CONNECTIONS)?;
    agent.stop()?;
    Ok(Outcome {
        host: host_attempts,
        container: container_attempts,
        egress_ports,
        fix,
        after,
    })
}
