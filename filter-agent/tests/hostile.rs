//! Hostile local users and hostile names: pins and the event socket other
//! users cannot touch, pin directories they could change refused, names
//! that cannot break the metrics page or the log. Needs root.

use std::{path::Path, thread, time::Duration};

use filter_agent::kernel::pins;
mod support;

use support::{
    AGENT, METRICS, Pins, RULES, error_line, output_within, rules_file, start_agent, xdp_attached,
};
use testbed::{Daemon, Pair, traffic::http_get};

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
