//! The five incidents of docs/incidents.md, reproduced with real traffic
//! (`cargo xtask scenario NAME` runs the same code with its narrative).
//! Each scenario checks what an outsider sees as it goes (connections
//! answered or not, counters read back through `filter-agent stats`,
//! `guard` and `audit`, conntrack counts read from the kernel) and fails,
//! naming what broke the incident's story; these tests run them and hold
//! what each returns to the incident's figures. Needs root.

mod support;

use std::path::Path;

use scenarios::lvs_dr;
use support::AGENT;

#[test]
fn sakura_guard_and_audit_name_the_ports_and_the_fix_works() {
    let outcome = scenarios::sakura::run(Path::new(AGENT)).unwrap();
    // The container's range is 1024-65000, the filter passes 32768-61000.
    let outside = |port: &u16| !(32768..=61000).contains(port);
    assert!(!outcome.before.failed.is_empty(), "{outcome:?}");
    assert!(outcome.before.failed.iter().all(outside), "{outcome:?}");
    assert!(!outcome.before.answered.iter().any(outside), "{outcome:?}");
    assert!(outcome.egress_ports.iter().all(outside), "{outcome:?}");
    assert!(
        outcome.fix.contains("ip_local_port_range"),
        "{}",
        outcome.fix
    );
    assert!(
        outcome.after.failed.is_empty() && outcome.after.total() > 0,
        "{outcome:?}"
    );
}

#[test]
fn asymmetric_stateful_breaks_tcp_stateless_does_not() {
    let outcome = scenarios::asymmetric::run(Path::new(AGENT)).unwrap();
    assert!(!outcome.ping_strict && outcome.ping_loose, "{outcome:?}");
    assert!(
        outcome.stateful_ping && outcome.stateful_tcp == 0,
        "{outcome:?}"
    );
    assert!(
        outcome.stateless_ping && outcome.stateless_tcp == 5,
        "{outcome:?}"
    );
    assert!(!outcome.closed_port_answered, "{outcome:?}");
    assert!(
        outcome.requests_on_second > 0 && outcome.requests_on_first == 0,
        "{outcome:?}"
    );
}

#[test]
fn docker_nacl_egress_guard_reports_post_nat_ports() {
    let outcome = scenarios::docker_nacl::run(Path::new(AGENT)).unwrap();
    assert!(outcome.host.failed.is_empty(), "{outcome:?}");
    assert!(!outcome.container.failed.is_empty(), "{outcome:?}");
    assert_eq!(outcome.egress_ports, outcome.container.failed);
    assert!(outcome.after.failed.is_empty(), "{outcome:?}");
    assert!(!outcome.reused.failed.is_empty(), "{outcome:?}");
    assert!(
        outcome.moved_ports.iter().all(|&port| port < 49152),
        "{outcome:?}"
    );
    assert!(
        outcome.pinned.failed.is_empty() && outcome.pinned.total() > 0,
        "{outcome:?}"
    );
}

#[test]
fn conntrack_full_public_service_skips_conntrack_under_a_flood() {
    let conntrack_max = || std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max");
    let before = conntrack_max().unwrap();
    let outcome = scenarios::conntrack_full::run(Path::new(AGENT)).unwrap();
    assert_eq!(
        before,
        conntrack_max().unwrap(),
        "nf_conntrack_max was not restored"
    );
    assert!(outcome.stateful_table_full_drops > 0, "{outcome:?}");
    assert!(outcome.stateful.connections < 10, "{outcome:?}");
    let filtered = &outcome.filtered;
    assert!(
        filtered.connections == 10 && filtered.queries == 10,
        "{outcome:?}"
    );
    assert_eq!(filtered.service_entries, 0, "{outcome:?}");
    assert!(
        outcome.over_limit.iter().all(|&dropped| dropped > 0),
        "{outcome:?}"
    );
    assert_eq!(outcome.notrack_fixes.len(), 2, "{outcome:?}");
}

#[test]
fn lvs_dr_invalid_classes_pass_only_statelessly() {
    match lvs_dr::run(Path::new(AGENT)).unwrap() {
        lvs_dr::Outcome::Ipvs(outcome) => {
            assert!(outcome.ufw.invalid_dropped > 0, "{outcome:?}");
            let (ufw, stateless) = (&outcome.ufw, &outcome.stateless);
            assert!(
                stateless.half_closed == 0 && stateless.aborted_left == 0,
                "{outcome:?}"
            );
            assert!(stateless.far_bytes > ufw.far_bytes, "{outcome:?}");
        }
        lvs_dr::Outcome::StandIn(classes) => {
            assert!(
                classes.iter().all(|class| class.stateless_passed > 0),
                "{classes:?}"
            );
            let blocked = classes.iter().filter(|class| class.stateful_passed == 0);
            assert!(blocked.count() > 0, "{classes:?}");
        }
    }
}
