//! The ephemeral-port guard with real traffic: a client namespace routed
//! through a host namespace that runs the agent on its uplink, to a server
//! namespace (sometimes behind a middle one that plays the cloud ACL).
//! Needs root; every test makes its own namespaces and removes them.

mod support;

use support::AGENT;

use std::{collections::BTreeSet, net::SocketAddr, path::Path};

use scenarios::{Agent, ports::Attempts};
use serde_json::Value;
use testbed::{Chain, traffic::Responder};

const PORT: u16 = 8080;
const ALLOWED: (u16, u16) = (32768, 60999);
const ATTEMPTS: usize = 30;
const TOTAL_ATTEMPTS: usize = ATTEMPTS + 5;
/// The misconfigured container range of incident 1.
const WIDE: (u16, u16) = (1024, 65000);

/// A stateless host filter that lets TCP return traffic reach only the
/// ephemeral range, as the cloud ACL in incident 1 did.
const STATELESS_ACL: &str = r#"
[filter]
default = "deny"

[guard]
ephemeral = "32768-60999"

[[rule]]
name = "tcp-return"
action = "allow"
proto = "tcp"
tcp_flags = "ack"
dport = "32768-60999"
"#;

/// Filters nothing; the guard only counts.
const ALLOW_ALL: &str = "[filter]\ndefault = \"allow\"\n[guard]\nephemeral = \"32768-60999\"\n";

/// `TOTAL_ATTEMPTS` connections from the client, spread over `range` (its
/// `ip_local_port_range`) first.
fn connect_many(chain: &Chain, range: (u16, u16)) -> Attempts {
    let server = SocketAddr::from((chain.server_addr(), PORT));
    scenarios::ports::connect_many(chain.client(), server, range, TOTAL_ATTEMPTS).unwrap()
}

/// SYNs sent from a port inside the allowed range (`inside`) or outside
/// it: a port the kernel picked twice sent two.
fn sent(sent_from: &[u16], inside: bool) -> u64 {
    sent_from
        .iter()
        .filter(|&&port| in_allowed(port) == inside)
        .count() as u64
}

fn port_range((low, high): (u16, u16)) -> String {
    format!("{low} {high}")
}

fn in_allowed(port: u16) -> bool {
    (ALLOWED.0..=ALLOWED.1).contains(&port)
}

/// `filter-agent guard --iface IFACE --json` for one interface.
fn guard_report(agent: &Agent, iface: &str) -> Value {
    agent
        .json(&["guard", "--top", "1000", "--iface", iface])
        .unwrap()[0]
        .clone()
}

fn packets(report: &Value, counter: &str) -> u64 {
    report["counters"][counter]["packets"].as_u64().unwrap()
}

/// The local ports of the report's out-of-range TCP traffic in `direction`.
fn ports(report: &Value, direction: &str) -> BTreeSet<u16> {
    report["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["direction"] == direction && entry["proto"] == "tcp")
        .map(|entry| entry["port"].as_u64().unwrap() as u16)
        .collect()
}

/// `filter-agent audit --json` with the guard range of the agent's rules.
fn audit(agent: &Agent) -> Vec<Value> {
    let rules = agent.rules().to_str().unwrap();
    let document = agent.json(&["audit", "--rules", rules]).unwrap();
    document["namespaces"].as_array().unwrap().clone()
}

/// The audit entry of the namespace named `name`.
fn audited<'a>(namespaces: &'a [Value], name: &str) -> &'a Value {
    namespaces
        .iter()
        .find(|ns| ns["names"].as_array().unwrap().iter().any(|n| n == name))
        .unwrap_or_else(|| panic!("{name} not audited"))
}

#[test]
fn sakura_low_ports_fail_and_the_guard_names_them() {
    let chain = Chain::create("gsak", &["c", "h", "s"]).unwrap();
    let (client, host) = (chain.client(), &chain.namespaces[1]);
    client
        .sysctl("net.ipv4.ip_local_port_range", &port_range(WIDE))
        .unwrap();
    let _responder = Responder::start(chain.server(), PORT).unwrap();
    let uplink = chain.left_if(1);
    let agent = Agent::start(Path::new(AGENT), host, &[&uplink], STATELESS_ACL).unwrap();

    let Attempts {
        answered,
        failed,
        sent_from,
    } = connect_many(&chain, WIDE);
    // Exactly the connections from ports outside the allowed range fail.
    assert!(
        answered.iter().all(|&port| in_allowed(port)),
        "{answered:?}"
    );
    assert!(failed.iter().all(|&port| !in_allowed(port)), "{failed:?}");
    assert!(
        !failed.is_empty() && !answered.is_empty(),
        "{answered:?} {failed:?}"
    );

    let report = guard_report(&agent, &uplink);
    // One SYN per attempt leaves the uplink, from the client's own port.
    assert_eq!(
        packets(&report, "outbound_out_of_range"),
        sent(&sent_from, false)
    );
    assert_eq!(
        packets(&report, "outbound_in_range"),
        sent(&sent_from, true)
    );
    assert_eq!(ports(&report, "egress"), failed);
    // Each SYN-ACK to a low port arrives (the server may retransmit it).
    assert!(packets(&report, "return_out_of_range") >= failed.len() as u64);
    assert_eq!(ports(&report, "ingress"), failed);

    let namespaces = audit(&agent);
    let flagged = audited(&namespaces, client.name());
    assert_eq!(flagged["port_range"], serde_json::json!([1024, 65000]));
    let fix = flagged["findings"][0]["fix"].as_str().unwrap();
    assert_eq!(
        fix,
        format!(
            "ip netns exec {} sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\"",
            client.name()
        )
    );
    agent.stop().unwrap();
    assert!(
        !loader_pins(&uplink).exists(),
        "pins left behind: {}",
        loader_pins(&uplink).display()
    );
}

#[test]
fn correctly_configured_namespace_counts_nothing_out_of_range() {
    let chain = Chain::create("gok", &["c", "h", "s"]).unwrap();
    chain
        .client()
        .sysctl("net.ipv4.ip_local_port_range", &port_range(ALLOWED))
        .unwrap();
    let _responder = Responder::start(chain.server(), PORT).unwrap();
    let uplink = chain.left_if(1);
    let agent = Agent::start(
        Path::new(AGENT),
        &chain.namespaces[1],
        &[&uplink],
        STATELESS_ACL,
    )
    .unwrap();

    let Attempts {
        answered,
        failed,
        sent_from,
    } = connect_many(&chain, ALLOWED);
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(answered.len(), TOTAL_ATTEMPTS);
    let report = guard_report(&agent, &uplink);
    assert_eq!(packets(&report, "return_out_of_range"), 0);
    assert_eq!(packets(&report, "outbound_out_of_range"), 0);
    assert_eq!(
        packets(&report, "outbound_in_range"),
        sent(&sent_from, true)
    );
    assert!(packets(&report, "return_in_range") >= TOTAL_ATTEMPTS as u64);
    let namespaces = audit(&agent);
    let client = audited(&namespaces, chain.client().name());
    assert_eq!(client["findings"], serde_json::json!([]));
}

#[test]
fn docker_style_nat_ports_are_seen_after_translation() {
    let chain = Chain::create("gnat", &["c", "h", "s"]).unwrap();
    let host = &chain.namespaces[1];
    let uplink = chain.left_if(1);
    // Like Docker's MASQUERADE picking low ports: the client's own range
    // is fine, the port on the wire is not.
    host.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &uplink,
            "-p",
            "tcp",
            "-j",
            "MASQUERADE",
            "--to-ports",
            "20000-20999",
        ],
    )
    .unwrap();
    let _responder = Responder::start(chain.server(), PORT).unwrap();
    let agent = Agent::start(Path::new(AGENT), host, &[&uplink], ALLOW_ALL).unwrap();

    let Attempts {
        answered,
        failed,
        sent_from,
    } = connect_many(&chain, ALLOWED);
    assert!(failed.is_empty(), "{failed:?}");
    assert!(answered.iter().all(|&port| in_allowed(port)));

    let report = guard_report(&agent, &uplink);
    // Every SYN left translated, outside the range.
    assert_eq!(
        packets(&report, "outbound_out_of_range"),
        sent_from.len() as u64,
        "SYNs sent from {sent_from:?}"
    );
    assert_eq!(packets(&report, "outbound_in_range"), 0);
    let translated = ports(&report, "egress");
    assert!(!translated.is_empty());
    assert!(
        translated.iter().all(|port| (20000..=20999).contains(port)),
        "{translated:?}"
    );

    let namespaces = audit(&agent);
    let nat_host = audited(&namespaces, host.name());
    let problems: Vec<&str> = nat_host["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|finding| finding["problem"].as_str().unwrap())
        .collect();
    assert!(
        problems
            .iter()
            .any(|problem| problem.contains("source NAT maps to ports 20000-20999")),
        "{problems:?}"
    );
}

#[test]
fn upstream_acl_eats_replies_and_only_egress_sees_it() {
    let chain = Chain::create("gup", &["c", "h", "m", "s"]).unwrap();
    chain
        .client()
        .sysctl("net.ipv4.ip_local_port_range", &port_range(WIDE))
        .unwrap();
    // The middle namespace is the stateless cloud ACL: replies from the
    // server side reach only the allowed range.
    let middle = &chain.namespaces[2];
    middle
        .exec(
            "iptables",
            &[
                "-A",
                "FORWARD",
                "-i",
                &chain.left_if(2),
                "-p",
                "tcp",
                "!",
                "--dport",
                "32768:60999",
                "-j",
                "DROP",
            ],
        )
        .unwrap();
    let _responder = Responder::start(chain.server(), PORT).unwrap();
    let uplink = chain.left_if(1);
    let agent = Agent::start(
        Path::new(AGENT),
        &chain.namespaces[1],
        &[&uplink],
        ALLOW_ALL,
    )
    .unwrap();

    let Attempts {
        answered,
        failed,
        sent_from,
    } = connect_many(&chain, WIDE);
    assert!(
        answered.iter().all(|&port| in_allowed(port)),
        "{answered:?}"
    );
    assert!(failed.iter().all(|&port| !in_allowed(port)), "{failed:?}");
    assert!(!failed.is_empty());

    let report = guard_report(&agent, &uplink);
    // Nothing out of range ever reaches the host...
    assert_eq!(packets(&report, "return_out_of_range"), 0);
    assert!(ports(&report, "ingress").is_empty());
    // ...but every attempt that left from a low port is on record.
    assert_eq!(
        packets(&report, "outbound_out_of_range"),
        sent(&sent_from, false)
    );
    assert_eq!(ports(&report, "egress"), failed);
}

fn loader_pins(iface: &str) -> std::path::PathBuf {
    filter_agent::kernel::pins::dir(iface)
}
