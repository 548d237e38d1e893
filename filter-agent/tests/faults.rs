//! Faults the agent must survive cleanly: a start that fails leaves the
//! kernel as it found it (tc qdiscs and filters, XDP, pins), whether the
//! verifier refused the program or an attach failed half-way; rule changes
//! are applied while packets are being denied. Needs root.
//! `cargo xtask vm-test` runs the same two starts on Debian's kernels.

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    process::Output,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use filter_agent::{kernel::counters, kernel::loader, kernel::pins};
use support::{AGENT, Pins, rules_file, start_agent};
use testbed::{
    Daemon, Netns, Pair,
    traffic::{Responder, http_get, icmp_echo, tcp_attempt, tcp_exchange, udp_exchange},
    wait_until,
};

mod support;

/// The object the agent embeds (build.rs writes it here).
const OBJECT: &str = concat!(env!("OUT_DIR"), "/filter");
/// The demo's rules: default deny, and the guard on.
const RULES: &str = include_str!("../../examples/rules.toml");

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

fn text(output: Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
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

/// Waits for `child` to exit and returns its output, or kills it and fails
/// once `deadline` has passed.
fn output_within(child: std::process::Child, deadline: Duration, what: &str) -> Output {
    let pid = child.id() as libc::pid_t;
    let (sender, exited) = std::sync::mpsc::channel();
    thread::spawn(move || sender.send(child.wait_with_output()));
    match exited.recv_timeout(deadline) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // SAFETY: a plain signal to our own child, which has not been reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what} did not return within {deadline:?}");
        }
    }
}

/// The only error line of a failed start.
fn error_line(output: &Output) -> String {
    assert!(!output.status.success(), "the agent started");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "not one error line: {stderr}");
    errors[0].to_owned()
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

fn xdp_attached(ns: &Netns, iface: &str) -> bool {
    ns.ip(&["link", "show", "dev", iface])
        .is_ok_and(|output| text(output).contains("prog/xdp"))
}

const METRICS: &str = "127.0.0.1:9469";

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

/// Runs `task` on a thread whose credentials are nobody's (65534): raw
/// syscalls change only the calling thread, which ends with `task`.
fn as_nobody<T: Send>(task: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                const NOBODY: libc::c_long = 65534;
                // SAFETY: plain credential syscalls on this thread only.
                let dropped = unsafe {
                    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
                        && libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY) == 0
                        && libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY) == 0
                };
                assert!(dropped, "cannot become nobody");
                task()
            })
            .join()
            .unwrap()
    })
}

#[test]
fn pin_directories_another_user_could_change_are_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let pair = Pair::create("owner").unwrap();
    let dir = pins::dir(&pair.server_if);
    std::fs::create_dir_all(&dir).unwrap();
    let _pins = Pins::of(&pair.server_if);
    let rules = rules_file(RULES);
    let start = || {
        let agent = pair
            .server
            .command(AGENT)
            .args(["--iface", &pair.server_if, "--rules"])
            .arg(rules.path())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        output_within(agent, Duration::from_secs(10), "the agent's start")
    };

    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let error = error_line(&start());
    let refused = format!("error: refusing {}: owned by uid 65534", dir.display());
    assert!(error.starts_with(&refused), "{error}");

    std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let error = error_line(&start());
    let refused = format!(
        "error: refusing {}: writable by group or others (mode 0777)",
        dir.display()
    );
    assert!(error.starts_with(&refused), "{error}");
    assert!(!xdp_attached(&pair.server, &pair.server_if));
}

#[test]
fn other_users_can_do_nothing_to_the_pins_or_the_event_socket() {
    use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
    let pair = Pair::create("umask").unwrap();
    let rules = rules_file(RULES);
    let mut command = pair.server.command(AGENT);
    command
        .args(["--detach-on-exit", "--iface", &pair.server_if, "--rules"])
        .arg(rules.path());
    // SAFETY: umask is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        })
    };
    let mut agent = Daemon::start(command, None).unwrap();
    agent.expect("ready", Duration::from_secs(10));

    let dir = pins::dir(&pair.server_if);
    let link = dir.join(pins::XDP_LINK);
    let socket = filter_agent::kernel::events::socket_path(&pair.server_if);
    for path in [
        Path::new(pins::ROOT),
        &dir,
        Path::new(filter_agent::kernel::events::SOCKET_DIR),
    ] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o022, 0, "{} has mode {mode:o}", path.display());
    }
    let socket_mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(socket_mode, 0o600, "{}", socket.display());
    let attempts = as_nobody(|| {
        [
            ("delete the XDP link", std::fs::remove_file(&link).is_ok()),
            (
                "rename the pin directory",
                std::fs::rename(&dir, dir.with_extension("moved")).is_ok(),
            ),
            ("list the pins", std::fs::read_dir(&dir).is_ok()),
            (
                "connect to the event socket",
                std::os::unix::net::UnixStream::connect(&socket).is_ok(),
            ),
        ]
    });
    for (what, done) in attempts {
        assert!(!done, "nobody could {what}");
    }
    assert!(xdp_attached(&pair.server, &pair.server_if));

    // Each command says what it needs instead of a misleading error.
    let iface = pair.server_if.as_str();
    for (args, task) in [
        (
            &["stats", "--iface", iface][..],
            "reading the filter's pinned counters",
        ),
        (&["guard"], "reading the filter's pinned counters"),
        (&["audit"], "auditing every network namespace"),
        (&["watch", "--iface", iface], "watching the agent's events"),
        (&["detach", "--iface", iface], "removing the filter's pins"),
    ] {
        let output = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", AGENT])
            .args(args)
            .output()
            .unwrap();
        let error = error_line(&output);
        assert!(
            error.starts_with(&format!("error: missing privileges: {task} needs"))
                && error.ends_with("run as root"),
            "{args:?}: {error}"
        );
    }
    agent.stop();
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

/// Kills and reaps a child process when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn hostile_names_cannot_break_the_metrics_page_or_the_log() {
    use std::os::unix::fs::PermissionsExt as _;
    let pair = Pair::create("names").unwrap();
    // Interface names may hold quotes and backslashes.
    let id = &pair.server_if[3..];
    let hostile_if = format!("f\"a\\{id}");
    let peer = format!("fa4{id}");
    let add = [
        "link",
        "add",
        &hostile_if,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
    ];
    pair.server.ip(&add).unwrap();
    pair.server.ip(&["link", "set", &hostile_if, "up"]).unwrap();
    // Process names may hold a newline too: one in a namespace whose port
    // range the audit flags, so that its name becomes a label.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = dir.path().join("ev\"il\\\nx");
    std::fs::copy("/bin/sleep", &program).unwrap();
    let child = std::process::Command::new("unshare")
        .args(["--net", "--", "sh", "-c"])
        .arg("echo '1024 2000' > /proc/sys/net/ipv4/ip_local_port_range && exec \"$0\" 600")
        .arg(&program)
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);
    let rules = rules_file(RULES);
    let mut agent = start_agent(
        &pair.server,
        &[
            "--detach-on-exit",
            "--iface",
            &pair.server_if,
            "--iface",
            &hostile_if,
        ],
        rules.path(),
    );
    // The escaped name, as both the log and the exposition format write it.
    let escaped = r#"ev\"il\\\nx"#;
    let line = agent.expect(escaped, Duration::from_secs(10));
    assert!(line.contains("audit:"), "{line}");
    assert!(
        !agent.seen().iter().any(|line| line.starts_with("x (net:")),
        "a process name split a log line: {:?}",
        agent.seen()
    );

    let (status, metrics) = http_get(&pair.server, METRICS, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains(escaped), "{metrics}");
    assert!(metrics.contains(r#"iface="f\"a\\"#), "{metrics}");
    let output = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut promtool| {
            use std::io::Write as _;
            promtool
                .stdin
                .take()
                .unwrap()
                .write_all(metrics.as_bytes())?;
            promtool.wait_with_output()
        })
        .expect("promtool (cargo xtask setup installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.is_empty(),
        "promtool check metrics: {said}\n{metrics}"
    );
    agent.stop();

    // The operator may keep processes out of the page any local user reads.
    let mut args = vec![
        "--detach-on-exit",
        "--metrics-hide-processes",
        "--iface",
        &pair.server_if,
    ];
    args.extend(["--iface", &hostile_if]);
    let mut agent = start_agent(&pair.server, &args, rules.path());
    agent.expect(escaped, Duration::from_secs(10));
    let (_, metrics) = http_get(&pair.server, METRICS, "/metrics").unwrap();
    let finding = metrics
        .lines()
        .find(|line| line.starts_with("filter_agent_audit_findings{namespace=\"net:["))
        .unwrap_or_else(|| panic!("no finding labelled by inode alone:\n{metrics}"));
    assert!(!metrics.contains("ev\\\"il"), "{finding}\n{metrics}");
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
