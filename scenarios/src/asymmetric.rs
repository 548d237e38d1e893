//! Incident 2 (IBM Cloud VPC): a server with two interfaces on one subnet;
//! requests arrive on one, replies leave by the other. With rp_filter=2
//! ping works, but a filter that tracks state per interface sees a SYN-ACK
//! leave an interface that never saw the SYN, and drops it: TCP fails.
//! Stateless rules on both interfaces do not care which way replies go.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
};

use anyhow::ensure;
use testbed::{
    Chain, Netns,
    traffic::{self, Responder},
};

use crate::{Agent, agent, nft, say, step};

const PORT: u16 = 8080;
/// Not allowed by filter-agent's rules: proves they filter.
const CLOSED_PORT: u16 = 9000;
const CONNECTIONS: usize = 5;
/// The address of the server's second interface, where requests arrive.
const SECOND: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 3);

/// Stateless rules for both server interfaces.
const RULES: &str = r#"
[filter]
default = "deny"

[[rule]]
name = "service"
action = "allow"
proto = "tcp"
dport = "8080"

[[rule]]
name = "icmp"
action = "allow"
proto = "icmp"
"#;

#[derive(Debug)]
pub struct Outcome {
    /// Echo answered with rp_filter=1 (strict), and with 2 (loose).
    pub ping_strict: bool,
    pub ping_loose: bool,
    /// With the per-interface stateful filter: echo answered, and TCP
    /// connections answered out of `CONNECTIONS`.
    pub stateful_ping: bool,
    pub stateful_tcp: usize,
    /// With filter-agent on both interfaces instead.
    pub stateless_ping: bool,
    pub stateless_tcp: usize,
    /// A connection to a port the rules do not allow was answered.
    pub closed_port_answered: bool,
    /// filter-agent's `service` rule on the interface where requests
    /// arrive, and on the other one.
    pub requests_on_second: u64,
    pub requests_on_first: u64,
}

pub fn run(binary: &Path) -> anyhow::Result<Outcome> {
    step!(
        "asymmetric: a server with two interfaces on one subnet; requests arrive on the \
         second, the default route sends replies out of the first"
    );
    let chain = Chain::create("asy", &["cli", "net", "srv"])?;
    let (client, network, server) = (chain.client(), &chain.namespaces[1], chain.server());
    let (first, second) = two_interfaces(&chain)?;
    let _service = Responder::start(server, PORT)?;
    let _other = Responder::start(server, CLOSED_PORT)?;
    say!(
        "server {}: {first} 10.210.1.2 and {second} {SECOND}, both on 10.210.1.0/24 (a bridge in {}); client {}",
        server.name(),
        network.name(),
        client.name()
    );
    let target = IpAddr::from(SECOND);
    let service = SocketAddr::new(target, PORT);

    let (ping_strict, ping_loose) = reverse_path_filter(server, client, target)?;
    let (stateful_ping, stateful_tcp) = stateful_per_interface(&chain, [&first, &second], target)?;

    step!(
        "filter-agent instead, stateless rules on both interfaces (tcp dport {PORT}, icmp, default deny)"
    );
    let agent = Agent::start(binary, server, &[&first, &second], RULES)?;
    let stateless_ping = ping(client, target)?;
    let stateless_tcp = connections(client, service)?;
    let closed_port_answered =
        traffic::tcp_exchange(client, SocketAddr::new(target, CLOSED_PORT), None)?;
    say!(
        "ping {}; TCP to {service}: {stateless_tcp} of {CONNECTIONS} answered",
        answered(stateless_ping)
    );
    say!(
        "TCP to port {CLOSED_PORT} (not allowed): {}",
        answered(closed_port_answered)
    );
    let stats = agent.json(&["stats"])?;
    let requests_on_second = agent::rule_packets(&stats, &second, "service")?;
    let requests_on_first = agent::rule_packets(&stats, &first, "service")?;
    say!(
        "`filter-agent stats`: rule service matched {requests_on_second} packets on {second}, \
         {requests_on_first} on {first}"
    );
    ensure!(
        stateless_ping && stateless_tcp == CONNECTIONS && !closed_port_answered,
        "filter-agent did not pass the service and block the rest"
    );
    ensure!(
        requests_on_second > 0 && requests_on_first == 0,
        "requests took another path"
    );
    agent.stop()?;
    Ok(Outcome {
        ping_strict,
        ping_loose,
        stateful_ping,
        stateful_tcp,
        stateless_ping,
        stateless_tcp,
        closed_port_answered,
        requests_on_second,
        requests_on_first,
    })
}

/// The server's two interfaces on one subnet (a bridge in the middle
/// namespace): (the first, the second).
fn two_interfaces(chain: &Chain) -> anyhow::Result<(String, String)> {
    let server = chain.server();
    let first = chain.right_if(1);
    let second = format!("{first}b");
    // The subnet becomes a bridge in the middle namespace, with both
    // server interfaces on it.
    chain.bridge(1)?;
    chain.join(1, server, &second)?;
    server.ip(&["addr", "add", &format!("{SECOND}/24"), "dev", &second])?;
    // Each address answers ARP only on its own interface, so requests for
    // SECOND arrive there; replies to the client leave by the first.
    server.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
    server.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
    server.ip(&[
        "route",
        "replace",
        "10.210.0.0/24",
        "via",
        "10.210.1.1",
        "dev",
        &first,
    ])?;
    Ok((first, second))
}

/// Ping answered with rp_filter=1 (strict), and with 2 (loose).
fn reverse_path_filter(
    server: &Netns,
    client: &Netns,
    target: IpAddr,
) -> anyhow::Result<(bool, bool)> {
    step!("Linux's reverse-path filter");
    server.sysctl("net.ipv4.conf.all.rp_filter", "1")?;
    let ping_strict = ping(client, target)?;
    say!(
        "rp_filter=1 (strict): ping {SECOND} {}",
        answered(ping_strict)
    );
    server.sysctl("net.ipv4.conf.all.rp_filter", "2")?;
    let ping_loose = ping(client, target)?;
    say!(
        "rp_filter=2 (loose):  ping {SECOND} {}",
        answered(ping_loose)
    );
    ensure!(
        !ping_strict && ping_loose,
        "rp_filter did not behave as in the incident"
    );
    Ok((ping_strict, ping_loose))
}

/// A stateful filter tracking connections per interface: ping answered,
/// and TCP connections answered.
fn stateful_per_interface(
    chain: &Chain,
    [first, second]: [&str; 2],
    target: IpAddr,
) -> anyhow::Result<(bool, usize)> {
    let (client, server) = (chain.client(), chain.server());
    let service = SocketAddr::new(target, PORT);
    step!(
        "a stateful filter that tracks connections per interface (conntrack zones), \
         allowing new connections to {PORT} and ICMP"
    );
    nft(server, &stateful_rules(first, second))?;
    let stateful_ping = ping(client, target)?;
    let stateful_tcp = connections(client, service)?;
    say!(
        "ping {}; TCP to {service}: {stateful_tcp} of {CONNECTIONS} answered",
        answered(stateful_ping)
    );
    say!("(the SYN-ACK leaves {first}, whose state never saw the SYN: invalid, dropped)");
    ensure!(
        stateful_ping && stateful_tcp == 0,
        "the stateful filter did not break TCP alone"
    );
    server.exec("nft", &["delete", "table", "inet", "fa_stateful"])?;
    Ok((stateful_ping, stateful_tcp))
}

/// Connection tracking per interface, as a cloud's per-NIC "protocol
/// state filtering" does: each interface gets its own conntrack zone.
fn stateful_rules(first: &str, second: &str) -> String {
    format!(
        r#"table inet fa_stateful {{
  chain zone_in {{ type filter hook prerouting priority raw;
    ct zone set iifname map {{ "{first}" : 1, "{second}" : 2 }}
  }}
  chain zone_out {{ type filter hook output priority raw;
    ct zone set oifname map {{ "{first}" : 1, "{second}" : 2 }}
  }}
  chain input {{ type filter hook input priority filter; policy drop;
    iifname "lo" accept
    meta l4proto icmp accept
    ct state established,related accept
    tcp dport {PORT} ct state new accept
  }}
  chain output {{ type filter hook output priority filter; policy drop;
    oifname "lo" accept
    meta l4proto icmp accept
    ct state established,related accept
    ct state new tcp flags & (syn | ack) == syn accept
  }}
}}
"#
    )
}

/// An echo, tried a few times (the first may wait for ARP).
fn ping(client: &testbed::Netns, target: IpAddr) -> anyhow::Result<bool> {
    for _ in 0..3 {
        if traffic::icmp_echo(client, target)? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn connections(client: &testbed::Netns, to: SocketAddr) -> anyhow::Result<usize> {
    let mut answered = 0;
    for _ in 0..CONNECTIONS {
        answered += usize::from(traffic::tcp_exchange(client, to, None)?);
    }
    Ok(answered)
}

fn answered(yes: bool) -> &'static str {
    if yes { "answered" } else { "not answered" }
}
