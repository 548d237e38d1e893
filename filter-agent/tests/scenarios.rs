//! The five incidents of docs/incidents.md, reproduced with real traffic
//! (`cargo xtask scenario NAME` runs the same code with its narrative).
//! Each scenario checks what an outsider sees as it goes (connections
//! answered or not, counters read back through `filter-agent stats`,
//! `guard` and `audit`, conntrack counts read from the kernel) and fails,
//! naming what broke the incident's story; these tests run them. Needs
//! root.

use std::path::Path;

const AGENT: &str = env!("CARGO_BIN_EXE_filter-agent");

#[test]
fn sakura_guard_and_audit_name_the_ports_and_the_fix_works() {
    scenarios::sakura::run(Path::new(AGENT)).unwrap();
}

#[test]
fn asymmetric_stateful_breaks_tcp_stateless_does_not() {
    scenarios::asymmetric::run(Path::new(AGENT)).unwrap();
}

#[test]
fn docker_nacl_egress_guard_reports_post_nat_ports() {
    scenarios::docker_nacl::run(Path::new(AGENT)).unwrap();
}

#[test]
fn conntrack_full_public_service_skips_conntrack_under_a_flood() {
    let conntrack_max = || std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max");
    let before = conntrack_max().unwrap();
    scenarios::conntrack_full::run(Path::new(AGENT)).unwrap();
    assert_eq!(
        before,
        conntrack_max().unwrap(),
        "nf_conntrack_max was not restored"
    );
}

#[test]
fn lvs_dr_invalid_classes_pass_only_statelessly() {
    scenarios::lvs_dr::run(Path::new(AGENT)).unwrap();
}
