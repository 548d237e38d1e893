//! The agent's lifecycle with real processes and real traffic: the filter
//! stays when the agent stops (fail-static), a restart takes it over
//! without a gap and keeps counting, `detach` removes it. Needs root.

use std::{
    net::UdpSocket,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use filter_agent::{
    kernel::counters, kernel::loader, kernel::pins, rules::compile::compile, rules::config,
};
use testbed::{Daemon, Pair, wait_until};

const DENIED_PORT: u16 = 9000;
const RESTARTS: usize = 3;

const RULES: &str = r#"
[filter]
default = "allow"

[[rule]]
name = "deny-9000"
action = "deny"
proto = "udp"
dport = 9000
"#;

mod support;
use support::{AGENT, Pins, rules_file, start_agent};

/// A UDP socket on the denied port in `pair`'s server namespace.
fn denied_receiver(pair: &Pair, timeout: Duration) -> UdpSocket {
    let receiver = pair
        .server
        .run(|| UdpSocket::bind(("0.0.0.0", DENIED_PORT)))
        .unwrap()
        .unwrap();
    receiver.set_read_timeout(Some(timeout)).unwrap();
    receiver
}

/// The `packets=` of the agent's last "counted" line for `rule`.
fn counted(lines: &[String], rule: &str) -> u64 {
    let needle = format!("rule=\"{rule}\"");
    let line = lines
        .iter()
        .rev()
        .find(|line| line.contains("counted") && line.contains(&needle))
        .unwrap_or_else(|| panic!("no count for {rule}: {lines:?}"));
    let packets = line.split("packets=").nth(1).unwrap();
    packets.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn restarts_and_reloads_leave_no_gap_and_keep_counting() {
    let pair = Pair::create("life").unwrap();
    let pins = Pins::of(&pair.server_if);
    let rules = rules_file(RULES);

    let received = Arc::new(AtomicU64::new(0));
    let receiver = denied_receiver(&pair, Duration::from_millis(50));
    let sending = Arc::new(AtomicBool::new(true));
    let receiving = Arc::new(AtomicBool::new(true));
    let receiver_thread = {
        let (received, receiving) = (Arc::clone(&received), Arc::clone(&receiving));
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while receiving.load(Ordering::Relaxed) {
                if receiver.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let mut agent = start_agent(&pair.server, &["--iface", &pair.server_if], rules.path());
    let sender = pair
        .client
        .run(|| UdpSocket::bind((Pair::CLIENT_V4, 0)))
        .unwrap()
        .unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let sending_thread = {
        let (sent, sending) = (Arc::clone(&sent), Arc::clone(&sending));
        thread::spawn(move || {
            while sending.load(Ordering::Relaxed) {
                if sender
                    .send_to(b"gap?", (Pair::SERVER_V4, DENIED_PORT))
                    .is_ok()
                {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_micros(200));
            }
        })
    };
    // Traffic flows through every agent, every gap between them and
    // every reload: each waits for more datagrams to have been sent.
    let flowing = |what: &str| {
        let from = sent.load(Ordering::Relaxed);
        wait_until(what, Duration::from_secs(5), || {
            sent.load(Ordering::Relaxed) >= from + 200
        });
    };
    for _ in 0..RESTARTS {
        flowing("datagrams sent while an agent runs");
        let (status, log) = agent.stop();
        assert!(status.is_some_and(|s| s.success()), "{log:?}");
        // The agent is down: the pinned filter keeps dropping.
        flowing("datagrams sent while no agent runs");
        agent = start_agent(&pair.server, &["--iface", &pair.server_if], rules.path());
        assert!(
            agent.seen().iter().any(|line| line.contains("took over")),
            "{:?}",
            agent.seen()
        );
    }
    // Reloads under the same traffic.
    for _ in 0..RESTARTS {
        flowing("datagrams sent before a reload");
        agent.signal(libc::SIGHUP);
        agent.expect("rules reloaded", Duration::from_secs(5));
    }
    flowing("datagrams sent after the last reload");
    sending.store(false, Ordering::Relaxed);
    sending_thread.join().unwrap();
    // The last datagrams are counted before the agent reads its counters.
    let all = sent.load(Ordering::Relaxed);
    wait_until(
        "every datagram sent counted in the pins",
        Duration::from_secs(2),
        || {
            counters::read_snapshot(&pins.0).is_ok_and(|snapshot| {
                snapshot
                    .rules
                    .iter()
                    .any(|rule| rule.name == "deny-9000" && rule.counts.decided.packets == all)
            })
        },
    );
    let (_, log) = agent.stop();
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 1000, "only {sent} datagrams sent");
    assert_eq!(
        received.load(Ordering::Relaxed),
        0,
        "a denied datagram passed"
    );
    // Every datagram was counted once, across four agents, the gaps
    // between them and three reloads.
    assert_eq!(counted(&log, "deny-9000"), sent, "{log:?}");

    // A running agent's interface cannot be detached; a stopped one can.
    let agent = start_agent(&pair.server, &["--iface", &pair.server_if], rules.path());
    let refused = Command::new(AGENT)
        .args(["detach", "--iface", &pair.server_if])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already running"));
    drop(agent);
    let detached = Command::new(AGENT)
        .args(["detach", "--iface", &pair.server_if])
        .output()
        .unwrap();
    assert!(detached.status.success(), "{detached:?}");
    assert!(!pins.0.exists());
    let link = pair.server.ip(&["link", "show", &pair.server_if]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"));

    // Unfiltered now: the same datagrams arrive.
    let probe = pair
        .client
        .run(|| UdpSocket::bind((Pair::CLIENT_V4, 0)))
        .unwrap()
        .unwrap();
    probe
        .send_to(b"open", (Pair::SERVER_V4, DENIED_PORT))
        .unwrap();
    wait_until(
        "the datagram arrives unfiltered",
        Duration::from_secs(2),
        || received.load(Ordering::Relaxed) == 1,
    );
    receiving.store(false, Ordering::Relaxed);
    receiver_thread.join().unwrap();
    assert_eq!(received.load(Ordering::Relaxed), 1);
}

#[test]
fn a_foreign_xdp_program_is_not_replaced() {
    let pair = Pair::create("foreign").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let config = config::parse(Path::new("r.toml"), "[filter]\ndefault = \"allow\"\n").unwrap();
    let mut foreign = loader::Filter::load(&compile(&config).unwrap()).unwrap();
    pair.server
        .run(|| foreign.attach(&pair.server_if, loader::AttachMode::Native))
        .unwrap()
        .unwrap();
    let rules = rules_file(RULES);
    let mut command = pair.server.command(AGENT);
    command
        .args(["--iface", &pair.server_if, "--rules"])
        .arg(rules.path());
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("already has an XDP program attached"),
        "{stderr}"
    );
    // Nothing of the failed start is left behind.
    assert!(!pins::dir(&pair.server_if).exists());
}

/// A rules file in a directory laid out like a mounted Kubernetes
/// ConfigMap: `rules.toml -> ..data/rules.toml`, `..data -> ..v1`.
struct ConfigMapDir {
    dir: tempfile::TempDir,
    version: usize,
}

impl ConfigMapDir {
    fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut this = Self { dir, version: 0 };
        this.publish(text);
        std::os::unix::fs::symlink("..data/rules.toml", this.rules()).unwrap();
        this
    }

    fn rules(&self) -> PathBuf {
        self.dir.path().join("rules.toml")
    }

    /// What kubelet does: a new versioned directory, then an atomic
    /// rename of a fresh `..data` symlink over the old one.
    fn publish(&mut self, text: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let versioned = self.dir.path().join(&version);
        std::fs::create_dir(&versioned).unwrap();
        std::fs::write(versioned.join("rules.toml"), text).unwrap();
        let staging = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &staging).unwrap();
        std::fs::rename(&staging, self.dir.path().join("..data")).unwrap();
    }
}

/// Sends one datagram to the denied port; true when it arrived.
fn probe(pair: &Pair, receiver: &UdpSocket) -> bool {
    let sender = pair
        .client
        .run(|| UdpSocket::bind((Pair::CLIENT_V4, 0)))
        .unwrap()
        .unwrap();
    sender
        .send_to(b"probe", (Pair::SERVER_V4, DENIED_PORT))
        .unwrap();
    let mut buf = [0u8; 16];
    receiver.recv(&mut buf).is_ok()
}

const ALLOW_9000: &str = "[filter]\ndefault = \"allow\"\n[[rule]]\nname = \"deny-9000\"\naction = \"allow\"\nproto = \"udp\"\ndport = 9000\n";

#[test]
fn reloads_on_every_kind_of_change_and_rejects_bad_files() {
    let pair = Pair::create("reload").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let receiver = denied_receiver(&pair, Duration::from_millis(300));
    let mut config_map = ConfigMapDir::new(RULES);
    let mut agent = start_agent(
        &pair.server,
        &["--detach-on-exit", "--iface", &pair.server_if],
        &config_map.rules(),
    );
    let reloaded = |agent: &mut Daemon| agent.expect("rules reloaded", Duration::from_secs(5));
    assert!(!probe(&pair, &receiver));

    // Kubernetes: the ..data symlink swap.
    config_map.publish(ALLOW_9000);
    reloaded(&mut agent);
    assert!(probe(&pair, &receiver));

    // A broken file: rejected with its location, the old rules stay.
    config_map.publish(
        "[filter]\ndefault = \"allow\"\n[[rule]]\nname = \"x\"\naction = \"deny\"\ndport = 9000\n",
    );
    let rejected = agent.expect("reload rejected", Duration::from_secs(5));
    assert!(rejected.contains("rules.toml:6:9: "), "{rejected}");
    assert!(probe(&pair, &receiver));
    let metrics = http_get(&pair.server, "127.0.0.1:9469", "/metrics");
    for counted in [
        "filter_agent_reloads_total{result=\"success\"} 1\n",
        "filter_agent_reloads_total{result=\"failure\"} 1\n",
    ] {
        assert!(metrics.contains(counted), "{counted} not in {metrics}");
    }

    // An editor's rename-write of a plain file, then SIGHUP.
    let plain = tempfile::tempdir().unwrap();
    let path = plain.path().join("rules.toml");
    std::fs::write(&path, ALLOW_9000).unwrap();
    drop(agent);
    let mut agent = start_agent(
        &pair.server,
        &["--detach-on-exit", "--iface", &pair.server_if],
        &path,
    );
    assert!(probe(&pair, &receiver));
    let staged = plain.path().join(".rules.toml.swp");
    std::fs::write(&staged, RULES).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    reloaded(&mut agent);
    assert!(!probe(&pair, &receiver));
    agent.signal(libc::SIGHUP);
    let line = reloaded(&mut agent);
    assert!(line.contains("SIGHUP"), "{line}");
    assert!(!probe(&pair, &receiver));

    // The rule kept its name through every reload: its count continues.
    let (_, log) = agent.stop();
    assert!(counted(&log, "deny-9000") >= 3, "{log:?}");
}

/// `GET path` from inside `ns`; the body of a 200 response.
fn http_get(ns: &testbed::Netns, address: &str, path: &str) -> String {
    let (status, body) = testbed::traffic::http_get(ns, address, path).unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

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
    let rules = rules_file(RULES);
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
    assert_eq!(http_get(&pair.server, address, "/healthz"), "ok\n");
    let iface = &pair.server_if;
    let allowed =
        format!("filter_agent_packets_total{{iface=\"{iface}\",reason=\"default_allow\"}} ");
    let mut text = String::new();
    wait_until(
        "the four datagrams in /metrics",
        Duration::from_secs(2),
        || {
            text = http_get(&pair.server, address, "/metrics");
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
    let text = http_get(&pair.server, address, "/metrics");
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

/// `filter-agent stats --json` for one interface: packets of `rule`.
fn stats_packets(json: &str, rule: &str) -> u64 {
    let document: serde_json::Value = serde_json::from_str(json).unwrap();
    document[0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["rule"] == rule)
        .unwrap_or_else(|| panic!("{rule} not in {json}"))["packets"]
        .as_u64()
        .unwrap()
}

#[test]
fn stats_read_the_pins_while_the_agent_is_down() {
    use std::io::BufRead as _;
    let pair = Pair::create("stats").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let receiver = denied_receiver(&pair, Duration::from_millis(100));
    let rules = rules_file(RULES);
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
    let rules = rules_file(RULES);
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

#[test]
fn one_agent_filters_several_interfaces() {
    let chain = testbed::Chain::create("multi", &["c", "h", "s"]).unwrap();
    let host = &chain.namespaces[1];
    let (inner, outer) = (chain.right_if(0), chain.left_if(1));
    let _pins = [inner.clone(), outer.clone()].map(|iface| Pins::of(&iface));
    let rules = rules_file(RULES);
    let mut command = host.command(AGENT);
    command
        .args([
            "--detach-on-exit",
            "--iface",
            &inner,
            "--iface",
            &outer,
            "--rules",
        ])
        .arg(rules.path());
    let mut agent = Daemon::start(command, None).unwrap();
    agent.expect("serving metrics", Duration::from_secs(10));
    for iface in [&inner, &outer] {
        let link = host.ip(&["link", "show", iface]).unwrap();
        assert!(
            String::from_utf8_lossy(&link.stdout).contains("xdp"),
            "{iface}"
        );
        let output = Command::new(AGENT)
            .args(["stats", "--json", "--iface", iface])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert_eq!(
            stats_packets(&String::from_utf8_lossy(&output.stdout), "deny-9000"),
            0
        );
    }
    let (status, log) = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "{log:?}");
    for iface in [&inner, &outer] {
        assert!(!pins::dir(iface).exists(), "{iface}");
        let link = host.ip(&["link", "show", iface]).unwrap();
        assert!(
            !String::from_utf8_lossy(&link.stdout).contains("xdp"),
            "{iface}"
        );
    }
}

/// `stats` and `guard` without `--iface` list every pinned interface; one
/// whose agent is just starting (its directory made, nothing pinned yet) is
/// passed over, not an error for all of them.
#[test]
fn listing_every_interface_passes_over_one_being_set_up() {
    let pair = Pair::create("list").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let rules = rules_file(RULES);
    let agent = start_agent(&pair.server, &["--iface", &pair.server_if], rules.path());
    let starting = Pins::of(&format!("{}x", pair.server_if));
    std::fs::create_dir(&starting.0).unwrap();
    for command in ["stats", "guard"] {
        let output = Command::new(AGENT)
            .args([command, "--json"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{command}: {output:?}");
        assert!(
            stdout.contains(&format!("\"{}\"", pair.server_if)),
            "{command}: {stdout}"
        );
    }
    drop(agent);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let pair = Pair::create("jsonlog").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let rules = rules_file(RULES);
    let args = [
        "--detach-on-exit",
        "--log-format",
        "json",
        "--iface",
        &pair.server_if,
    ];
    let mut agent = start_agent(&pair.server, &args, rules.path());
    agent.signal(libc::SIGHUP);
    agent.expect("rules reloaded", Duration::from_secs(5));
    let (status, lines) = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "{lines:?}");
    for line in &lines {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("{line:?}: {err}"));
        assert!(
            object["level"].is_string() && object["message"].is_string(),
            "{line}"
        );
    }
    for message in ["filter attached", "rules reloaded"] {
        assert!(
            lines.iter().any(|line| line.contains(message)),
            "no {message:?}: {lines:?}"
        );
    }
}
