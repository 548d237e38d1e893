//! Rate limits with real traffic on veth: a flood of UDP from the client
//! namespace, sent from one CPU and then from both, gets through at the
//! rule's rate within 10% (counted by the server's socket, not by the
//! agent), and the agent's `stats` counts the rest as over the limit; so
//! for a limit whose burst lets it decide with the per-CPU tick clock. A
//! per-source limit holds back the flooding source while a quiet source
//! of the same rule gets its whole burst through. Needs root.

mod support;

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use aya::maps::PerCpuArray;
use filter_agent::kernel::pins;
use filter_common::{Counter, names};
use support::{AGENT, Pins};
use testbed::{Daemon, Netns, Pair, wait_until, within};

const RULE_WIDE: u16 = 7000;
const PER_SOURCE: u16 = 7001;
const COARSE: u16 = 7002;
/// The limits below, in packets per second and burst: 20 at 2,000/s is a
/// 9.5 ms tolerance (the precise clock), 100 is 49.5 ms (the tick clock).
const RATE: f64 = 2000.0;
const BURST: f64 = 20.0;
const COARSE_BURST: f64 = 100.0;
const SOURCE_RATE: f64 = 500.0;
const SOURCE_BURST: u32 = 10;
/// A second address of the client: the quiet source.
const QUIET: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 9);

const RULES: &str = r#"
[filter]
default = "allow"

[[rule]]
name = "flooded"
action = "allow"
proto = "udp"
dport = 7000
limit = { rate = "2000/s", burst = 20 }

[[rule]]
name = "per-source"
action = "allow"
proto = "udp"
dport = 7001
limit = { rate = "500/s", burst = 10, per = "source", ipv4_prefix = 32 }

[[rule]]
name = "coarse"
action = "allow"
proto = "udp"
dport = 7002
limit = { rate = "2000/s", burst = 100 }
"#;

/// Counts the datagrams arriving on `port` in `ns` until dropped, and
/// those from [`QUIET`] apart.
struct Arrivals {
    received: std::sync::Arc<AtomicU64>,
    quiet: std::sync::Arc<AtomicU64>,
    stop: std::sync::Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Arrivals {
    fn start(ns: &Netns, port: u16) -> Self {
        let socket = ns
            .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))
            .unwrap()
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let received = std::sync::Arc::new(AtomicU64::new(0));
        let quiet = std::sync::Arc::new(AtomicU64::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, quiet, stop) = (received.clone(), quiet.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = socket.recv_from(&mut buf) {
                        received.fetch_add(1, Ordering::Relaxed);
                        if from.ip() == QUIET {
                            quiet.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        Self {
            received,
            quiet,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits until `total` datagrams have arrived in all (what the rule
    /// passed, as the program counted it).
    fn wait_for(&self, total: impl Fn() -> u64) -> u64 {
        let mut last = (0, 0);
        let arrived = within(Duration::from_secs(5), || {
            last = (self.received.load(Ordering::Relaxed), total());
            last.0 == last.1
        });
        assert!(
            arrived,
            "the server's socket never got every datagram the rule passed: {} of {}",
            last.0, last.1
        );
        last.0
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; the call only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Floods `to` from `from` for `seconds` with one sender per entry of
/// `cpus`, each pinned to that CPU. Returns the datagrams sent and the
/// time from the first to the last.
fn flood(ns: &Netns, from: Ipv4Addr, to: SocketAddr, cpus: &[usize], seconds: f64) -> (u64, f64) {
    ns.run(|| {
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(seconds);
        let sent: u64 = thread::scope(|scope| {
            let senders: Vec<_> = cpus
                .iter()
                .map(|&cpu| {
                    scope.spawn(move || {
                        pin_to_cpu(cpu);
                        let socket = UdpSocket::bind((from, 0)).unwrap();
                        socket.connect(to).unwrap();
                        let mut sent = 0u64;
                        while Instant::now() < deadline {
                            for _ in 0..64 {
                                sent += u64::from(socket.send(b"flood").is_ok());
                            }
                        }
                        sent
                    })
                })
                .collect();
            senders.into_iter().map(|s| s.join().unwrap()).sum()
        });
        (sent, started.elapsed().as_secs_f64())
    })
    .unwrap()
}

/// Floods the rule-wide limit `rule` on `port` (burst `burst`, `RATE`)
/// from one CPU, then from two; returns the packets the program saw.
fn rule_wide_holds(pair: &Pair, port: u16, rule: u32, burst: f64) -> u64 {
    let (client, iface) = (&pair.client, pair.server_if.as_str());
    let flooded = SocketAddr::from((Pair::SERVER_V4, port));
    let receiver = Arrivals::start(&pair.server, port);
    let mut seen_before = 0;
    for cpus in [&[0, 0][..], &[0, 1]] {
        let before = receiver.received.load(Ordering::Relaxed);
        let (cpu_before, passed_before) = (per_cpu(iface, &SEEN, rule), passed(iface, rule));
        let (sent, seconds) = flood(client, Pair::CLIENT_V4, flooded, cpus, 2.0);
        let passed = receiver.wait_for(|| before + passed(iface, rule) - passed_before) - before;
        // The second round's bucket may not have refilled its burst: that
        // is at most `burst` packets of about 4,000.
        let expected = burst + RATE * seconds;
        let landed: Vec<u64> = per_cpu(iface, &SEEN, rule)
            .iter()
            .zip(&cpu_before)
            .map(|(after, before)| after - before)
            .collect();
        let seen: u64 = landed.iter().sum();
        println!(
            "port {port}, senders on CPUs {cpus:?}: {sent} sent in {seconds:.2} s ({:.0}/s), the \
             program saw {seen} (per CPU {landed:?}), {passed} arrived, expected {expected:.0}",
            sent as f64 / seconds
        );
        assert!(
            seen as f64 > 5.0 * expected,
            "the flood was not much over the limit: {seen} packets for a limit of {expected:.0}"
        );
        let error = (passed as f64 - expected) / expected;
        assert!(
            error.abs() <= 0.10,
            "port {port}, senders on CPUs {cpus:?}: {passed} passed, {expected:.0} expected \
             ({:+.1}%)",
            error * 100.0
        );
        if cpus == [0, 1] {
            let busy = landed.iter().filter(|&&n| n as f64 > 0.1 * seen as f64);
            assert!(
                busy.count() >= 2,
                "the flood did not land on two CPUs: {landed:?}"
            );
        }
        seen_before += seen;
    }
    assert!(
        passed(iface, rule) >= receiver.received.load(Ordering::Relaxed),
        "more arrived than the rule passed"
    );
    seen_before
}

/// Sends `count` datagrams from `from` to `to` at once.
fn burst(ns: &Netns, from: Ipv4Addr, to: SocketAddr, count: u32) {
    ns.run(|| {
        let socket = UdpSocket::bind((from, 0)).unwrap();
        socket.connect(to).unwrap();
        for _ in 0..count {
            socket.send(b"quiet").unwrap();
        }
    })
    .unwrap();
}

/// Per CPU, the packets rule `rule` counted in the agent's pinned `maps`
/// (`RULE_STATS`: passed; `RULE_OVER_LIMIT`: dropped as over its limit).
fn per_cpu(iface: &str, maps: &[&str], rule: u32) -> Vec<u64> {
    let dir = pins::dir(iface);
    let mut totals = Vec::new();
    for name in maps {
        let map = pins::open_map(&dir, name).unwrap();
        let array = PerCpuArray::<_, Counter>::try_from(&map).unwrap();
        let values = array.get(&rule, 0).unwrap();
        totals.resize(values.len(), 0);
        for (total, value) in totals.iter_mut().zip(values.iter()) {
            *total += value.packets;
        }
    }
    totals
}

/// What rule `rule` passed, over all CPUs.
fn passed(iface: &str, rule: u32) -> u64 {
    per_cpu(iface, &[names::RULE_STATS], rule).iter().sum()
}

const SEEN: [&str; 2] = [names::RULE_STATS, names::RULE_OVER_LIMIT];

/// The rule's decided and over-limit packets as `filter-agent stats` shows.
fn stats(ns: &Netns, iface: &str, rule: &str) -> (u64, u64) {
    let out = ns
        .exec(AGENT, &["stats", "--json", "--iface", iface])
        .unwrap();
    let documents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules = documents[0]["rules"].as_array().unwrap();
    let row = rules.iter().find(|r| r["rule"] == rule).unwrap();
    let packets = |v: &serde_json::Value| v["packets"].as_u64().unwrap();
    (packets(row), packets(&row["over_limit"]))
}

#[test]
fn limits_hold_across_cpus_and_per_source() {
    let pair = Pair::create("lim").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let (client, server) = (&pair.client, &pair.server);
    client
        .ip(&[
            "addr",
            "add",
            &format!("{QUIET}/24"),
            "dev",
            &pair.client_if,
        ])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let agent = Daemon::agent(
        AGENT,
        server,
        [
            "--iface",
            &pair.server_if,
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    let iface = pair.server_if.as_str();
    // The rules' indices: after the implicit neighbour-discovery rule.
    for (port, rule, name, burst) in [
        (RULE_WIDE, 1, "flooded", BURST),
        (COARSE, 3, "coarse", COARSE_BURST),
    ] {
        let seen = rule_wide_holds(&pair, port, rule, burst);
        let (decided, over_limit) = stats(server, iface, name);
        assert_eq!(decided + over_limit, seen, "stats lost packets");
    }
    // Per source: the flooding source is held to its rate; a quiet one,
    // sending its whole burst while the flood is over the limit, loses
    // nothing.
    let per_source = SocketAddr::from((Pair::SERVER_V4, PER_SOURCE));
    let receiver = Arrivals::start(server, PER_SOURCE);
    let (source_rule, quiet_sent) = (2, SOURCE_BURST);
    let over_limit = || {
        per_cpu(iface, &[names::RULE_OVER_LIMIT], source_rule)
            .iter()
            .sum::<u64>()
    };
    let (_, seconds) = thread::scope(|scope| {
        let loud = scope.spawn(|| flood(client, Pair::CLIENT_V4, per_source, &[0, 1], 1.0));
        wait_until(
            "the flood went over the per-source limit",
            Duration::from_secs(5),
            || over_limit() > 0,
        );
        burst(client, QUIET, per_source, quiet_sent);
        loud.join().unwrap()
    });
    let arrived = receiver.wait_for(|| passed(iface, source_rule));
    let quiet = receiver.quiet.load(Ordering::Relaxed);
    let loud = arrived - quiet;
    let expected = f64::from(SOURCE_BURST) + SOURCE_RATE * seconds;
    println!(
        "per source: the flooding source got {loud} through (expected {expected:.0}), \
         the quiet one {quiet} of {quiet_sent}"
    );
    assert_eq!(
        quiet,
        u64::from(quiet_sent),
        "the quiet source lost packets"
    );
    let error = (loud as f64 - expected) / expected;
    assert!(
        error.abs() <= 0.10,
        "per source: {loud} passed, {expected:.0} expected ({:+.1}%)",
        error * 100.0
    );
    let (status, log) = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "{log:?}");
}
