//! Pins left by another release: an older layout is taken over under
//! traffic (what kept its shape keeps counting, what changed starts afresh
//! and is named), a newer one is refused in one line and left as it was.
//! The pins of a release before layouts were recorded are those of this
//! one without the `LAYOUT` record. Needs root (and bpftool, which
//! `cargo xtask setup` installs).

use std::{net::SocketAddr, process::Command, time::Duration};

use filter_agent::kernel::layout;
use testbed::{Daemon, Pair, steady::Steady, wait_until};

mod support;
use support::{
    AGENT, DENIED_PORT, DENY_9000, Pins, error_line, rules_file, start_agent, stats_packets,
};

/// Allowed by `DENY_9000`.
const ALLOWED_PORT: u16 = 9001;

/// `filter-agent stats --json` for `iface`.
fn stats(iface: &str) -> String {
    let output = Command::new(AGENT)
        .args(["stats", "--json", "--iface", iface])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// `stats --json`'s one document: its pin layout and generation.
fn layout_of(stats: &str) -> (u64, u64) {
    let documents: serde_json::Value = serde_json::from_str(stats).unwrap();
    let document = &documents[0];
    let number = |key: &str| document[key].as_u64().unwrap();
    (number("layout"), number("generation"))
}

fn bpftool(args: &[&str]) -> String {
    let output = Command::new("bpftool").args(args).output().unwrap();
    assert!(output.status.success(), "bpftool {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An agent's interface with `DENY_9000`, its pins removed when the test
/// ends, and a control socket of the test's own (tests run in parallel).
struct Filtered {
    pair: Pair,
    pins: Pins,
    rules: tempfile::NamedTempFile,
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Filtered {
    fn new(tag: &str) -> Self {
        let pair = Pair::create(tag).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let iface = pair.server_if.as_str();
        let args = [
            "--iface",
            iface,
            "--control-socket",
            socket.to_str().unwrap(),
        ];
        Self {
            pins: Pins::of(&pair.server_if),
            rules: rules_file(DENY_9000),
            args: args.map(str::to_owned).to_vec(),
            _dir: dir,
            pair,
        }
    }

    fn start(&self) -> Daemon {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        start_agent(&self.pair.server, &args, self.rules.path())
    }
}

fn steady(pair: &Pair) -> Steady {
    let at = |port| SocketAddr::from((Pair::SERVER_V4, port));
    Steady::start(
        &pair.client,
        &pair.server,
        at(ALLOWED_PORT),
        at(DENIED_PORT),
    )
    .unwrap()
}

#[test]
fn an_older_layout_is_taken_over_without_a_gap_and_says_what_it_reset() {
    let filtered = Filtered::new("upg");
    let (pair, pins) = (&filtered.pair, &filtered.pins);
    let agent = filtered.start();
    let mut traffic = steady(pair);
    wait_until("denied datagrams counted", Duration::from_secs(5), || {
        stats_packets(&stats(&pair.server_if), "deny-9000") >= 50
    });
    let (status, log) = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "{log:?}");
    let before = stats(&pair.server_if);
    assert_eq!(layout_of(&before).0, u64::from(layout::CURRENT));

    // As a release before layouts left it: no record; and a counter map
    // of another shape than this release's (7 reasons where it had 3).
    std::fs::remove_file(pins.0.join(layout::PIN)).unwrap();
    let reasons = pins.0.join("STATS");
    std::fs::remove_file(&reasons).unwrap();
    let path = reasons.to_str().unwrap();
    bpftool(&[
        "map",
        "create",
        path,
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "16",
        "entries",
        "3",
        "name",
        "STATS",
    ]);

    let agent = filtered.start();
    let said = agent
        .seen()
        .iter()
        .find(|line| line.contains("taking over the pins of an older release"))
        .unwrap_or_else(|| panic!("{:?}", agent.seen()));
    assert!(said.contains("from=1") && said.contains("to=2"), "{said}");
    assert!(
        said.contains("carried=") && said.contains("GUARD_STATS"),
        "{said}"
    );
    assert!(said.contains("STATS (entries 3 -> 7)"), "{said}");
    let carried = stats_packets(&before, "deny-9000");
    wait_until(
        "counting on after the takeover",
        Duration::from_secs(5),
        || stats_packets(&stats(&pair.server_if), "deny-9000") >= carried + 50,
    );
    let after = stats(&pair.server_if);
    assert_eq!(
        layout_of(&after),
        (u64::from(layout::CURRENT), 1),
        "{after}"
    );
    let tally = traffic.stop();
    drop(agent);
    assert_eq!(tally.denied_delivered, 0, "{tally:?}");
    assert_eq!(tally.allowed_lost(), 0, "{tally:?}");
    assert!(tally.allowed_sent > 100, "{tally:?}");
}

#[test]
fn a_newer_layout_is_refused_in_one_line_and_left_as_it_was() {
    let filtered = Filtered::new("upn");
    let (pair, pins) = (&filtered.pair, &filtered.pins);
    let (status, log) = filtered.start().stop();
    assert!(status.is_some_and(|s| s.success()), "{log:?}");

    // The record as a later release would write it: version 3.
    let record = pins.0.join(layout::PIN);
    let record = record.to_str().unwrap();
    let shown = bpftool(&["map", "dump", "pinned", record, "-j"]);
    let dumped: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let mut value: Vec<String> = dumped[0]["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|byte| byte.as_str().unwrap().to_owned())
        .collect();
    value[0] = "0x03".into();
    let mut update = vec![
        "map", "update", "pinned", record, "key", "0", "0", "0", "0", "value",
    ];
    update.extend(value.iter().map(String::as_str));
    bpftool(&update);

    let mut traffic = steady(pair);
    let output = pair
        .server
        .command(AGENT)
        .args(&filtered.args)
        .arg("--rules")
        .arg(filtered.rules.path())
        .output()
        .unwrap();
    let error = error_line(&output);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        error.contains("pins of a newer filter-agent (layout 3")
            && error.contains(&format!("filter-agent detach {}", pair.server_if)),
        "{error}"
    );
    let after = stats(&pair.server_if);
    assert_eq!(layout_of(&after).0, 3, "{after}");
    let tally = traffic.stop();
    assert_eq!(tally.denied_delivered, 0, "{tally:?}");
    assert_eq!(tally.allowed_lost(), 0, "{tally:?}");
}
