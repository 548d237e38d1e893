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

const RESTARTS: usize = 3;

mod support;
use support::{
    AGENT, DENIED_PORT, DENY_9000, Pins, denied_receiver, http_ok, probe, rules_file, start_agent,
    stats_packets,
};

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
    let rules = rules_file(DENY_9000);

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
    let rules = rules_file(DENY_9000);
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

const ALLOW_9000: &str = "[filter]\ndefault = \"allow\"\n[[rule]]\nname = \"deny-9000\"\naction = \"allow\"\nproto = \"udp\"\ndport = 9000\n";

#[test]
fn reloads_on_every_kind_of_change_and_rejects_bad_files() {
    let pair = Pair::create("reload").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let receiver = denied_receiver(&pair, Duration::from_millis(300));
    let mut config_map = ConfigMapDir::new(DENY_9000);
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
    let metrics = http_ok(&pair.server, "127.0.0.1:9469", "/metrics");
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
    std::fs::write(&staged, DENY_9000).unwrap();
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

#[test]
fn one_agent_filters_several_interfaces() {
    let chain = testbed::Chain::create("multi", &["c", "h", "s"]).unwrap();
    let host = &chain.namespaces[1];
    let (inner, outer) = (chain.right_if(0), chain.left_if(1));
    let _pins = [inner.clone(), outer.clone()].map(|iface| Pins::of(&iface));
    let rules = rules_file(DENY_9000);
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
    let rules = rules_file(DENY_9000);
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
    let rules = rules_file(DENY_9000);
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
