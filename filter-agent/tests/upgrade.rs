//! Pins left by another release: an older layout is taken over under
//! traffic (what kept its shape keeps counting, what changed starts afresh
//! and is named), a newer one is refused in one line and left as it was.
//! The pins of a release before layouts were recorded are those of this
//! one without the `LAYOUT` record. Needs root (and bpftool, which
//! `cargo xtask setup` installs).

use std::{net::SocketAddr, process::Command, time::Duration};

use filter_agent::kernel::layout;
use testbed::{Pair, steady::Steady, wait_until};

mod support;
use support::{AGENT, DENIED_PORT, DENY_9000, Pins, error_line, rules_file, start_agent};

/// Allowed by `DENY_9000`.
const ALLOWED_PORT: u16 = 9001;

/// `filter-agent stats --json` for `iface`: its one document.
fn stats(iface: &str) -> serde_json::Value {
    let output = Command::new(AGENT)
        .args(["stats", "--json", "--iface", iface])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let mut documents: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    documents[0].take()
}

fn rule_packets(stats: &serde_json::Value, rule: &str) -> u64 {
    let rules = stats["rules"].as_array().unwrap();
    let entry = rules.iter().find(|entry| entry["rule"] == rule).unwrap();
    entry["packets"].as_u64().unwrap()
}

fn bpftool(args: &[&str]) -> String {
    let output = Command::new("bpftool").args(args).output().unwrap();
    assert!(output.status.success(), "bpftool {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `--iface IFACE` and a control socket of the test's own (tests run in
/// parallel).
fn agent_args(iface: &str, dir: &tempfile::TempDir) -> Vec<String> {
    let socket = dir.path().join("control.sock");
    let socket = socket.to_str().unwrap();
    ["--iface", iface, "--control-socket", socket]
        .map(str::to_owned)
        .to_vec()
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
    let pair = Pair::create("upg").unwrap();
    let pins = Pins::of(&pair.server_if);
    let rules = rules_file(DENY_9000);
    let dir = tempfile::tempdir().unwrap();
    let args = agent_args(&pair.server_if, &dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = start_agent(&pair.server, &args, rules.path());
    let mut traffic = steady(&pair);
    wait_until("denied datagrams counted", Duration::from_secs(5), || {
        rule_packets(&stats(&pair.server_if), "deny-9000") >= 50
    });
    let (status, log) = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "{log:?}");
    let before = stats(&pair.server_if);
    assert_eq!(before["layout"], layout::CURRENT);

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

    let agent = start_agent(&pair.server, &args, rules.path());
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
    let carried = rule_packets(&before, "deny-9000");
    wait_until(
        "counting on after the takeover",
        Duration::from_secs(5),
        || rule_packets(&stats(&pair.server_if), "deny-9000") >= carried + 50,
    );
    let after = stats(&pair.server_if);
    assert_eq!(after["layout"], layout::CURRENT);
    assert_eq!(after["generation"], 1, "{after}");
    let tally = traffic.stop();
    drop(agent);
    assert_eq!(tally.denied_delivered, 0, "{tally:?}");
    assert_eq!(tally.allowed_lost(), 0, "{tally:?}");
    assert!(tally.allowed_sent > 100, "{tally:?}");
}

#[test]
fn a_newer_layout_is_refused_in_one_line_and_left_as_it_was() {
    let pair = Pair::create("upn").unwrap();
    let pins = Pins::of(&pair.server_if);
    let rules = rules_file(DENY_9000);
    let dir = tempfile::tempdir().unwrap();
    let args = agent_args(&pair.server_if, &dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, log) = start_agent(&pair.server, &args, rules.path()).stop();
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

    let mut traffic = steady(&pair);
    let output = pair
        .server
        .command(AGENT)
        .args(&args)
        .arg("--rules")
        .arg(rules.path())
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
    assert_eq!(after["layout"], 3, "{after}");
    let tally = traffic.stop();
    assert_eq!(tally.denied_delivered, 0, "{tally:?}");
    assert_eq!(tally.allowed_lost(), 0, "{tally:?}");
}
