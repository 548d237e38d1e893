//! `audit --upstream` and the agent's `[upstream]` metrics on real
//! namespaces: which reply ports a cloud ACL would cut off. Needs root.

mod support;

use support::AGENT;

use serde_json::Value;

/// Incident 1 predicted: a namespace using 1024-65000 behind a Sakura-style
/// filter that passes replies to 32768-61000 only is FLAGGED with exactly
/// the ports the filter drops and the entry that drops them; its fix, run
/// as printed, makes it OK.
#[test]
fn audit_upstream_flags_a_namespace_the_acl_would_cut_off() {
    let ns = testbed::Netns::create(&format!("fa-upa-{}", std::process::id())).unwrap();
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")
        .unwrap();
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/upstream/sakura.json"
    );
    let audit = || {
        let output = std::process::Command::new(AGENT)
            .args([
                "audit",
                "--upstream",
                sample,
                "--upstream-format",
                "sakura",
                "--json",
            ])
            .output()
            .unwrap();
        let document: Value = serde_json::from_slice(&output.stdout).unwrap();
        let ours = document["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["namespace"].as_str().unwrap().contains(ns.name()))
            .cloned()
            .expect("the audit did not list the namespace");
        (output.status.code(), document["allowed"].clone(), ours)
    };
    let (status, allowed, ours) = audit();
    assert_eq!(status, Some(1), "flagged, so exit 1");
    assert_eq!(allowed, serde_json::json!([32768, 61000]));
    let blocked: Vec<(String, u64, u64, String)> = ours["blocked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["proto"].as_str().unwrap().to_owned(),
                b["ports"][0].as_u64().unwrap(),
                b["ports"][1].as_u64().unwrap(),
                b["entry"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let deny = "Expression[10]: Deny ALL".to_owned();
    assert_eq!(
        blocked,
        [
            ("tcp".to_owned(), 1024, 32767, deny.clone()),
            ("tcp".to_owned(), 61001, 65000, deny.clone()),
            ("udp".to_owned(), 1024, 32767, deny.clone()),
            ("udp".to_owned(), 61001, 65000, deny),
        ]
    );
    let acl_fix = ours["acl_fixes"][0].as_str().expect("no ACL fix");
    assert!(
        acl_fix.contains(r#""DestinationPort": "1024-32767", "Action": "allow"} to web-servers above Expression[10]"#),
        "{acl_fix}"
    );
    let fix = ours["fixes"][0]["fix"].as_str().expect("no fix").to_owned();
    let applied = std::process::Command::new("sh")
        .args(["-c", &fix])
        .status()
        .unwrap();
    assert!(applied.success(), "{fix}");
    let (_, _, ours) = audit();
    assert_eq!(
        ours["blocked"],
        serde_json::json!([]),
        "still blocked after {fix}"
    );
}

/// `[upstream]` in the rules file: the agent's audit exports, per
/// namespace, the ports the cloud's ACL would cut off, the moment the
/// audit runs (here at the start).
#[test]
fn the_agent_exports_the_prediction_as_metrics() {
    let pair = testbed::Pair::create("upm").unwrap();
    let _pins = support::Pins::of(&pair.server_if);
    pair.client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65000")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/upstream/sakura.json"
    );
    std::fs::write(
        &rules,
        format!(
            "[filter]\ndefault = \"allow\"\n[upstream]\nfile = \"{sample}\"\nformat = \"sakura\"\n"
        ),
    )
    .unwrap();
    let agent = testbed::Daemon::agent(
        AGENT,
        &pair.server,
        [
            "--iface",
            &pair.server_if,
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    let wanted = format!("namespace=\"{}", pair.client.name());
    let mut seen = String::new();
    let found = testbed::within(std::time::Duration::from_secs(20), || {
        let Ok((_, body)) = testbed::traffic::http_get(&pair.server, "127.0.0.1:9469", "/metrics")
        else {
            return false;
        };
        seen = body
            .lines()
            .filter(|l| {
                l.starts_with("filter_agent_upstream_blocked_ports{") && l.contains(&wanted)
            })
            .map(str::to_owned)
            .collect::<Vec<_>>()
            .join("\n");
        !seen.is_empty()
    });
    assert!(
        found,
        "no upstream_blocked_ports series for {}",
        pair.client.name()
    );
    // 1024-32767 and 61001-65000, for TCP and for UDP replies.
    for proto in ["tcp", "udp"] {
        let series = seen
            .lines()
            .find(|l| {
                l.contains(&format!("proto=\"{proto}\"")) && l.contains("direction=\"inbound\"")
            })
            .unwrap_or_else(|| panic!("no {proto} series in {seen}"));
        assert!(series.ends_with(" 35744"), "{series}");
    }
    let (status, log) = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "{log:?}");
}

/// `audit` and `audit --upstream` print through one renderer and share
/// one exit rule: the same words for the same namespace, exit 1 when
/// anything is flagged, and the same closing error line.
#[test]
fn both_audits_say_it_the_same_way() {
    let ns = testbed::Netns::create(&format!("fa-upw-{}", std::process::id())).unwrap();
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")
        .unwrap();
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/upstream/sakura.json"
    );
    let upstream = ["audit", "--upstream", sample, "--upstream-format", "sakura"];
    for args in [&["audit"][..], &upstream[..]] {
        let output = std::process::Command::new(AGENT)
            .args(args)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stdout}{stderr}");
        let ours = stdout
            .lines()
            .find(|line| line.contains(ns.name()))
            .unwrap_or_else(|| panic!("{args:?} did not list {}: {stdout}", ns.name()));
        assert!(
            ours.starts_with("FLAGGED  ephemeral 1024-65000"),
            "{args:?}: {ours}"
        );
        assert!(
            stdout.lines().all(|line| !line.starts_with("OK ")),
            "{args:?}: {stdout}"
        );
        let closing = stderr.lines().last().unwrap_or_default();
        assert!(
            closing.starts_with("error: ") && closing.contains("flagged against"),
            "{args:?}: {stderr}"
        );
    }
}
