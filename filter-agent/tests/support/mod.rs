//! What the agent's integration tests share: its binary, rules files and
//! the rules several tests run, starting it, reading its output, probing
//! the denied port, pins removed when a test ends, and random rule sets
//! ([`random`]). Each test binary uses part of it.
#![allow(dead_code)]

pub mod random;

use std::{
    ffi::OsStr,
    io::Write as _,
    net::UdpSocket,
    path::{Path, PathBuf},
    process::Output,
    thread,
    time::Duration,
};

use filter_agent::{kernel::loader, kernel::pins};
use testbed::{Daemon, Netns, Pair};

/// The agent binary under test.
pub const AGENT: &str = env!("CARGO_BIN_EXE_filter-agent");

/// A temporary rules file holding `text`.
pub fn rules_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

/// The agent in `ns` with `args` and `--rules RULES`; stopped on drop.
pub fn start_agent(ns: &Netns, args: &[&str], rules: &Path) -> Daemon {
    let args = args.iter().map(OsStr::new).chain([OsStr::new("--rules")]);
    Daemon::agent(AGENT, ns, args.chain([rules.as_os_str()]))
}

/// An interface's pin directory, removed (with the filter it keeps
/// attached) when the test ends, also on failure.
pub struct Pins(pub PathBuf);

impl Pins {
    pub fn of(iface: &str) -> Self {
        Self(pins::dir(iface))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        loader::detach(&self.0);
    }
}

/// The demo's rules (examples/rules.toml): default deny, the guard on.
pub const RULES: &str = include_str!("../../../examples/rules.toml");

/// A command's standard output.
pub fn text(output: Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits for `child` to exit and returns its output, or kills it and fails
/// once `deadline` has passed.
pub fn output_within(child: std::process::Child, deadline: Duration, what: &str) -> Output {
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
pub fn error_line(output: &Output) -> String {
    assert!(!output.status.success(), "the agent started");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "not one error line: {stderr}");
    errors[0].to_owned()
}

/// Whether `iface` in `ns` has an XDP program.
pub fn xdp_attached(ns: &Netns, iface: &str) -> bool {
    ns.ip(&["link", "show", "dev", iface])
        .is_ok_and(|output| text(output).contains("prog/xdp"))
}

/// Where the agent serves metrics by default.
pub const METRICS: &str = "127.0.0.1:9469";

/// The port `DENY_9000` denies.
pub const DENIED_PORT: u16 = 9000;

/// Allows everything but UDP to `DENIED_PORT`.
pub const DENY_9000: &str = r#"
[filter]
default = "allow"

[[rule]]
name = "deny-9000"
action = "deny"
proto = "udp"
dport = 9000
"#;

/// A UDP socket on the denied port in `pair`'s server namespace.
pub fn denied_receiver(pair: &Pair, timeout: Duration) -> UdpSocket {
    let receiver = pair
        .server
        .run(|| UdpSocket::bind(("0.0.0.0", DENIED_PORT)))
        .unwrap()
        .unwrap();
    receiver.set_read_timeout(Some(timeout)).unwrap();
    receiver
}

/// Sends one datagram to the denied port; true when it arrived.
pub fn probe(pair: &Pair, receiver: &UdpSocket) -> bool {
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

/// `GET path` from inside `ns`; the body of a 200 response.
/// The body of a GET that must answer 200.
pub fn http_ok(ns: &Netns, address: &str, path: &str) -> String {
    let (status, body) = testbed::traffic::http_get(ns, address, path).unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// `filter-agent stats --json` for one interface: packets of `rule`.
pub fn stats_packets(json: &str, rule: &str) -> u64 {
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
