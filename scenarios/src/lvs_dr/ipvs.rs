//! The real director: IPVS in direct-routing mode (`ipvsadm -g`), two real
//! servers with the VIP on loopback (ARP suppressed) that answer the
//! clients directly through the router, and two clients: one on a clean
//! path, one behind a hop with a smaller MTU (so the real servers need the
//! router's fragmentation-needed errors, which go to the VIP, that is to
//! the director). IPVS takes the packets at LOCAL_IN and sends them on
//! itself, so conntrack never confirms an entry for them: with UFW-style
//! rules the clients' ACKs pass as new flows, their FINs and RSTs and the
//! ICMP errors are INVALID and dropped. Then the same traffic with
//! filter-agent's stateless rules on the director instead.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use testbed::{
    Chain, Netns,
    traffic::{self, Responder},
    within,
};

use super::{RULES, UFW};
use crate::{Agent, agent, say, step};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 100);
const PORT: u16 = 80;
/// The real servers' addresses on the director's subnet.
const REAL_SERVERS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 210, 1, 11), Ipv4Addr::new(10, 210, 1, 12)];
/// The second client's subnet, behind the router's small-MTU hop, and its
/// address in each phase: a path MTU a real server learned in the first
/// (or in between) must not answer for the second.
const FAR_ROUTER: &str = "10.210.9.1";
const FAR_CLIENT: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 210, 9, 2), Ipv4Addr::new(10, 210, 9, 3)];
const BOTTLENECK_MTU: u16 = 1280;
/// What the real servers send for each request: many full-size segments.
const REPLY_BYTES: usize = 32 * 1024;
/// Connections closed with a FIN, and aborted with a RST, per phase.
const CLOSED: u16 = 10;
const ABORTED: u16 = 5;
/// How long a transfer may take, and how long the real servers' sockets
/// get to reach their final state (TCG is slow).
const TRANSFER: Duration = Duration::from_secs(5);
const SETTLE: Duration = Duration::from_secs(8);

/// What one phase (UFW-style or filter-agent) measured.
#[derive(Debug, Default)]
pub struct Phase {
    /// Connections that got the whole reply, of [`CLOSED`].
    pub completed: usize,
    /// Every real-server socket reached its end state within `SETTLE`.
    pub settled: bool,
    /// Real-server sockets of closed connections not in TIME_WAIT.
    pub half_closed: usize,
    /// Real-server sockets of aborted connections still there.
    pub aborted_left: usize,
    /// Bytes the far client got, of [`REPLY_BYTES`], and the path MTU a
    /// real server learned for it.
    pub far_bytes: usize,
    pub learned_mtu: Option<u16>,
    /// What UFW's rules on the director counted: packets accepted as part
    /// of a known flow, dropped as INVALID, accepted as new to port 80.
    pub established: u64,
    pub invalid_dropped: u64,
    pub accepted_new: u64,
    /// Entries in the director's conntrack table at the end.
    pub conntrack_entries: u64,
    /// Packets per rule of filter-agent's (empty under UFW).
    pub rules: BTreeMap<String, u64>,
}

#[derive(Debug)]
pub struct Outcome {
    pub ufw: Phase,
    pub stateless: Phase,
}

/// The namespaces and the director's interface.
struct Site {
    chain: Chain,
    real_servers: Vec<Netns>,
    far: Netns,
    director_if: String,
}

impl Site {
    fn client(&self) -> &Netns {
        self.chain.client()
    }
    fn director(&self) -> &Netns {
        &self.chain.namespaces[2]
    }
}

pub fn run(binary: &Path) -> anyhow::Result<Outcome> {
    step!(
        "lvs-dr: a real IPVS director in direct-routing mode, two real servers answering the \
         clients directly; a UFW-style stateful filter on the director"
    );
    let site = build()?;
    let _servers = site
        .real_servers
        .iter()
        .map(|rs| Responder::with_reply_size(rs, PORT, REPLY_BYTES))
        .collect::<Result<Vec<_>, _>>()?;
    let director = site.director();
    director.exec_with_input("iptables-restore", &[], UFW)?;
    say!(
        "director {}: VIP {VIP}:{PORT} -> {} and {} (ipvsadm -g, round robin); UFW-style iptables \
         (ESTABLISHED,RELATED accept; INVALID drop; tcp dport 80 accept)",
        director.name(),
        REAL_SERVERS[0],
        REAL_SERVERS[1]
    );
    say!(
        "clients: {} on a clean path, {} behind a router hop with MTU {BOTTLENECK_MTU}",
        site.client().name(),
        site.far.name()
    );
    let ufw = phase(&site, 40000, FAR_CLIENT[0], None)?;
    report(&ufw);
    ufw_lost_the_flows(&ufw)?;

    step!("filter-agent's stateless rules on the director instead (UFW's rules removed)");
    director.exec("iptables", &["-P", "INPUT", "ACCEPT"])?;
    director.exec("iptables", &["-F", "INPUT"])?;
    let agent = Agent::start(binary, director, &[&site.director_if], RULES)?;
    let stateless = phase(&site, 50000, FAR_CLIENT[1], Some(&agent))?;
    agent.stop()?;
    report(&stateless);
    stateless_kept_them(&stateless)?;
    Ok(Outcome { ufw, stateless })
}

/// Under UFW the director's conntrack never saw the flows: their FINs,
/// RSTs and ICMP errors were INVALID and dropped.
fn ufw_lost_the_flows(ufw: &Phase) -> anyhow::Result<()> {
    ensure!(
        ufw.completed == usize::from(CLOSED),
        "under UFW the transfers themselves failed: {ufw:?}"
    );
    ensure!(
        !ufw.settled
            && ufw.half_closed == usize::from(CLOSED)
            && ufw.aborted_left == usize::from(ABORTED),
        "the FINs and RSTs were not lost on the director: {ufw:?}"
    );
    ensure!(
        ufw.far_bytes < REPLY_BYTES && ufw.learned_mtu.is_none(),
        "the far client's transfer did not stall for want of PMTU: {ufw:?}"
    );
    ensure!(
        ufw.invalid_dropped >= u64::from(CLOSED + ABORTED) && ufw.established == 0,
        "the director's conntrack knew the flows, or its INVALID rule dropped only {} packets: \
         {ufw:?}",
        ufw.invalid_dropped
    );
    Ok(())
}

/// With filter-agent the same packets passed, and `stats` counted them.
fn stateless_kept_them(stateless: &Phase) -> anyhow::Result<()> {
    ensure!(
        stateless.completed == usize::from(CLOSED)
            && stateless.settled
            && stateless.half_closed == 0
            && stateless.aborted_left == 0,
        "with filter-agent connections still did not close: {stateless:?}"
    );
    ensure!(
        stateless.far_bytes == REPLY_BYTES && stateless.learned_mtu == Some(BOTTLENECK_MTU),
        "with filter-agent the far client's transfer still stalled: {stateless:?}"
    );
    let passed = |rule: &str| stateless.rules.get(rule).copied().unwrap_or(0);
    ensure!(
        passed("http-fin") >= u64::from(CLOSED)
            && passed("http-rst") >= u64::from(ABORTED)
            && passed("icmp-unreachable") >= 1,
        "`stats` does not show the FINs, RSTs and ICMP errors passed: {:?}",
        stateless.rules
    );
    Ok(())
}

/// The site: client - router - (bridge: director, two real servers), and
/// the far client on a second router port whose MTU is small.
fn build() -> anyhow::Result<Site> {
    let chain = Chain::create("lvs", &["cli", "rtr", "dir"])?;
    let (router, director) = (&chain.namespaces[1], &chain.namespaces[2]);
    let prefix = router.name().trim_end_matches("rtr").to_owned();
    chain.bridge(1)?;
    let director_if = chain.right_if(1);
    let vip = format!("{VIP}/32");
    director.ip(&["addr", "add", &vip, "dev", &director_if])?;
    director.exec(
        "ipvsadm",
        &["-A", "-t", &format!("{VIP}:{PORT}"), "-s", "rr"],
    )?;
    let mut real_servers = Vec::new();
    for (n, address) in REAL_SERVERS.iter().enumerate() {
        let rs = Netns::create(&format!("{prefix}rs{n}"))?;
        let iface = format!("{director_if}r{n}");
        chain.join(1, &rs, &iface)?;
        rs.ip(&["addr", "add", &format!("{address}/24"), "dev", &iface])?;
        rs.ip(&["addr", "add", &vip, "dev", "lo"])?;
        // The VIP is the director's on the wire: the real servers never
        // answer ARP for it, nor use it as an ARP source.
        for conf in ["all", &iface] {
            rs.sysctl(&format!("net.ipv4.conf.{conf}.arp_ignore"), "1")?;
            rs.sysctl(&format!("net.ipv4.conf.{conf}.arp_announce"), "2")?;
        }
        rs.ip(&["route", "add", "default", "via", "10.210.1.1"])?;
        let real = format!("{address}:{PORT}");
        director.exec(
            "ipvsadm",
            &["-a", "-t", &format!("{VIP}:{PORT}"), "-r", &real, "-g"],
        )?;
        real_servers.push(rs);
    }
    let far = Netns::create(&format!("{prefix}far"))?;
    let (near_if, far_if) = (format!("{director_if}m"), format!("{director_if}f"));
    router.ip(&[
        "link",
        "add",
        &near_if,
        "mtu",
        &BOTTLENECK_MTU.to_string(),
        "type",
        "veth",
        "peer",
        "name",
        &far_if,
        "netns",
        far.name(),
    ])?;
    router.ip(&["addr", "add", &format!("{FAR_ROUTER}/24"), "dev", &near_if])?;
    router.ip(&["link", "set", &near_if, "up"])?;
    for address in FAR_CLIENT {
        far.ip(&["addr", "add", &format!("{address}/24"), "dev", &far_if])?;
    }
    far.ip(&["link", "set", &far_if, "up"])?;
    far.ip(&["route", "add", "default", "via", FAR_ROUTER])?;
    Ok(Site {
        chain,
        real_servers,
        far,
        director_if,
    })
}

/// One round of traffic from client ports `base..`: [`CLOSED`] transfers
/// closed normally, [`ABORTED`] connections reset, and one transfer to the
/// far client at `far`; then what the real servers and the director show.
fn phase(site: &Site, base: u16, far: Ipv4Addr, agent: Option<&Agent>) -> anyhow::Result<Phase> {
    let vip = SocketAddr::from((VIP, PORT));
    let mut phase = Phase::default();
    let closed: Vec<u16> = (base..base + CLOSED).collect();
    let aborted: Vec<u16> = (base + 100..base + 100 + ABORTED).collect();
    for &port in &closed {
        let from = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        if traffic::tcp_fetch(site.client(), vip, from, TRANSFER)? == REPLY_BYTES {
            phase.completed += 1;
        }
    }
    for &port in &aborted {
        ensure!(
            traffic::tcp_abort(site.client(), vip, port)?,
            "no connection from port {port} to abort"
        );
    }
    let from = SocketAddr::from((far, base + 200));
    phase.far_bytes = traffic::tcp_fetch(&site.far, vip, from, TRANSFER)?;
    // Closed connections end in TIME_WAIT on the real server (it closed
    // first) once the client's FIN arrives; reset ones are gone.
    let settled = |sockets: &[(u16, u8)]| {
        sockets.iter().all(|&(port, state)| {
            if closed.contains(&port) {
                state == TIME_WAIT
            } else {
                !aborted.contains(&port)
            }
        })
    };
    let mut sockets = Vec::new();
    // Under UFW they never settle (its lost FINs are the point): the
    // counts below say so, and `settled` records whether they did.
    phase.settled = within(SETTLE, || {
        sockets = site
            .real_servers
            .iter()
            .map(server_sockets)
            .collect::<anyhow::Result<Vec<_>>>()
            .map(|all| all.concat())
            .unwrap_or_default();
        settled(&sockets)
    });
    phase.half_closed = sockets
        .iter()
        .filter(|(port, state)| closed.contains(port) && *state != TIME_WAIT)
        .count();
    phase.aborted_left = sockets
        .iter()
        .filter(|(port, _)| aborted.contains(port))
        .count();
    for rs in &site.real_servers {
        let route = rs.ip(&["-4", "route", "get", &far.to_string()])?;
        let route = String::from_utf8_lossy(&route.stdout);
        let mtu = route.split_whitespace().skip_while(|w| *w != "mtu").nth(1);
        phase.learned_mtu = phase.learned_mtu.or(mtu.and_then(|mtu| mtu.parse().ok()));
    }
    let director = site.director();
    phase.conntrack_entries = director
        .run(|| fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count"))??
        .trim()
        .parse()?;
    count_on_the_director(site, agent, &mut phase)?;
    Ok(phase)
}

/// What the director's filter counted: filter-agent's rules (`stats`), or
/// UFW's iptables counters.
fn count_on_the_director(
    site: &Site,
    agent: Option<&Agent>,
    phase: &mut Phase,
) -> anyhow::Result<()> {
    let director = site.director();
    if let Some(agent) = agent {
        let stats = agent.json(&["stats", "--iface", &site.director_if])?;
        for rule in super::RULE_NAMES {
            let packets = agent::rule_packets(&stats, &site.director_if, rule)?;
            phase.rules.insert(rule.to_owned(), packets);
        }
    } else {
        let listed = director.exec("iptables", &["-L", "INPUT", "-v", "-x", "-n"])?;
        let listed = String::from_utf8_lossy(&listed.stdout);
        let counted = |what: &str| -> anyhow::Result<u64> {
            listed
                .lines()
                .find(|line| line.contains(what))
                .and_then(|line| line.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("no {what} rule in the director's INPUT chain"))
        };
        phase.established = counted("RELATED,ESTABLISHED")?;
        phase.invalid_dropped = counted("INVALID")?;
        phase.accepted_new = counted("dpt:80")?;
    }
    Ok(())
}

/// `/proc/net/tcp`'s TIME_WAIT and LISTEN states.
const TIME_WAIT: u8 = 0x06;
const LISTEN: u8 = 0x0a;

/// The real server's sockets on port 80: (the client's port, TCP state).
/// The responder's socket is dual-stack, so IPv4 peers are in `tcp6`.
fn server_sockets(rs: &Netns) -> anyhow::Result<Vec<(u16, u8)>> {
    // thread-self: the namespace of the thread that entered, not of the
    // process.
    let tables = rs.run(|| {
        ["tcp", "tcp6"]
            .map(|table| fs::read_to_string(format!("/proc/thread-self/net/{table}")))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
    })??;
    let hex = |field: &str| u16::from_str_radix(field, 16).ok();
    Ok(tables
        .iter()
        .flat_map(|table| table.lines().skip(1))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = hex(fields.get(1)?.rsplit_once(':')?.1)?;
            let remote_port = hex(fields.get(2)?.rsplit_once(':')?.1)?;
            let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
            (local_port == PORT && state != LISTEN).then_some((remote_port, state))
        })
        .collect())
}

fn report(phase: &Phase) {
    say!(
        "{} of {CLOSED} transfers complete; on the real servers {} of them left half-closed \
         (not TIME_WAIT), {} of {ABORTED} reset connections still open",
        phase.completed,
        phase.half_closed,
        phase.aborted_left
    );
    say!(
        "far client (path MTU {BOTTLENECK_MTU}): {} of {REPLY_BYTES} bytes; path MTU the real \
         servers learned: {}",
        phase.far_bytes,
        phase
            .learned_mtu
            .map_or("none (1500)".to_owned(), |mtu| mtu.to_string())
    );
    if phase.rules.is_empty() {
        say!(
            "director: UFW accepted {} packets of known flows, {} as new to port 80 (the SYNs and \
             every ACK); dropped {} as INVALID; {} conntrack entries",
            phase.established,
            phase.accepted_new,
            phase.invalid_dropped,
            phase.conntrack_entries
        );
    } else {
        let rules: Vec<String> = phase
            .rules
            .iter()
            .map(|(rule, packets)| format!("{rule} {packets}"))
            .collect();
        say!(
            "director: filter-agent passed, per rule: {}; {} conntrack entries",
            rules.join(", "),
            phase.conntrack_entries
        );
    }
}
