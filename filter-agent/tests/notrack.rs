//! `notrack = true` with real traffic: the server's host keeps a stateful
//! nftables firewall; connections to the notrack service leave no entry
//! in its conntrack table (nor do the host's replies), connections to a
//! tracked service do, and both are answered. When the host's firewall
//! accepts the service only by `ct state`, its untracked packets are
//! dropped, `audit` flags it and its fix works. A reload without the rule
//! and `detach` remove the agent's table; a table of the host's own is
//! never touched. Needs root.

mod support;

use support::AGENT;

use std::{fs, net::SocketAddr, path::Path, process::Command, time::Duration};

use testbed::{Daemon, Netns, Pair, traffic};

const BYPASSED: u16 = 8080;
const TRACKED: u16 = 9090;

const RULES: &str = r#"
[filter]
default = "allow"

[[rule]]
name = "public-web"
action = "allow"
proto = "tcp"
dport = 8080
notrack = true
"#;

/// The host's own stateful firewall: established flows, then the two
/// services (untracked packets are neither new nor established).
const HOST_FIREWALL: &str = "table inet host {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iif lo accept
        tcp dport { 8080, 9090 } accept
    }
}
";

/// Conntrack entries in `ns` for TCP flows to `port`.
fn tracked(ns: &Netns, port: u16) -> usize {
    let table = ns
        .run(|| fs::read_to_string("/proc/thread-self/net/nf_conntrack"))
        .unwrap()
        .unwrap();
    let needle = format!("dport={port} ");
    table.lines().filter(|line| line.contains(&needle)).count()
}

/// The fix of the audit's "notrack" finding on `ns` (as its host), if any.
fn notrack_fix(ns: &Netns, rules: &Path) -> Option<String> {
    let host = scenarios::agent::audit_host(Path::new(AGENT), ns, rules).unwrap();
    let fix = scenarios::ports::findings(&host, "notrack").next()?["fix"].as_str();
    fix.map(str::to_owned)
}

/// An editor's rename-write: the agent sees the change and reloads.
fn replace_rules(rules: &Path, text: &str) {
    let new = rules.with_extension("new");
    fs::write(&new, text).unwrap();
    fs::rename(&new, rules).unwrap();
}

fn tables(ns: &Netns) -> String {
    let listed = ns.exec("nft", &["list", "tables"]).unwrap();
    String::from_utf8_lossy(&listed.stdout).into_owned()
}

#[test]
fn notrack_skips_conntrack_the_audit_checks_the_firewall_the_table_is_ours() {
    let pair = Pair::create("nt").unwrap();
    let server = &pair.server;
    server
        .exec_with_input("nft", &["-f", "-"], HOST_FIREWALL)
        .unwrap();
    let _services =
        [BYPASSED, TRACKED].map(|port| traffic::Responder::start(server, port).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    fs::write(&rules, RULES).unwrap();
    let mut agent = Daemon::agent(
        AGENT,
        server,
        [
            "--iface",
            &pair.server_if,
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    let table = format!("inet filter_agent_{}", pair.server_if);
    assert!(
        tables(server).contains(&table),
        "no {table} after the start: {}",
        tables(server)
    );

    let to = |port| SocketAddr::from((Pair::SERVER_V4, port));
    for _ in 0..5 {
        assert!(traffic::tcp_exchange(&pair.client, to(BYPASSED), None).unwrap());
        assert!(traffic::tcp_exchange(&pair.client, to(TRACKED), None).unwrap());
    }
    assert_eq!(
        tracked(server, BYPASSED),
        0,
        "flows to the notrack service were tracked"
    );
    assert!(
        tracked(server, TRACKED) >= 5,
        "flows to the other service were not tracked: is conntrack on?"
    );

    // A host firewall that accepts the service only by ct state drops
    // its untracked packets; the audit says so and its fix, run as
    // printed, lets them in.
    server
        .exec_with_input(
            "nft",
            &["-f", "-"],
            &HOST_FIREWALL
                .replace(
                    "tcp dport { 8080, 9090 } accept",
                    "tcp dport { 8080, 9090 } ct state new accept",
                )
                .replace(
                    "table inet host {",
                    "flush table inet host\ntable inet host {",
                ),
        )
        .unwrap();
    assert!(
        !traffic::tcp_exchange(&pair.client, to(BYPASSED), None).unwrap(),
        "untracked packets passed a firewall that accepts only ct state new"
    );
    let fix = notrack_fix(server, &rules).expect("the audit did not flag the firewall");
    let applied = server.exec("sh", &["-c", &fix]).unwrap();
    assert!(applied.status.success());
    assert!(traffic::tcp_exchange(&pair.client, to(BYPASSED), None).unwrap());
    assert_eq!(
        notrack_fix(server, &rules),
        None,
        "still flagged after the fix"
    );

    // Without the rule, the agent's table goes; the host's stays.
    replace_rules(&rules, &RULES.replace("notrack = true\n", ""));
    agent.expect("rules reloaded", Duration::from_secs(5));
    let listed = tables(server);
    assert!(
        !listed.contains(&table),
        "{table} outlived its rule: {listed}"
    );
    assert!(
        listed.contains("inet host"),
        "the host's table was touched: {listed}"
    );

    replace_rules(&rules, RULES);
    agent.expect("rules reloaded", Duration::from_secs(5));
    assert!(tables(server).contains(&table), "{table} did not come back");
    let (status, log) = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "{log:?}");
    assert!(
        tables(server).contains(&table),
        "the table went with the agent (the pinned filter stays, and so must it)"
    );
    let detached = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", server.name()))
        .args([AGENT, "detach", "--iface", &pair.server_if])
        .output()
        .unwrap();
    assert!(detached.status.success(), "{detached:?}");
    let listed = tables(server);
    assert!(!listed.contains(&table), "detach left {table}: {listed}");
    assert!(
        listed.contains("inet host"),
        "the host's table was touched: {listed}"
    );
}
