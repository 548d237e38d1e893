//! The five incidents of docs/scenarios.md, reproduced with real traffic
//! (`cargo xtask scenario NAME` runs the same code with its narrative).
//! Each scenario already fails when its story does not hold; these tests
//! also pin the figures it reports. Needs root.

use std::path::Path;

const AGENT: &str = env!("CARGO_BIN_EXE_filter-agent");

#[test]
fn sakura_guard_and_audit_name_the_ports_and_the_fix_works() {
    let outcome = scenarios::sakura::run(Path::new(AGENT)).unwrap();
    assert!(!outcome.before.failed.is_empty());
    assert_eq!(outcome.egress_ports, outcome.before.failed);
    assert_eq!(outcome.ingress_ports, outcome.before.failed);
    assert!(
        outcome.fix.contains("ip_local_port_range=\"32768 61000\""),
        "{}",
        outcome.fix
    );
    assert!(outcome.after.failed.is_empty(), "{:?}", outcome.after);
    assert_eq!(outcome.after.total(), outcome.before.total());
}

#[test]
fn asymmetric_stateful_breaks_tcp_stateless_does_not() {
    let outcome = scenarios::asymmetric::run(Path::new(AGENT)).unwrap();
    assert!(!outcome.ping_strict && outcome.ping_loose);
    assert!(outcome.stateful_ping);
    assert_eq!(outcome.stateful_tcp, 0);
    assert!(outcome.stateless_ping);
    assert_eq!(outcome.stateless_tcp, 5);
    assert!(!outcome.closed_port_answered);
    assert!(outcome.requests_on_second > 0);
    assert_eq!(outcome.requests_on_first, 0);
}

#[test]
fn docker_nacl_egress_guard_reports_post_nat_ports() {
    let outcome = scenarios::docker_nacl::run(Path::new(AGENT)).unwrap();
    assert!(outcome.host.failed.is_empty());
    assert!(!outcome.container.failed.is_empty());
    assert!(outcome.container.failed.iter().all(|&port| port < 49152));
    assert_eq!(outcome.egress_ports, outcome.container.failed);
    assert!(outcome.after.failed.is_empty(), "{:?}", outcome.after);
}

#[test]
fn conntrack_full_flood_in_xdp_keeps_connections_working() {
    let before = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").unwrap();
    let outcome = scenarios::conntrack_full::run(Path::new(AGENT)).unwrap();
    let after = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").unwrap();
    assert_eq!(before, after, "nf_conntrack_max was not restored");
    // A full table: (almost) no legitimate connection gets an entry, and
    // conntrack's own drop counter is the only trace.
    assert!(outcome.stateful_answered <= 2, "{outcome:?}");
    assert!(outcome.stateful_entries >= 460, "{outcome:?}");
    assert!(outcome.stateful_table_full_drops > 0, "{outcome:?}");
    // The flood never reaches conntrack.
    assert_eq!(outcome.filtered_answered, 10);
    assert!(outcome.filtered_entries < 51, "{outcome:?}");
    assert!(outcome.dropped_in_xdp >= 2_048, "{outcome:?}");
}

#[test]
fn lvs_dr_invalid_classes_pass_only_statelessly() {
    let classes = scenarios::lvs_dr::run(Path::new(AGENT)).unwrap();
    let passed: Vec<(&str, u64, u64)> = classes
        .iter()
        .map(|class| (class.name, class.stateful_passed, class.stateless_passed))
        .collect();
    assert_eq!(
        passed,
        [
            ("SYN", 5, 5),
            ("ACK", 5, 5),
            ("FIN+ACK", 0, 5),
            ("RST", 0, 5),
            ("ICMP unreachable", 0, 5),
        ]
    );
}
