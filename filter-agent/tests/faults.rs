//! Faults the agent must survive cleanly: a start that fails leaves the
//! kernel as it found it (tc qdiscs and filters, XDP, pins), whether the
//! verifier refused the program or an attach failed half-way; rule changes
//! are applied while packets are being denied. Needs root.
//! `cargo xtask vm-test` runs the same two starts on Debian's kernels.

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use filter_agent::{kernel::loader, kernel::pins};
use support::{
    AGENT, METRICS, Pins, RULES, error_line, output_within, rules_file, start_agent, text,
};
use testbed::{
    Daemon, Netns, Pair,
    traffic::{Responder, http_get, tcp_attempt, tcp_exchange},
};

mod support;

/// The object the agent embeds (build.rs writes it here).
const OBJECT: &str = concat!(env!("OUT_DIR"), "/filter");

/// What the agent may have touched on `ifaces` in `ns`, as text.
fn kernel_state(ns: &Netns, ifaces: &[&str]) -> String {
    let mut state = String::new();
    for iface in ifaces {
        for args in [
            &["qdisc", "show", "dev", iface][..],
            &["filter", "show", "dev", iface, "ingress"],
            &["filter", "show", "dev", iface, "egress"],
        ] {
            state += &text(ns.exec("tc", args).unwrap());
        }
        state += &text(ns.ip(&["-d", "link", "show", "dev", iface]).unwrap())
            .lines()
            .filter(|line| line.contains("xdp"))
            .collect::<String>();
        state += &format!("pins: {}\n", pins::dir(iface).exists());
    }
    state
}

/// Asserts that the state on `ifaces` is `before` again. Checked once: the
/// kernel has released the links, filters and pins of an agent by the time
/// its exit is reported.
fn assert_state_restored(ns: &Netns, ifaces: &[&str], before: &str, after: &str) {
    let now = kernel_state(ns, ifaces);
    assert_eq!(
        now, before,
        "{after}, the kernel state is not what it was (left: now, right: before)"
    );
}

#[test]
fn a_refused_program_is_one_line_and_leaves_nothing() {
    let pair = Pair::create("ref").unwrap();
    let object = tempfile::NamedTempFile::new().unwrap();
    let refused = testbed::refused_object(&std::fs::read(OBJECT).unwrap()).unwrap();
    std::fs::write(object.path(), refused).unwrap();
    let rules = rules_file(RULES);
    let ifaces = [pair.server_if.as_str()];
    let before = kernel_state(&pair.server, &ifaces);

    let output = pair
        .server
        .command(AGENT)
        .env(loader::OBJECT_ENV, object.path())
        .args(["--iface", &pair.server_if, "--rules"])
        .arg(rules.path())
        .output()
        .unwrap();

    let error = error_line(&output);
    assert!(
        error.contains("refused the program `filter`") && error.contains("unknown opcode f6"),
        "{error}"
    );
    let log = Path::new(loader::VERIFIER_LOG_DIR).join("verifier-filter.log");
    assert!(error.contains(&log.display().to_string()), "{error}");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("unknown opcode f6")
    );
    assert_state_restored(&pair.server, &ifaces, &before, "after a refused start");
}

#[test]
fn a_failed_attach_on_a_later_interface_undoes_the_earlier_ones() {
    let pair = Pair::create("half").unwrap();
    // A bridge has no native XDP: the second attach fails after the first
    // interface got its XDP link, its egress program and its pins.
    let bridge = pair.client_if.replacen("fac", "fab", 1);
    pair.server
        .ip(&["link", "add", &bridge, "type", "bridge"])
        .unwrap();
    pair.server.ip(&["link", "set", &bridge, "up"]).unwrap();
    let rules = rules_file(RULES);
    let ifaces = [pair.server_if.as_str(), bridge.as_str()];
    let before = kernel_state(&pair.server, &ifaces);

    let output = pair
        .server
        .command(AGENT)
        .args(["--xdp-mode", "native", "--iface", &pair.server_if])
        .args(["--iface", &bridge, "--rules"])
        .arg(rules.path())
        .output()
        .unwrap();

    let error = error_line(&output);
    assert!(
        error.contains(&format!("cannot attach to {bridge} in native mode")),
        "{error}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("filter attached iface={}", pair.server_if)),
        "the first interface was never attached, so nothing was undone: {stderr}"
    );
    assert_state_restored(&pair.server, &ifaces, &before, "after a failed attach");
}

#[test]
fn rule_changes_are_applied_while_packets_are_being_denied() {
    let pair = Pair::create("flood").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let mut agent = Daemon::start(
        {
            let mut command = pair.server.command(AGENT);
            command
                .args(["--detach-on-exit", "--iface", &pair.server_if, "--rules"])
                .arg(&rules);
            command
        },
        None,
    )
    .unwrap();
    agent.expect("ready", Duration::from_secs(10));
    let sender = pair
        .client
        .run(|| UdpSocket::bind((Pair::CLIENT_V4, 0)))
        .unwrap()
        .unwrap();
    let flooding = AtomicBool::new(true);
    let sent = AtomicU64::new(0);
    thread::scope(|scope| {
        // Denied datagrams as fast as one thread can send them: every
        // CPU's event budget is spent, so the agent gets events all the time.
        scope.spawn(|| {
            while flooding.load(Ordering::Relaxed) {
                if sender.send_to(b"deny", (Pair::SERVER_V4, 9999)).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let rewrites = 3;
        for rewrite in 0..rewrites {
            let staged = dir.path().join("rules.new");
            std::fs::write(&staged, format!("{RULES}\n# rewrite {rewrite}\n")).unwrap();
            std::fs::rename(&staged, &rules).unwrap();
            let applied = agent.wait_for("rules reloaded", Duration::from_secs(2));
            if applied.is_none() {
                flooding.store(false, Ordering::Relaxed);
            }
            assert!(
                applied.is_some(),
                "rewrite {} of {rewrites} was not applied within 2 s under a flood of {} denied packets",
                rewrite + 1,
                sent.load(Ordering::Relaxed)
            );
        }
        flooding.store(false, Ordering::Relaxed);
    });
    // Every denied packet is an event within the budget: the agent was
    // busy with them the whole time, or the test proved nothing.
    let (_, log) = agent.stop();
    let denied = log
        .iter()
        .find(|line| line.contains("counted") && line.contains("reason=\"default_deny\""))
        .and_then(|line| {
            line.split("packets=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    assert!(denied >= 1000, "only {denied} packets were denied: {log:?}");
}

#[test]
fn rules_files_that_are_not_regular_files_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("rules.toml");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    // A FIFO nobody writes to blocks a reader forever; /dev/zero never ends.
    for path in [fifo.as_path(), Path::new("/dev/zero")] {
        let check = std::process::Command::new(AGENT)
            .args(["check", "--rules"])
            .arg(path)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let what = format!("`check --rules {}`", path.display());
        let output = output_within(check, Duration::from_secs(5), &what);
        let status = output.status;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr.trim(),
            format!("error: rules file {} is not a regular file", path.display())
        );
    }
}

#[test]
fn the_first_summary_after_a_restart_reports_only_what_is_new() {
    let pair = Pair::create("first").unwrap();
    // Left in place by both agents; removing the pins detaches the filter.
    let _pins = Pins::of(&pair.server_if);
    let rules = rules_file(RULES);
    let client = SocketAddr::from((Pair::CLIENT_V4, 7));
    // Outbound attempts from a port outside the ephemeral range: one SYN
    // each, counted by the guard's egress half.
    let attempts = |count: usize| {
        for _ in 0..count {
            tcp_attempt(&pair.server, client, Some(5000)).unwrap();
        }
    };
    let start = || {
        let mut command = pair.server.command(AGENT);
        command
            .args(["--iface", &pair.server_if, "--rules"])
            .arg(rules.path());
        let mut agent = Daemon::start(command, None).unwrap();
        agent.expect("ready", Duration::from_secs(10));
        agent
    };
    let agent = start();
    attempts(3);
    // Stopped without detaching: the counts stay pinned.
    agent.stop();
    let mut agent = start();
    attempts(2);
    let summary = agent.expect("guard: traffic on local ports", Duration::from_secs(15));
    assert!(summary.contains("outbound_attempts=2 "), "{summary}");
    agent.stop();
}

#[test]
fn health_and_signals_are_served_while_a_big_set_compiles() {
    let pair = Pair::create("big").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let mut agent = start_agent(
        &pair.server,
        &["--detach-on-exit", "--iface", &pair.server_if],
        &rules,
    );
    // Two million /32s: seconds of compiling.
    let mut set = String::with_capacity(2_000_000 * 16);
    let mut state = 0x9e37_79b9u32;
    for _ in 0..2_000_000 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        set += &format!("{}/32\n", std::net::Ipv4Addr::from(state));
    }
    std::fs::write(dir.path().join("big.txt"), set).unwrap();
    let staged = dir.path().join("rules.new");
    let big = RULES.replace(
        "blocklist = [\"198.51.100.0/24\", \"2001:db8:bad::/48\"]",
        "blocklist = { file = \"big.txt\" }",
    );
    assert_ne!(big, RULES);
    std::fs::write(&staged, big).unwrap();
    std::fs::rename(&staged, &rules).unwrap();
    agent.expect("reloading", Duration::from_secs(2));

    let asked = Instant::now();
    let (status, body) = http_get(&pair.server, METRICS, "/healthz").unwrap();
    let answered = asked.elapsed();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert!(
        answered < Duration::from_millis(500),
        "/healthz took {answered:?} during a reload"
    );
    agent.signal(libc::SIGTERM);
    agent.expect("SIGTERM received during a reload", Duration::from_secs(1));
    let (status, log) = agent.stop();
    assert!(status.is_some_and(|status| status.success()), "{log:?}");
    assert!(
        !log.iter().any(|line| line.contains("rules reloaded")),
        "{log:?}"
    );
}

#[test]
fn a_new_listener_is_known_before_its_first_client_packet() {
    let pair = Pair::create("listen").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    let dropping = RULES.replace("action = \"count\"", "action = \"drop\"");
    assert_ne!(dropping, RULES);
    std::fs::write(&rules, dropping).unwrap();
    let _agent = start_agent(
        &pair.server,
        &["--detach-on-exit", "--iface", &pair.server_if],
        &rules,
    );
    // Started after the agent's scan of listening sockets, on a port
    // outside the ephemeral range that the rules allow (web, 8080).
    let _service = Responder::start(&pair.server, 8080).unwrap();
    let service = SocketAddr::from((Pair::SERVER_V4, 8080));
    let answered = (0..20)
        .filter(|_| tcp_exchange(&pair.client, service, None).unwrap())
        .count();
    let report =
        filter_agent::kernel::guard::GuardReport::read_pinned(&pins::dir(&pair.server_if)).unwrap();
    let out_of_range = report.stats[filter_common::guard::RETURN_OUT_OF_RANGE as usize].packets;
    assert_eq!(
        (answered, out_of_range),
        (20, 0),
        "(connections answered, return packets counted out of range)"
    );
}
