//! The program attached to a real veth, with real traffic across it.
//! Needs root; every test makes its own namespaces and removes them.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use filter_agent::{cli::XdpModeArg, compile::compile, config, loader::Filter};
use filter_common::reason;
use testbed::{
    Daemon, Pair,
    traffic::{self, Responder},
};

const PORT: u16 = 8080;

fn service(ip: impl Into<IpAddr>) -> SocketAddr {
    SocketAddr::new(ip.into(), PORT)
}

#[test]
fn deny_by_default_drops_real_traffic_until_detached() {
    let pair = Pair::create("deny").unwrap();
    let _responder = Responder::start(&pair.server, PORT).unwrap();
    let config = config::parse(
        std::path::Path::new("r.toml"),
        "[filter]\ndefault = \"deny\"\n",
    )
    .unwrap();
    let mut filter = Filter::load(&compile(&config).unwrap()).unwrap();
    let mode = pair
        .server
        .run(|| filter.attach(&pair.server_if, XdpModeArg::Native))
        .unwrap()
        .unwrap();
    assert_eq!(mode, "native");

    for server in [IpAddr::from(Pair::SERVER_V4), IpAddr::from(Pair::SERVER_V6)] {
        assert!(!traffic::tcp_exchange(&pair.client, service(server), None).unwrap());
        assert!(!traffic::udp_exchange(&pair.client, service(server)).unwrap());
        assert!(!traffic::icmp_echo(&pair.client, server).unwrap());
    }
    let counters = filter.counters().unwrap();
    let denied = counters[reason::DEFAULT_DENY as usize];
    // At least one TCP SYN, one UDP datagram and one echo per family.
    assert!(denied.packets >= 6, "{counters:?}");
    assert_eq!(counters[reason::DEFAULT_ALLOW as usize].packets, 0);

    drop(filter);
    assert!(traffic::tcp_exchange(&pair.client, service(Pair::SERVER_V4), None).unwrap());
}

#[test]
fn agent_binary_attaches_counts_and_detaches() {
    let pair = Pair::create("bin").unwrap();
    let _responder = Responder::start(&pair.server, PORT).unwrap();
    let mut rules = tempfile::NamedTempFile::new().unwrap();
    writeln!(rules, "[filter]\ndefault = \"allow\"").unwrap();

    let mut command = pair.server.command(env!("CARGO_BIN_EXE_filter-agent"));
    command
        .args(["--iface", &pair.server_if, "--rules"])
        .arg(rules.path())
        .env("RUST_LOG", "info");
    let mut agent = Daemon::start(command, None).unwrap();
    assert!(
        agent
            .wait_for("filter attached", Duration::from_secs(10))
            .is_some(),
        "{:?}",
        agent.seen()
    );
    let attached = pair.server.ip(&["link", "show", &pair.server_if]).unwrap();
    assert!(String::from_utf8_lossy(&attached.stdout).contains("xdp"));

    for server in [IpAddr::from(Pair::SERVER_V4), IpAddr::from(Pair::SERVER_V6)] {
        assert!(traffic::tcp_exchange(&pair.client, service(server), None).unwrap());
        assert!(traffic::udp_exchange(&pair.client, service(server)).unwrap());
        assert!(traffic::icmp_echo(&pair.client, server).unwrap());
    }

    let (status, lines) = agent.stop();
    assert!(status.unwrap().success(), "{lines:?}");
    let allowed = lines
        .iter()
        .find(|line| line.contains("reason=\"default_allow\""))
        .unwrap_or_else(|| panic!("no default_allow count in {lines:?}"));
    let packets: u64 = allowed
        .split("packets=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(packets >= 6, "{allowed}");
    // Stopping detaches: no XDP program is left on the interface.
    let after = pair.server.ip(&["link", "show", &pair.server_if]).unwrap();
    assert!(!String::from_utf8_lossy(&after.stdout).contains("xdp"));
}
