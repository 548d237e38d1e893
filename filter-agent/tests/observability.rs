//! What operators read of a running agent: /metrics, `stats` from the pins
//! (also while the agent is down) and `watch`'s sampled drops. Needs root.

use std::{net::UdpSocket, process::Command, thread, time::Duration};

use testbed::{Pair, wait_until};

mod support;
use support::{
    AGENT, DENY_9000, Pins, denied_receiver, http_ok, probe, rules_file, start_agent, stats_packets,
};

/// Samples of a Prometheus text exposition: (name and labels, value).
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (
                series.to_owned(),
                value.parse().unwrap_or_else(|_| panic!("{line}")),
            )
        })
        .collect()
}

#[test]
fn metrics_are_served_and_count_what_the_filter_did() {
    let pair = Pair::create("metrics").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let receiver = denied_receiver(&pair, Duration::from_millis(100));
    let rules = rules_file(DENY_9000);
    let mut agent = start_agent(
        &pair.server,
        &["--detach-on-exit", "--iface", &pair.server_if],
        rules.path(),
    );
    // The first probe needs ARP again: a frame no rule can see.
    pair.client.ip(&["neigh", "flush", "all"]).unwrap();
    for _ in 0..3 {
        assert!(!probe(&pair, &receiver));
    }
    // Four datagrams no rule decides: counted as default_allow.
    let sender = pair
        .client
        .run(|| UdpSocket::bind((Pair::CLIENT_V4, 0)))
        .unwrap()
        .unwrap();
    for _ in 0..4 {
        sender.send_to(b"allowed", (Pair::SERVER_V4, 9001)).unwrap();
    }
    let address = "127.0.0.1:9469";
    assert_eq!(http_ok(&pair.server, address, "/healthz"), "ok\n");
    let iface = &pair.server_if;
    let allowed =
        format!("filter_agent_packets_total{{iface=\"{iface}\",reason=\"default_allow\"}} ");
    let mut text = String::new();
    wait_until(
        "the four datagrams in /metrics",
        Duration::from_secs(2),
        || {
            text = http_ok(&pair.server, address, "/metrics");
            text.lines()
                .find_map(|line| line.strip_prefix(&allowed))
                .is_some_and(|packets| packets.parse::<f64>().is_ok_and(|n| n >= 4.0))
        },
    );
    let samples = samples(&text);
    let value = |series: &str| {
        samples
            .iter()
            .find(|(name, _)| name == series)
            .unwrap_or_else(|| panic!("{series} not in\n{text}"))
            .1
    };
    assert_eq!(
        value(&format!(
            "filter_agent_rule_packets_total{{iface=\"{iface}\",rule=\"deny-9000\",action=\"deny\"}}"
        )),
        3.0
    );
    assert!(
        value(&format!(
            "filter_agent_rule_bytes_total{{iface=\"{iface}\",rule=\"deny-9000\",action=\"deny\"}}"
        )) >= 3.0 * 42.0
    );
    // Every reason has its series, with what this test sent: four
    // datagrams by default, the ARP request before the first probe, and
    // nothing malformed, fragmented or denied by default.
    let reason = |reason: &str| {
        value(&format!(
            "filter_agent_packets_total{{iface=\"{iface}\",reason=\"{reason}\"}}"
        ))
    };
    for name in filter_common::reason::NAMES {
        let packets = reason(name);
        match name {
            "default_allow" => assert!(packets >= 4.0, "{name}: {packets}"),
            "non_ip" => assert!(packets >= 1.0, "{name}: {packets}"),
            _ => assert_eq!(packets, 0.0, "{name}"),
        }
    }
    assert_eq!(value("filter_agent_reloads_total{result=\"success\"}"), 0.0);
    assert_eq!(value("filter_agent_rules_loaded"), 1.0);
    assert_eq!(
        value(&format!(
            "filter_agent_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert!(text.contains(&format!(
        "filter_agent_guard_packets_total{{iface=\"{iface}\",kind=\"return_in_range\"}}"
    )));
    // Every metric the Grafana dashboard queries is one the agent exports.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/grafana/filter-agent-dashboard.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| target["expr"].as_str().unwrap())
        .collect();
    assert!(exprs.len() >= 6);
    let metric_names = |text: &str| -> std::collections::BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|token| token.starts_with("filter_agent_"))
            .map(ToOwned::to_owned)
            .collect()
    };
    // Families without samples (no audit findings) show in # TYPE lines.
    let exported = metric_names(&text);
    for expr in exprs {
        for name in metric_names(expr) {
            assert!(
                exported.contains(&name),
                "the dashboard queries {name}, which the agent does not export"
            );
        }
    }
    agent.signal(libc::SIGHUP);
    agent.expect("rules reloaded", Duration::from_secs(5));
    let text = http_ok(&pair.server, address, "/metrics");
    assert!(
        text.contains("filter_agent_reloads_total{result=\"success\"} 1\n"),
        "{text}"
    );
    // Counts continue across the reload.
    assert!(
        text.contains("rule=\"deny-9000\",action=\"deny\"} 3\n"),
        "{text}"
    );
}

#[test]
fn stats_read_the_pins_while_the_agent_is_down() {
    use std::io::BufRead as _;
    let pair = Pair::create("stats").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let receiver = denied_receiver(&pair, Duration::from_millis(100));
    let rules = rules_file(DENY_9000);
    let agent = start_agent(&pair.server, &["--iface", &pair.server_if], rules.path());
    assert!(!probe(&pair, &receiver));
    let (status, _) = agent.stop();
    assert!(status.is_some_and(|s| s.success()));
    // Down, but still filtering and counting.
    assert!(!probe(&pair, &receiver));
    let stats = |extra: &[&str]| {
        let output = Command::new(AGENT)
            .args(["stats", "--json", "--iface", &pair.server_if])
            .args(extra)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(stats_packets(&stats(&[]), "deny-9000"), 2);

    // --watch prints again with rates.
    let mut watch = std::process::Command::new(AGENT)
        .args([
            "stats",
            "--json",
            "--watch",
            "1",
            "--iface",
            &pair.server_if,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(!probe(&pair, &receiver));
    let second = lines.next().unwrap().unwrap();
    watch.kill().unwrap();
    watch.wait().unwrap();
    assert_eq!(stats_packets(&first, "deny-9000"), 2);
    assert_eq!(stats_packets(&second, "deny-9000"), 3);
    let second: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(second[0]["rules"][1]["rule"], "deny-9000");
    let rate = second[0]["rules"][1]["packets_per_second"]
        .as_f64()
        .unwrap();
    assert!(rate > 0.0, "{second}");
}

#[test]
fn watch_prints_sampled_drops_with_their_rule() {
    use std::io::BufRead as _;
    let pair = Pair::create("watch").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let receiver = denied_receiver(&pair, Duration::from_millis(100));
    let rules = rules_file(DENY_9000);
    let agent = start_agent(
        &pair.server,
        &["--detach-on-exit", "--iface", &pair.server_if],
        rules.path(),
    );
    let mut watch = Command::new(AGENT)
        .args(["watch", "--iface", &pair.server_if])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    let stdout = std::io::BufReader::new(watch.stdout.take().unwrap());
    let reader = thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    // watch connects in its own time: a denied probe until it prints one.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let line = loop {
        assert!(!probe(&pair, &receiver));
        if let Ok(line) = received.recv_timeout(Duration::from_millis(100)) {
            break line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "watch printed no line for 5 s of denied probes"
        );
    };
    assert!(
        line.starts_with("DROP udp 10.200.0.1:")
            && line.ends_with(" -> 10.200.0.2:9000 rule=deny-9000"),
        "{line}"
    );
    // The agent stopping ends watch.
    agent.stop();
    reader.join().unwrap();
    assert!(watch.wait().unwrap().success());
}
