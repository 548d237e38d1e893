//! Interfaces that come and go: re-created, gone during a reload, deleted
//! between runs, or not there yet at the start. Needs root.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use filter_agent::{kernel::counters, kernel::pins};
mod support;

use support::{AGENT, METRICS, Pins, RULES, error_line, rules_file, start_agent, xdp_attached};
use testbed::{
    Daemon, Pair,
    traffic::{Responder, http_get, icmp_echo, udp_exchange},
    wait_until,
};

#[test]
fn an_interface_created_again_is_filtered_again_within_a_second() {
    let pair = Pair::create("relink").unwrap();
    let _echo = Responder::start(&pair.server, 9999).unwrap();
    let denied = SocketAddr::from((Pair::SERVER_V4, 9999));
    let rules = rules_file(RULES);
    let mut agent = start_agent(
        &pair.server,
        &["--detach-on-exit", "--iface", &pair.server_if],
        rules.path(),
    );
    assert!(!udp_exchange(&pair.client, denied).unwrap());

    pair.delete_link().unwrap();
    agent.expect("interface deleted", Duration::from_secs(1));
    let (status, body) = http_get(&pair.server, METRICS, "/healthz").unwrap();
    assert_eq!(
        (status, body.as_str()),
        (503, format!("unfiltered: {}\n", pair.server_if).as_str())
    );
    let (_, metrics) = http_get(&pair.server, METRICS, "/metrics").unwrap();
    let series = format!(
        "filter_agent_interface_filtered{{iface=\"{}\"}} 0\n",
        pair.server_if
    );
    assert!(metrics.contains(&series), "{series} not in {metrics}");

    pair.add_link().unwrap();
    wait_until(
        "the re-created interface got the filter",
        Duration::from_secs(1),
        || xdp_attached(&pair.server, &pair.server_if),
    );
    agent.expect(
        "interface created again: filter attached",
        Duration::from_secs(1),
    );
    // The link carries traffic (echo is allowed), and the filter denies.
    wait_until("an echo over the new link", Duration::from_secs(5), || {
        icmp_echo(&pair.client, Pair::SERVER_V4.into()).unwrap()
    });
    assert!(!udp_exchange(&pair.client, denied).unwrap());
    let (status, body) = http_get(&pair.server, METRICS, "/healthz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

#[test]
fn a_reload_with_an_interface_gone_applies_to_the_rest_and_to_it_when_it_returns() {
    let pair = Pair::create("multi").unwrap();
    // A second interface beside the pair's, in the same namespace.
    let second = pair.server_if.replacen("fas", "fa2", 1);
    let peer = pair.server_if.replacen("fas", "fa3", 1);
    let add_second = || {
        let add = [
            "link", "add", &second, "type", "veth", "peer", "name", &peer,
        ];
        pair.server.ip(&add).unwrap();
        pair.server.ip(&["link", "set", &second, "up"]).unwrap();
    };
    add_second();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let mut agent = start_agent(
        &pair.server,
        &[
            "--detach-on-exit",
            "--iface",
            &pair.server_if,
            "--iface",
            &second,
        ],
        &rules,
    );
    pair.server.ip(&["link", "del", &second]).unwrap();
    agent.expect("interface deleted", Duration::from_secs(1));

    let renamed = RULES.replace("name = \"ping\"", "name = \"echo\"");
    let staged = dir.path().join("rules.new");
    std::fs::write(&staged, &renamed).unwrap();
    std::fs::rename(&staged, &rules).unwrap();
    agent.expect("rules reloaded", Duration::from_secs(2));
    let names = |iface: &str| -> Vec<String> {
        counters::read_snapshot(&pins::dir(iface))
            .unwrap()
            .rules
            .into_iter()
            .map(|rule| rule.name)
            .collect()
    };
    assert!(names(&pair.server_if).contains(&"echo".to_owned()));

    add_second();
    agent.expect(
        "interface created again: filter attached",
        Duration::from_secs(1),
    );
    let names = names(&second);
    assert!(
        names.contains(&"echo".to_owned()) && !names.contains(&"ping".to_owned()),
        "{second} came back with other rules: {names:?}"
    );
}

#[test]
fn pins_of_a_deleted_interface_are_removed_at_the_next_start() {
    let gone = Pair::create("gone").unwrap();
    let rules = rules_file(RULES);
    let agent = start_agent(
        &gone.server,
        &["--detach-on-exit", "--iface", &gone.server_if],
        rules.path(),
    );
    // Interrupted: the filter and its pins stay (fail-static)...
    agent.signal(libc::SIGKILL);
    agent.stop();
    let stale = pins::dir(&gone.server_if);
    assert!(stale.join(pins::XDP_LINK).exists());
    // ...and then the interface goes.
    gone.delete_link().unwrap();

    let pair = Pair::create("next").unwrap();
    let _pins = Pins::of(&gone.server_if);
    // Any agent's start removes them (another test's may come first).
    let _agent = start_agent(
        &pair.server,
        &["--detach-on-exit", "--iface", &pair.server_if],
        rules.path(),
    );
    assert!(!stale.exists(), "{} is still there", stale.display());
}

/// At boot the agent may start before the NIC exists: with
/// `--iface-timeout` it waits for it, attaches as soon as it appears and
/// only then reports ready; an interface that never comes is one error line
/// once the time is up.
#[test]
fn an_interface_that_appears_after_the_start_is_waited_for() {
    let pair = Pair::create("late").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let _echo = Responder::start(&pair.server, 9999).unwrap();
    pair.delete_link().unwrap();
    let rules = rules_file(RULES);
    let mut command = pair.server.command(AGENT);
    command
        .args(["--detach-on-exit", "--iface-timeout", "30"])
        .args(["--iface", &pair.server_if, "--rules"])
        .arg(rules.path());
    let mut agent = Daemon::start(command, None).unwrap();
    agent.expect(
        "waiting for the interface to appear",
        Duration::from_secs(10),
    );
    assert!(!agent.seen().iter().any(|line| line.contains("ready")));
    pair.add_link().unwrap();
    agent.expect("filter attached", Duration::from_secs(5));
    agent.expect("ready", Duration::from_secs(5));
    wait_until("an echo over the new link", Duration::from_secs(5), || {
        icmp_echo(&pair.client, Pair::SERVER_V4.into()).unwrap()
    });
    let denied = SocketAddr::from((Pair::SERVER_V4, 9999));
    assert!(!udp_exchange(&pair.client, denied).unwrap());
    drop(agent);

    let started = Instant::now();
    let output = pair
        .server
        .command(AGENT)
        .args(["--iface-timeout", "1", "--iface", "fa-never", "--rules"])
        .arg(rules.path())
        .output()
        .unwrap();
    let line = error_line(&output);
    assert!(
        line.contains("no network interface named `fa-never` after waiting 1s"),
        "{line}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
