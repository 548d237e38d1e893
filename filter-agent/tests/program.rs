//! The real XDP program in the real kernel, fed crafted frames through
//! BPF_PROG_TEST_RUN. Needs root.

use std::net::IpAddr;

use std::path::Path;
use std::time::Duration;

use filter_agent::{
    kernel::loader::{Filter, LoadOptions, xdp_action},
    oracle::packet::{self, PacketSpec, Transport, tcp_flag},
    oracle::reference::Outcome,
    rules::compile::compile,
    rules::config,
};
use filter_common::{DECISION_RULE, event, guard, reason};

const XDP_DROP: u32 = xdp_action::DROP;
const XDP_PASS: u32 = xdp_action::PASS;
const ETH_HLEN: usize = 14;

/// Loads the program with `[filter]` settings and no rules.
fn load(default: &str, mode: &str) -> Filter {
    load_rules(&format!(
        "[filter]\ndefault = \"{default}\"\nmode = \"{mode}\"\n"
    ))
}

fn load_rules(text: &str) -> Filter {
    let config = config::parse(Path::new("rules.toml"), text).unwrap();
    Filter::load(&compile(&config).unwrap()).expect("the program loads")
}

fn addr(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn tcp_v4() -> PacketSpec {
    PacketSpec::new(
        addr("203.0.113.5"),
        addr("10.0.0.11"),
        Transport::Tcp {
            sport: 443,
            dport: 51000,
            flags: tcp_flag::SYN | tcp_flag::ACK,
        },
    )
}

fn tcp_v6() -> PacketSpec {
    PacketSpec {
        src: addr("2001:db8::5"),
        dst: addr("2001:db8::11"),
        ..tcp_v4()
    }
}

/// Runs `frame` and returns the verdict and the counter it moved.
fn verdict(filter: &Filter, frame: &[u8]) -> (u32, Outcome) {
    filter.classify_frame(frame).unwrap()
}

const DEFAULT_ALLOW: Outcome = Outcome::Reason(reason::DEFAULT_ALLOW);
const DEFAULT_DENY: Outcome = Outcome::Reason(reason::DEFAULT_DENY);
const NON_IP: Outcome = Outcome::Reason(reason::NON_IP);
const MALFORMED: Outcome = Outcome::Reason(reason::MALFORMED);

#[test]
fn default_action_decides_ip_packets() {
    let allow = load("allow", "enforce");
    let deny = load("deny", "enforce");
    for spec in [tcp_v4(), tcp_v6()] {
        let frame = spec.build();
        assert_eq!(verdict(&allow, &frame), (XDP_PASS, DEFAULT_ALLOW));
        assert_eq!(verdict(&deny, &frame), (XDP_DROP, DEFAULT_DENY));
    }
}

#[test]
fn monitor_mode_counts_but_never_drops() {
    let monitor = load("deny", "monitor");
    assert_eq!(
        verdict(&monitor, &tcp_v4().build()),
        (XDP_PASS, DEFAULT_DENY)
    );
    let truncated = &tcp_v4().build()[..ETH_HLEN + 3];
    assert_eq!(verdict(&monitor, truncated), (XDP_PASS, MALFORMED));
}

#[test]
fn non_ip_frames_always_pass() {
    let deny = load("deny", "enforce");
    assert_eq!(verdict(&deny, &packet::arp_request()), (XDP_PASS, NON_IP));
}

#[test]
fn vlan_tags_are_parsed_up_to_two() {
    let deny = load("deny", "enforce");
    for tags in [vec![10], vec![10, 20]] {
        for mut spec in [tcp_v4(), tcp_v6()] {
            spec.vlans = tags.clone();
            assert_eq!(
                verdict(&deny, &spec.build()),
                (XDP_DROP, DEFAULT_DENY),
                "{tags:?}"
            );
        }
    }
    let allow = load("allow", "enforce");
    let mut triple = tcp_v4();
    triple.vlans = vec![10, 20, 30];
    assert_eq!(verdict(&allow, &triple.build()), (XDP_DROP, MALFORMED));
}

#[test]
fn ipv4_options_and_ipv6_extension_headers_are_skipped() {
    let allow = load("allow", "enforce");
    let mut with_options = tcp_v4();
    with_options.ipv4_options = vec![1; 40]; // the maximum: 15-word header
    assert_eq!(
        verdict(&allow, &with_options.build()),
        (XDP_PASS, DEFAULT_ALLOW)
    );

    let mut with_extensions = tcp_v6();
    with_extensions.ipv6_extensions = vec![
        packet::IPPROTO_HOPOPTS,
        packet::IPPROTO_ROUTING,
        packet::IPPROTO_DSTOPTS,
    ];
    with_extensions.ipv6_fragment_header = true;
    assert_eq!(
        verdict(&allow, &with_extensions.build()),
        (XDP_PASS, DEFAULT_ALLOW)
    );

    // The most the parser walks (docs/rules.md says five), then one more:
    // counted as malformed, not passed blindly.
    let mut most = tcp_v6();
    most.ipv6_extensions = vec![packet::IPPROTO_DSTOPTS; 5];
    assert_eq!(verdict(&allow, &most.build()), (XDP_PASS, DEFAULT_ALLOW));
    let mut too_many = tcp_v6();
    too_many.ipv6_extensions = vec![packet::IPPROTO_DSTOPTS; 6];
    assert_eq!(verdict(&allow, &too_many.build()), (XDP_DROP, MALFORMED));
}

#[test]
fn invalid_headers_are_malformed() {
    let allow = load("allow", "enforce");
    let good = tcp_v4().build();
    let ip = ETH_HLEN;
    let tcp = ETH_HLEN + 20;
    for (what, offset, value) in [
        ("IPv4 version 5", ip, 0x55),
        ("IPv4 header length 16", ip, 0x44),
        ("TCP data offset 4", tcp + 12, 0x40),
    ] {
        let mut frame = good.clone();
        frame[offset] = value;
        assert_eq!(verdict(&allow, &frame), (XDP_DROP, MALFORMED), "{what}");
    }
    let mut v6 = tcp_v6().build();
    v6[ETH_HLEN] = 0x40;
    assert_eq!(
        verdict(&allow, &v6),
        (XDP_DROP, MALFORMED),
        "IPv6 version 4"
    );
}

/// Every prefix of every frame: malformed until the last header the parser
/// needs is complete, then an ordinary verdict.
#[test]
fn truncation_at_every_byte() {
    let allow = load("allow", "enforce");
    let v4 = addr("198.51.100.1");
    let v4_dst = addr("198.51.100.2");
    let mut cases: Vec<(PacketSpec, usize)> = Vec::new();
    for spec in [tcp_v4(), tcp_v6()] {
        let (src, dst) = (spec.src, spec.dst);
        let ip_len = if src.is_ipv6() { 40 } else { 20 };
        cases.push((spec, ip_len + 20));
        cases.push((
            PacketSpec::new(
                src,
                dst,
                Transport::Udp {
                    sport: 53,
                    dport: 40000,
                },
            ),
            ip_len + 8,
        ));
        cases.push((
            PacketSpec::new(
                src,
                dst,
                Transport::Icmp {
                    icmp_type: 3,
                    code: 4,
                },
            ),
            ip_len + 2, // type and code
        ));
    }
    let mut fragment = PacketSpec::new(v4, v4_dst, Transport::Udp { sport: 1, dport: 2 });
    fragment.fragment_offset = 100;
    cases.push((fragment, 20)); // a non-first fragment needs no L4 header
    let mut vlan = tcp_v4();
    vlan.vlans = vec![7, 8];
    cases.push((vlan, 8 + 20 + 20));

    for (spec, needed_after_eth) in cases {
        let frame = spec.build();
        let complete = ETH_HLEN + needed_after_eth;
        for len in ETH_HLEN..=frame.len() {
            let expected = if len < complete {
                (XDP_DROP, MALFORMED)
            } else {
                (XDP_PASS, DEFAULT_ALLOW)
            };
            assert_eq!(
                verdict(&allow, &frame[..len]),
                expected,
                "{spec:?} cut at {len}"
            );
        }
    }
}

#[test]
fn bytes_are_counted_per_rule() {
    let filter = load_rules(
        "[filter]\ndefault = \"deny\"\n[[rule]]\nname = \"web\"\naction = \"allow\"\nproto = \"tcp\"\nsport = 443\n",
    );
    let frame = tcp_v4().build();
    // Rule 0 is the implicit neighbour-discovery rule.
    assert_eq!(verdict(&filter, &frame), (XDP_PASS, Outcome::Rule(1)));
    assert_eq!(verdict(&filter, &frame), (XDP_PASS, Outcome::Rule(1)));
    let web = filter.rule_counters().unwrap()[1];
    assert_eq!((web.packets, web.bytes), (2, 2 * frame.len() as u64));
}

/// Loads `text` with events at `rate` per second and CPU.
fn load_with_events(text: &str, rate: u32) -> Filter {
    let config = config::parse(Path::new("rules.toml"), text).unwrap();
    let options = LoadOptions {
        event_rate: rate,
        ..LoadOptions::default()
    };
    Filter::load_with(&compile(&config).unwrap(), &options).expect("the program loads")
}

const DENY_SSH: &str = "[filter]\ndefault = \"allow\"\n[[rule]]\nname = \"no-ssh\"\naction = \"deny\"\nproto = \"tcp\"\ndport = 22\n";

fn ssh_v4() -> PacketSpec {
    PacketSpec {
        transport: Transport::Tcp {
            sport: 40000,
            dport: 22,
            flags: tcp_flag::SYN,
        },
        ..tcp_v4()
    }
}

#[test]
fn drops_are_reported_as_events_within_the_budget() {
    const BUDGET: u32 = 5;
    let mut filter = load_with_events(DENY_SSH, BUDGET);
    // Many drops within a second on one CPU: the budget bounds the events.
    filter.time_packet(&ssh_v4().build(), 200).unwrap();
    let events = filter.take_events().unwrap();
    assert_eq!(events.len(), BUDGET as usize, "{events:?}");
    let first = events[0];
    assert_eq!(first.verdict, event::DROP);
    // Rule 0 is the implicit neighbour-discovery rule.
    assert_eq!(first.slot, DECISION_RULE | 1);
    assert_eq!((first.sport, first.dport), (40000, 22));
    assert_eq!(first.proto, packet::IPPROTO_TCP);
    assert_eq!(first.tcp_flags, tcp_flag::SYN);
    assert_eq!(&first.src[12..], &[203, 0, 113, 5]);
    assert_eq!(&first.dst[12..], &[10, 0, 0, 11]);
    // The next second brings a new budget, also while drops keep coming
    // (the clock is looked at every 16th refused event).
    testbed::wait_until(
        "events resume in a new second",
        Duration::from_secs(5),
        || {
            filter.time_packet(&ssh_v4().build(), 64).unwrap();
            !filter.take_events().unwrap().is_empty()
        },
    );

    // Passed packets send nothing; neither does a rate of 0.
    filter.run_packet(&tcp_v4().build()).unwrap();
    assert!(filter.take_events().unwrap().is_empty());
    let mut quiet = load_with_events(DENY_SSH, 0);
    quiet.run_packet(&ssh_v4().build()).unwrap();
    assert!(quiet.take_events().unwrap().is_empty());
}

#[test]
fn monitor_mode_and_guard_findings_are_events_too() {
    let monitor = DENY_SSH.replace(
        "default = \"allow\"",
        "default = \"allow\"\nmode = \"monitor\"",
    );
    let mut filter = load_with_events(&monitor, 10);
    assert_eq!(filter.run_packet(&ssh_v4().build()).unwrap(), XDP_PASS);
    let events = filter.take_events().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].verdict, event::WOULD_DROP);

    // A SYN-ACK to port 20000 is return traffic outside 32768-60999: it
    // passes (default allow, guard counting) and is reported.
    let mut filter = load_with_events(DENY_SSH, 10);
    let reply = PacketSpec {
        transport: Transport::Tcp {
            sport: 443,
            dport: 20000,
            flags: tcp_flag::SYN | tcp_flag::ACK,
        },
        ..tcp_v4()
    };
    assert_eq!(filter.run_packet(&reply.build()).unwrap(), XDP_PASS);
    let events = filter.take_events().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].verdict, event::PASS);
    assert_eq!(events[0].guard, event::GUARD_RETURN);
    assert_eq!(events[0].slot, reason::DEFAULT_ALLOW);
}

/// The guard's per-port and per-peer detail: exact for a few packets,
/// sampled with weights under a flood, never more than the exact totals
/// and short of them by less than one sample's weight.
#[test]
fn guard_detail_is_exact_when_quiet_and_weighted_under_a_flood() {
    let reply = PacketSpec {
        transport: Transport::Tcp {
            sport: 443,
            dport: 20000,
            flags: tcp_flag::ACK,
        },
        ..tcp_v4()
    };
    let frame = reply.build();
    // One test run repeats the frame on one CPU.
    let detail = |flood: u32| {
        let filter = load_with_events(DENY_SSH, 0);
        filter.time_packet(&frame, flood).unwrap();
        let report = filter.guard_report().unwrap();
        let total = report.stats[guard::RETURN_OUT_OF_RANGE as usize].packets;
        assert_eq!(total, u64::from(flood), "the total is exact");
        let [(port, by_port)] = report.ports[..] else {
            panic!("one local port: {:?}", report.ports)
        };
        let [(peer, by_peer)] = report.peers[..] else {
            panic!("one peer: {:?}", report.peers)
        };
        assert_eq!((port.port, peer.port), (20000, 443));
        assert_eq!(by_port, by_peer);
        assert_eq!(by_port.bytes, by_port.packets * frame.len() as u64);
        by_port.packets
    };
    let quiet = u32::try_from(guard::DETAIL_EXACT).unwrap();
    assert_eq!(detail(quiet), u64::from(quiet));
    let flood = 10_000;
    let sampled = detail(flood);
    assert!(
        sampled <= u64::from(flood) && u64::from(flood) - sampled < guard::DETAIL_EVERY,
        "{sampled} of {flood} in the detail"
    );
    // Exact ones, then whole samples of DETAIL_EVERY.
    assert_eq!((sampled - guard::DETAIL_EXACT) % guard::DETAIL_EVERY, 0);
}

/// Per-source buckets group sources by prefix (IPv6 /64 here); in monitor
/// mode a packet over the limit is counted as such and passed.
#[test]
fn per_source_limits_group_by_prefix_and_monitor_mode_passes() {
    let rules = |mode: &str| {
        format!(
            "[filter]\ndefault = \"deny\"\nmode = \"{mode}\"\n[[rule]]\nname = \"web\"\n\
             action = \"allow\"\nproto = \"tcp\"\nlimit = {{ rate = \"1/hour\", burst = 1, \
             per = \"source\", ipv4_prefix = 24 }}\n"
        )
    };
    let from = |src: &str| {
        PacketSpec {
            src: addr(src),
            dst: if src.contains(':') {
                addr("2001:db8::11")
            } else {
                addr("10.0.0.11")
            },
            ..tcp_v4()
        }
        .build()
    };
    // After the implicit neighbour-discovery rule.
    let (web, over) = (Outcome::Rule(1), Outcome::OverLimit(1));
    let enforce = load_rules(&rules("enforce"));
    for (src, expected) in [
        ("2001:db8:1:2::5", (XDP_PASS, web)),
        ("2001:db8:1:2:ffff::9", (XDP_DROP, over)),
        ("2001:db8:1:3::5", (XDP_PASS, web)),
        ("203.0.113.5", (XDP_PASS, web)),
        ("203.0.113.200", (XDP_DROP, over)),
        ("203.0.114.5", (XDP_PASS, web)),
    ] {
        assert_eq!(verdict(&enforce, &from(src)), expected, "{src}");
    }
    let monitor = load_rules(&rules("monitor"));
    assert_eq!(verdict(&monitor, &from("203.0.113.5")), (XDP_PASS, web));
    assert_eq!(verdict(&monitor, &from("203.0.113.6")), (XDP_PASS, over));
}
