//! The program attached to a real veth, with real traffic across it.
//! Needs root; every test makes its own namespaces and removes them.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use filter_agent::{
    kernel::loader::{self, AttachMode, Attached, Filter},
    rules::compile::compile,
    rules::config,
};
use filter_common::reason;
use support::{AGENT, Pins};
use testbed::{
    Daemon, Pair,
    traffic::{self, Responder},
    wait_until,
};

mod support;

const PORT: u16 = 8080;

/// The agent binary on the server end of `pair`.
fn agent_command(pair: &Pair, rules: &std::path::Path) -> std::process::Command {
    let mut command = pair.server.command(AGENT);
    command
        .args(["--detach-on-exit", "--iface", &pair.server_if, "--rules"])
        .arg(rules);
    command
}

fn service(ip: impl Into<IpAddr>) -> SocketAddr {
    SocketAddr::new(ip.into(), PORT)
}

#[test]
fn deny_by_default_drops_real_traffic_until_detached() {
    let pair = Pair::create("deny").unwrap();
    let _responder = Responder::start(&pair.server, PORT).unwrap();
    let config = config::parse(
        std::path::Path::new("r.toml"),
        "[filter]\ndefault = \"deny\"\n",
    )
    .unwrap();
    let mut filter = Filter::load(&compile(&config).unwrap()).unwrap();
    let mode = pair
        .server
        .run(|| filter.attach(&pair.server_if, AttachMode::Native))
        .unwrap()
        .unwrap();
    assert_eq!(mode, "native");

    for server in [IpAddr::from(Pair::SERVER_V4), IpAddr::from(Pair::SERVER_V6)] {
        assert!(!traffic::tcp_exchange(&pair.client, service(server), None).unwrap());
        assert!(!traffic::udp_exchange(&pair.client, service(server)).unwrap());
        assert!(!traffic::icmp_echo(&pair.client, server).unwrap());
    }
    let counters = filter.counters().unwrap();
    let denied = counters[reason::DEFAULT_DENY as usize];
    // At least one TCP SYN, one UDP datagram and one echo per family.
    assert!(denied.packets >= 6, "{counters:?}");
    assert_eq!(counters[reason::DEFAULT_ALLOW as usize].packets, 0);

    drop(filter);
    assert!(traffic::tcp_exchange(&pair.client, service(Pair::SERVER_V4), None).unwrap());
}

#[test]
fn agent_binary_attaches_counts_and_detaches() {
    let pair = Pair::create("bin").unwrap();
    let _responder = Responder::start(&pair.server, PORT).unwrap();
    let mut rules = tempfile::NamedTempFile::new().unwrap();
    writeln!(rules, "[filter]\ndefault = \"allow\"").unwrap();

    let mut command = agent_command(&pair, rules.path());
    command.env("RUST_LOG", "info");
    let mut agent = Daemon::start(command, None).unwrap();
    agent.expect("filter attached", Duration::from_secs(10));
    let attached = pair.server.ip(&["link", "show", &pair.server_if]).unwrap();
    assert!(String::from_utf8_lossy(&attached.stdout).contains("xdp"));

    // A second agent on the same interface refuses, in one line.
    let second = agent_command(&pair, rules.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another filter-agent is already running for {}",
            pair.server_if
        )),
        "{stderr}"
    );

    for server in [IpAddr::from(Pair::SERVER_V4), IpAddr::from(Pair::SERVER_V6)] {
        assert!(traffic::tcp_exchange(&pair.client, service(server), None).unwrap());
        assert!(traffic::udp_exchange(&pair.client, service(server)).unwrap());
        assert!(traffic::icmp_echo(&pair.client, server).unwrap());
    }

    let (status, lines) = agent.stop();
    assert!(status.unwrap().success(), "{lines:?}");
    let allowed = lines
        .iter()
        .find(|line| line.contains("reason=\"default_allow\""))
        .unwrap_or_else(|| panic!("no default_allow count in {lines:?}"));
    let packets: u64 = allowed
        .split("packets=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(packets >= 6, "{allowed}");
    // Stopping detaches: no XDP program is left on the interface.
    let after = pair.server.ip(&["link", "show", &pair.server_if]).unwrap();
    assert!(!String::from_utf8_lossy(&after.stdout).contains("xdp"));
}

/// Rule sets swapped many times while datagrams flow: every datagram is
/// counted by exactly one rule of exactly one complete rule set, and what
/// the receiver got equals what the allow rules counted.
#[test]
fn rule_set_swaps_are_atomic_under_traffic() {
    use std::{
        net::UdpSocket,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        thread,
    };

    const PORT_A: u16 = 7001;
    const PORT_B: u16 = 7002;
    const SWAPS: usize = 40;
    let pair = Pair::create("swap").unwrap();
    let pins = Pins::of(&pair.server_if);
    // The agent's interface lock makes this directory.
    std::fs::create_dir_all(&pins.0).unwrap();
    let rules = |allowed: u16, denied: u16| {
        let text = format!(
            "[filter]\ndefault = \"deny\"\n\
             [[rule]]\nname = \"allow\"\naction = \"allow\"\nproto = \"udp\"\ndport = {allowed}\n\
             [[rule]]\nname = \"deny\"\naction = \"deny\"\nproto = \"udp\"\ndport = {denied}\n"
        );
        let config = config::parse(std::path::Path::new("r.toml"), &text).unwrap();
        Filter::load_pinned(&compile(&config).unwrap(), &pins.0, 0).unwrap()
    };
    // Rule 0 is the implicit ND rule.
    const ALLOW: usize = 1;
    const DENY: usize = 2;

    let stop = Arc::new(AtomicBool::new(false));
    let received: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let receivers: Vec<_> = [PORT_A, PORT_B]
        .into_iter()
        .zip(&received)
        .map(|(port, count)| {
            let socket = pair
                .server
                .run(|| UdpSocket::bind((Pair::SERVER_V4, port)))
                .unwrap()
                .unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let (stop, count) = (Arc::clone(&stop), Arc::clone(count));
            thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if socket.recv(&mut buf).is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Drain what is still queued.
                while socket.recv(&mut buf).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // Swapped the way the agent swaps: through the pinned link.
    let attach = |filter: &mut Filter| {
        pair.server
            .run(|| filter.attach_pinned(&pair.server_if, AttachMode::Native, &pins.0))
            .unwrap()
            .unwrap()
    };
    let mut filter = rules(PORT_A, PORT_B);
    assert_eq!(attach(&mut filter), Attached::Fresh("native"));
    let sender_socket = pair
        .client
        .run(|| UdpSocket::bind((Pair::CLIENT_V4, 0)))
        .unwrap()
        .unwrap();
    let sending = Arc::new(AtomicBool::new(true));
    let sent: Arc<[AtomicU64; 2]> = Arc::new(Default::default());
    let sender = {
        let (sending, sent) = (Arc::clone(&sending), Arc::clone(&sent));
        thread::spawn(move || {
            while sending.load(Ordering::Relaxed) {
                for (index, port) in [PORT_A, PORT_B].into_iter().enumerate() {
                    if sender_socket
                        .send_to(b"swap", (Pair::SERVER_V4, port))
                        .is_ok()
                    {
                        sent[index].fetch_add(1, Ordering::Relaxed);
                    }
                }
                // About 20,000 datagrams a second: far below what the
                // receivers drain, so none is lost after the filter.
                thread::sleep(Duration::from_micros(100));
            }
        })
    };
    let total = || {
        sent.iter()
            .map(|port| port.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let flowing = || {
        let from = total();
        wait_until("datagrams sent", Duration::from_secs(5), || {
            total() >= from + 100
        });
    };

    // counted[port][rule]: summed over every instance that was attached.
    let mut counted = [[0u64; 3]; 2];
    // What `filter` counted: [port][rule].
    let count = |filter: &Filter, a_allowed: bool| {
        let rules = filter.rule_counters().unwrap();
        let (a, b) = if a_allowed {
            (ALLOW, DENY)
        } else {
            (DENY, ALLOW)
        };
        let mut by_port = [[0u64; 3]; 2];
        by_port[0][a] = rules[a].packets;
        by_port[1][b] = rules[b].packets;
        by_port
    };
    let record = |counted: &mut [[u64; 3]; 2], old: &Filter, a_allowed: bool| {
        for (total, new) in counted
            .iter_mut()
            .flatten()
            .zip(count(old, a_allowed).iter().flatten())
        {
            *total += new;
        }
    };
    for swap in 0..SWAPS {
        flowing();
        let a_allowed_now = swap.is_multiple_of(2);
        let mut next = if a_allowed_now {
            rules(PORT_B, PORT_A)
        } else {
            rules(PORT_A, PORT_B)
        };
        assert_eq!(attach(&mut next), Attached::Adopted);
        let old = std::mem::replace(&mut filter, next);
        // Packets already inside the old program finish first, as the
        // agent waits for them before it carries the counts over.
        loader::wait_for_running_programs();
        record(&mut counted, &old, a_allowed_now);
    }
    flowing();
    sending.store(false, Ordering::Relaxed);
    sender.join().unwrap();
    let sent = [0, 1].map(|port| sent[port].load(Ordering::Relaxed));
    // The last datagrams reach the program before its counts are read.
    let last_a_allowed = SWAPS.is_multiple_of(2);
    wait_until("every datagram counted", Duration::from_secs(2), || {
        let mut so_far = counted;
        record(&mut so_far, &filter, last_a_allowed);
        so_far.iter().flatten().sum::<u64>() >= sent[0] + sent[1]
    });
    record(&mut counted, &filter, last_a_allowed);
    stop.store(true, Ordering::Relaxed);
    for receiver in receivers {
        receiver.join().unwrap();
    }

    let received: Vec<u64> = received
        .iter()
        .map(|count| count.load(Ordering::Relaxed))
        .collect();
    assert!(
        sent[0] > 1000 && sent[1] > 1000,
        "too little traffic: {sent:?}"
    );
    println!("sent {sent:?}, received {received:?}, counted {counted:?}");
    for port in 0..2 {
        assert_eq!(
            counted[port][ALLOW] + counted[port][DENY],
            sent[port],
            "port {port}: every datagram counted once ({counted:?}, sent {sent:?})"
        );
        assert_eq!(
            counted[port][ALLOW], received[port],
            "port {port}: received = allowed ({counted:?})"
        );
        assert!(
            counted[port][DENY] > 0 && counted[port][ALLOW] > 0,
            "{counted:?}"
        );
    }
}

/// A rules file with an error attaches nothing: one located error line,
/// exit 1, and the interface keeps passing traffic unfiltered.
#[test]
fn bad_rules_attach_nothing() {
    let pair = Pair::create("bad").unwrap();
    let _responder = Responder::start(&pair.server, PORT).unwrap();
    let mut rules = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        rules,
        "[filter]\ndefault = \"deny\"\n[[rule]]\nname = \"x\"\naction = \"allow\"\ndport = 22"
    )
    .unwrap();
    let output = agent_command(&pair, rules.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(":6:9: rule \"x\": dport needs proto"),
        "{stderr}"
    );
    let link = pair.server.ip(&["link", "show", &pair.server_if]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"));
    assert!(traffic::tcp_exchange(&pair.client, service(Pair::SERVER_V4), None).unwrap());
}
