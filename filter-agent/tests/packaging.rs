//! The systemd unit verifies, and the agent speaks sd_notify to a real
//! notify socket: READY once the rules are attached, watchdog pings,
//! RELOADING/READY around a reload, STOPPING at the end. Needs root.

mod support;

use support::AGENT;

use std::{
    io::Write as _,
    os::unix::net::UnixDatagram,
    process::Command,
    time::{Duration, Instant},
};

use filter_agent::kernel::pins;
use testbed::{Daemon, Pair};

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/filter-agent.service"
);

#[test]
fn systemd_unit_verifies_cleanly() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    for needed in [
        "Type=notify",
        "ExecReload=/bin/sh -c '/usr/sbin/filter-agent check --rules /etc/filter-agent/rules.toml && kill -HUP \"$MAINPID\"'",
        "EnvironmentFile=-/etc/default/filter-agent",
        "--iface ${FILTER_AGENT_IFACES} --iface-timeout 45",
        "Before=network-pre.target",
        "StartLimitBurst=",
        "Restart=on-failure",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/sys/fs/bpf",
        "CapabilityBoundingSet=",
    ] {
        assert!(unit.contains(needed), "{needed} missing from the unit");
    }
    // systemd-analyze checks that ExecStart's binary exists: point it at
    // the one just built.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("filter-agent.service");
    std::fs::write(&path, unit.replace("/usr/sbin/filter-agent", AGENT)).unwrap();
    // The man page it names is installed by the package, not here.
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    // Unknown keys are only warnings: stderr must be empty too.
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Hardened: systemd's own exposure score, at most 3.0 (of 10).
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|line| {
            line.split("Overall exposure level for filter-agent.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {report}"));
    assert!(exposure <= 3.0, "exposure {exposure}:\n{report}");
}

/// Waits for a notify message containing `needle`; returns it.
fn expect(socket: &UnixDatagram, needle: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(message.clone());
            if message.lines().any(|line| line == needle) {
                return message;
            }
        }
    }
    panic!("no {needle} in {seen:?}");
}

#[test]
fn sd_notify_ready_watchdog_reload_and_stop() {
    let pair = Pair::create("notify").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut rules = tempfile::NamedTempFile::new().unwrap();
    rules.write_all(b"[filter]\ndefault = \"allow\"\n").unwrap();
    // systemd names the watched process in WATCHDOG_PID: the shell's pid,
    // which nsenter and then the agent inherit through exec.
    let mut command = Command::new("sh");
    command
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", "nsenter"])
        .arg(format!("--net=/run/netns/{}", pair.server.name()))
        .arg(AGENT)
        .args(["--detach-on-exit", "--iface", &pair.server_if, "--rules"])
        .arg(rules.path())
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env("JOURNAL_STREAM", "8:12345");
    let mut agent = Daemon::start(command, None).unwrap();
    let mut seen = Vec::new();
    let ready = expect(&socket, "READY=1", &mut seen);
    assert!(
        ready.contains(&format!("STATUS=filtering {}", pair.server_if)),
        "{ready}"
    );
    // By READY the filter is attached.
    let link = pair.server.ip(&["link", "show", &pair.server_if]).unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains("xdp"));
    expect(&socket, "WATCHDOG=1", &mut seen);
    agent.signal(libc::SIGHUP);
    expect(&socket, "RELOADING=1", &mut seen);
    expect(&socket, "READY=1", &mut seen);
    agent.expect("rules reloaded", Duration::from_secs(5));
    agent.signal(libc::SIGTERM);
    expect(&socket, "STOPPING=1", &mut seen);
    let (status, log) = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "{log:?}");
    assert!(!pins::dir(&pair.server_if).exists());
    // journald stamps each line itself: the agent's lines carry no time.
    let stamped = |line: &&String| line.starts_with(|c: char| c.is_ascii_digit());
    assert!(
        !log.is_empty() && !log.iter().any(|line| stamped(&line)),
        "{log:?}"
    );
}

#[test]
fn kubernetes_rules_are_valid() {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/kubernetes/filter-agent.yaml"
    ))
    .unwrap();
    // The ConfigMap's rules.toml block, unindented.
    let rules: String = manifest
        .lines()
        .skip_while(|line| line.trim() != "rules.toml: |")
        .skip(1)
        .take_while(|line| line.starts_with("    ") || line.is_empty())
        .map(|line| format!("{}\n", line.get(4..).unwrap_or_default()))
        .collect();
    let config = filter_agent::rules::config::parse(std::path::Path::new("rules.toml"), &rules)
        .unwrap_or_else(|err| panic!("{err}\n{rules}"));
    assert!(config.rules.len() >= 5);
    filter_agent::rules::compile::compile(&config).unwrap();
    for needed in [
        "kind: DaemonSet",
        "hostNetwork: true",
        "prometheus.io/scrape: \"true\"",
        "prometheus.io/port: \"9469\"",
        "path: /sys/fs/bpf",
        "--iface=$(FILTER_AGENT_IFACES)",
        // The Debian package's layout.
        "command: [\"/usr/sbin/filter-agent\"]",
        "--rules=/etc/filter-agent/rules.toml",
        "mountPath: /etc/filter-agent",
    ] {
        assert!(manifest.contains(needed), "{needed} missing");
    }
}

/// The shipped alerting rules load, and their unit tests (one per alert,
/// firing and not firing) pass.
#[test]
fn alerting_rules_check_and_their_tests_pass() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/prometheus");
    let runs: [&[&str]; 3] = [
        &["check", "rules", "filter-agent.rules.yml"],
        &["test", "rules", "filter-agent.rules.test.yml"],
        &["check", "config", "prometheus.yml"],
    ];
    for args in runs {
        let output = Command::new("promtool")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// `systemctl reload` runs the unit's ExecReload: run here the same way
/// (its command, with MAINPID set), it fails on a rules file `check`
/// rejects, without signalling the agent, and applies a good one.
#[test]
fn the_units_reload_command_refuses_a_bad_file_and_applies_a_good_one() {
    let pair = Pair::create("reloadcmd").unwrap();
    let _pins = support::Pins::of(&pair.server_if);
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[filter]\ndefault = \"allow\"\n").unwrap();
    let args = ["--detach-on-exit", "--iface", &pair.server_if, "--rules"];
    let args = args.map(std::ffi::OsStr::new).into_iter();
    let mut agent = Daemon::agent(AGENT, &pair.server, args.chain([rules.as_os_str()]));
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let reload = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecReload=/bin/sh -c "))
        .expect("ExecReload runs a shell command")
        .trim_matches('\'')
        .replace("/usr/sbin/filter-agent", AGENT)
        .replace("/etc/filter-agent/rules.toml", rules.to_str().unwrap());
    let systemctl_reload = || {
        Command::new("sh")
            .args(["-c", &reload])
            .env("MAINPID", agent.pid().to_string())
            .output()
            .unwrap()
    };
    std::fs::write(&rules, "[filter]\ndefault = \"maybe\"\n").unwrap();
    let refused = systemctl_reload();
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("rules.toml:2:11"),
        "{refused:?}"
    );
    std::fs::write(&rules, "[filter]\ndefault = \"deny\"\n").unwrap();
    let applied = systemctl_reload();
    assert!(applied.status.success(), "{applied:?}");
    agent.expect("rules reloaded", Duration::from_secs(5));
    let (_, log) = agent.stop();
    // The refused file never reached the agent.
    assert!(
        !log.iter().any(|line| line.contains("reload rejected")),
        "{log:?}"
    );
}
