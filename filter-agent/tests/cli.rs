//! The binary's error behaviour: one line on stderr, a non-zero exit, never
//! a panic or a backtrace.

mod support;

use support::{AGENT, rules_file};

use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

/// Asserts exit code `code` and exactly one stderr line containing `needle`.
fn assert_one_line_error(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn missing_arguments() {
    assert_one_line_error(&agent(&[]), 2, "--iface");
    assert_one_line_error(&agent(&["--iface", "lo"]), 2, "--rules");
    assert_one_line_error(
        &agent(&["--iface", "lo", "--rules", "x", "--xdp-mode", "turbo"]),
        2,
        "turbo",
    );
}

#[test]
fn missing_rules_file() {
    let output = agent(&["--iface", "lo", "--rules", "/nonexistent/rules.toml"]);
    assert_one_line_error(&output, 1, "cannot read rules file /nonexistent/rules.toml");
}

#[test]
fn invalid_rules_file_names_line_and_column() {
    let rules = rules_file("[filter]\ndefault = \"sometimes\"\n");
    let path = rules.path().to_str().unwrap();
    let output = agent(&["--iface", "lo", "--rules", path]);
    assert_one_line_error(&output, 1, &format!("{path}:2:11: "));
}

#[test]
fn unknown_interface() {
    let rules = rules_file("[filter]\ndefault = \"allow\"\n");
    let output = agent(&[
        "--iface",
        "nosuchif0",
        "--rules",
        rules.path().to_str().unwrap(),
    ]);
    assert_one_line_error(&output, 1, "no network interface named `nosuchif0`");
}

#[test]
fn missing_privileges() {
    use std::os::unix::fs::PermissionsExt as _;
    let rules = rules_file("[filter]\ndefault = \"allow\"\n");
    std::fs::set_permissions(rules.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(AGENT)
        .args(["--iface", "lo", "--rules", rules.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_one_line_error(&output, 1, "missing privileges");
}

#[test]
fn check_accepts_and_rejects() {
    let good = rules_file("[filter]\ndefault = \"deny\"\n");
    let output = agent(&["check", "--rules", good.path().to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    // Valid, but a bare default deny cuts return traffic and SSH: warned, exit 0.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.matches("warning: ").count(), 3, "{stdout}");
    assert!(
        stdout.contains("no rule allows new SSH connections"),
        "{stdout}"
    );
    let bad = rules_file("[filter]\ndefault = \"deny\"\nextra = 1\n");
    let output = agent(&["check", "--rules", bad.path().to_str().unwrap()]);
    assert_one_line_error(&output, 1, ":3:1: ");
}

#[test]
fn test_command_reports_verdict_and_rule() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/rules.toml");
    let output = agent(&[
        "test",
        "--rules",
        rules,
        "--packet",
        "tcp 203.0.113.5:443 -> 10.0.0.11:51000 flags SA",
        "--packet",
        "udp 192.0.2.53:53 -> 10.0.0.11:20000",
        "--packet",
        "tcp [2001:db8:bad::1]:5000 -> [2001:db8::11]:22 flags S",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "tcp 203.0.113.5:443 -> 10.0.0.11:51000 flags SA: pass by rule \"tcp-return\" (allow)",
            "udp 192.0.2.53:53 -> 10.0.0.11:20000: drop by default deny",
            "tcp [2001:db8:bad::1]:5000 -> [2001:db8::11]:22 flags S: drop by rule \"blocklist\" (deny)",
        ]
    );
    let monitor = rules_file("[filter]\ndefault = \"deny\"\nmode = \"monitor\"\n");
    let output = agent(&[
        "test",
        "--rules",
        monitor.path().to_str().unwrap(),
        "--packet",
        "udp 192.0.2.1:1 -> 192.0.2.2:2",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("pass by default deny (monitor mode: enforce would drop)"),
        "{stdout}"
    );
    assert_one_line_error(
        &agent(&[
            "test",
            "--rules",
            rules,
            "--packet",
            "tcp 1.2.3.4 -> 5.6.7.8",
        ]),
        1,
        "needs ports",
    );
}

#[test]
fn guard_drop_decides_before_the_rules() {
    let rules = rules_file(
        "[filter]\ndefault = \"allow\"\n[guard]\nephemeral = \"49152-65535\"\naction = \"drop\"\nservices = [8080]\n\
         [[rule]]\nname = \"all-tcp\"\naction = \"allow\"\nproto = \"tcp\"\n",
    );
    let output = agent(&[
        "test",
        "--rules",
        rules.path().to_str().unwrap(),
        "--packet",
        "tcp 192.0.2.1:443 -> 10.0.0.1:40000 flags SA",
        "--packet",
        "tcp 192.0.2.1:443 -> 10.0.0.1:50000 flags SA",
        "--packet",
        "tcp 192.0.2.1:40000 -> 10.0.0.1:8080 flags A",
        "--packet",
        "udp 192.0.2.1:53 -> 10.0.0.1:1024",
        "--packet",
        "udp 192.0.2.1:5353 -> 10.0.0.1:1024",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    let verdicts: Vec<&str> = stdout
        .lines()
        .map(|line| line.rsplit_once(": ").unwrap().1)
        .collect();
    assert_eq!(
        verdicts,
        [
            "drop by guard drop",
            "pass by rule \"all-tcp\" (allow)",
            // An ACK to a local service is not return traffic.
            "pass by rule \"all-tcp\" (allow)",
            "drop by guard drop",
            // Not from a service port: not a reply.
            "pass by default allow",
        ],
        "{stdout}"
    );
}

#[test]
fn guard_without_an_agent_says_so() {
    let output = agent(&["guard", "--iface", "no-such-iface0"]);
    assert_one_line_error(
        &output,
        1,
        "no guard maps under /sys/fs/bpf/filter-agent/no-such-iface0",
    );
}

#[test]
fn replay_reports_per_rule_hits_and_json_lines() {
    use filter_agent::oracle::packet::{PacketSpec, Transport, tcp_flag};
    use pcap_file::pcap::{PcapPacket, PcapWriter};

    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/rules.toml");
    let frames = [
        PacketSpec::new(
            "203.0.113.5".parse().unwrap(),
            "10.0.0.11".parse().unwrap(),
            Transport::Tcp {
                sport: 443,
                dport: 51000,
                flags: tcp_flag::ACK,
            },
        )
        .build(),
        PacketSpec::new(
            "192.0.2.53".parse().unwrap(),
            "10.0.0.11".parse().unwrap(),
            Transport::Udp {
                sport: 53,
                dport: 20000,
            },
        )
        .build(),
        PacketSpec::new(
            "198.51.100.1".parse().unwrap(),
            "10.0.0.11".parse().unwrap(),
            Transport::Tcp {
                sport: 1,
                dport: 22,
                flags: tcp_flag::SYN,
            },
        )
        .build(),
    ];
    let capture = tempfile::NamedTempFile::new().unwrap();
    let mut writer = PcapWriter::new(capture.reopen().unwrap()).unwrap();
    for frame in &frames {
        writer
            .write_packet(&PcapPacket::new(
                std::time::Duration::ZERO,
                frame.len() as u32,
                frame,
            ))
            .unwrap();
    }
    drop(writer);
    let capture = capture.path().to_str().unwrap();

    let output = agent(&["replay", "--rules", rules, "--pcap", capture]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.starts_with(&format!("{capture}: 3 packets, 1 passed, 2 dropped\n")),
        "{stdout}"
    );
    assert!(
        stdout.contains("         1  rule \"tcp-return\" (allow)\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("         1  rule \"blocklist\" (deny)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("         1  default deny\n"), "{stdout}");

    let output = agent(&["replay", "--rules", rules, "--pcap", capture, "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines[0],
        serde_json::json!({"packet": 1, "verdict": "pass", "action": "allow", "rule": "tcp-return", "reason": "rule"})
    );
    assert_eq!(
        lines[1],
        serde_json::json!({"packet": 2, "verdict": "drop", "action": "deny", "rule": null, "reason": "default_deny"})
    );
    assert_eq!(lines[2]["rule"], "blocklist");

    let monitor = rules_file("[filter]\ndefault = \"deny\"\nmode = \"monitor\"\n");
    let output = agent(&[
        "replay",
        "--rules",
        monitor.path().to_str().unwrap(),
        "--pcap",
        capture,
        "--json",
    ]);
    let first: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (first["verdict"].as_str(), first["action"].as_str()),
        (Some("pass"), Some("deny"))
    );

    assert_one_line_error(
        &agent(&["replay", "--rules", rules, "--pcap", "/nonexistent.pcap"]),
        1,
        "cannot read capture /nonexistent.pcap",
    );
}

/// A limited rule: `test` packets arrive at one instant (the burst passes,
/// the rest is over the limit); `replay` decides at the capture's pace.
#[test]
fn limits_in_test_and_replay() {
    use filter_agent::oracle::packet::{PacketSpec, Transport, tcp_flag};
    use pcap_file::pcap::{PcapPacket, PcapWriter};

    let rules = rules_file(
        "[filter]\ndefault = \"deny\"\n[[rule]]\nname = \"web\"\naction = \"allow\"\n\
         proto = \"tcp\"\ndport = 443\nlimit = { rate = \"100/s\", burst = 2 }\n",
    );
    let rules = rules.path().to_str().unwrap();
    let syn = "tcp 203.0.113.5:4000 -> 10.0.0.1:443 flags S";
    let output = agent(&[
        "test", "--rules", rules, "--packet", syn, "--packet", syn, "--packet", syn,
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    let verdicts: Vec<&str> = stdout.lines().take(3).collect();
    assert!(
        verdicts[1].ends_with(": pass by rule \"web\" (allow, limit 100/s burst 2)"),
        "{stdout}"
    );
    assert!(
        verdicts[2].ends_with(": drop by rule \"web\" (allow, limit 100/s burst 2) over its limit"),
        "{stdout}"
    );

    let frame = PacketSpec::new(
        "203.0.113.5".parse().unwrap(),
        "10.0.0.1".parse().unwrap(),
        Transport::Tcp {
            sport: 4000,
            dport: 443,
            flags: tcp_flag::SYN,
        },
    )
    .build();
    // Ten SYNs 1 ms apart (1,000/s), then the same 20 ms apart (50/s).
    let replay = |gap_ms: u64| {
        let capture = tempfile::NamedTempFile::new().unwrap();
        let mut writer = PcapWriter::new(capture.reopen().unwrap()).unwrap();
        for i in 0..10 {
            let time = std::time::Duration::from_millis(1_700_000_000_000 + i * gap_ms);
            let packet = PcapPacket::new(time, frame.len() as u32, &frame);
            writer.write_packet(&packet).unwrap();
        }
        drop(writer);
        let path = capture.path().to_str().unwrap();
        let output = agent(&["replay", "--rules", rules, "--pcap", path, "--json"]);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["reason"].clone())
            .filter(|reason| reason == "over_limit")
            .count()
    };
    assert_eq!(replay(1), 8, "at 1,000/s only the burst of 2 passes");
    assert_eq!(replay(20), 0, "at 50/s nothing is over 100/s");
}

/// `import` writes a rules file `check` accepts; a bad entry is one line
/// naming the entry and the field; `test --upstream` names the deciding
/// entry of the cloud's ACL.
#[test]
fn import_and_test_upstream() {
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/upstream/aws-nacl.json"
    );
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("imported.toml");
    let rules = rules.to_str().unwrap();
    let acl = "acl-0a1b2c3d4e5f60718";
    let output = agent(&[
        "import", "--format", "aws-nacl", "--acl", acl, "--output", rules, sample,
    ]);
    assert!(output.status.success(), "{output:?}");
    let output = agent(&["check", "--rules", rules]);
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains(": ok (9 rules, default deny"));

    let broken = std::fs::read_to_string(sample).unwrap().replace(
        "\"From\": 49152, \"To\": 65535}, \"Protocol\": \"17\"",
        "\"From\": 65535, \"To\": 49152}, \"Protocol\": \"17\"",
    );
    let broken_file = rules_file(&broken);
    let broken_path = broken_file.path().to_str().unwrap();
    assert_one_line_error(
        &agent(&["import", "--format", "aws-nacl", "--acl", acl, broken_path]),
        1,
        "acl-0a1b2c3d4e5f60718 rule 140 (ingress): PortRange 65535-49152 is not a range of ports",
    );
    assert_one_line_error(
        &agent(&["import", "--format", "aws-nacl", sample]),
        1,
        "pick one with --acl",
    );

    let output = agent(&[
        "test",
        "--upstream",
        sample,
        "--upstream-format",
        "aws-nacl",
        "--acl",
        acl,
        "--packet",
        "udp 192.0.2.53:53 -> 10.0.1.5:40000",
        "--packet",
        "udp 192.0.2.53:53 -> 10.0.1.5:50000",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.contains(
            ":40000: acl-0a1b2c3d4e5f60718 drops it (aws-nacl ingress): no entry matches"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            ":50000: acl-0a1b2c3d4e5f60718 passes it (aws-nacl ingress): entry rule 140 (ingress)"
        ),
        "{stdout}"
    );
}
