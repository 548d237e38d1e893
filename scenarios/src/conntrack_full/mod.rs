//! Incident 4 (Cloudflare): a stateful firewall needs a conntrack entry for
//! every new flow. A spoofed SYN flood fills the table, and then the
//! kernel drops every new connection, legitimate or not, with no rule
//! saying so. The service is public and the flood comes from everywhere,
//! the clients' own network included, so no allow-list can tell them
//! apart: filter-agent keeps the service's flows out of conntrack
//! (`notrack = true`), holds each source to a rate in XDP (`limit`, per
//! source: the flood from one spoofed address is cut to it, while
//! random sources, one packet each, pass to the stack's SYN cookies), and
//! the host's stateful firewall goes on guarding everything else.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use testbed::{
    Chain, Netns,
    traffic::{self, Responder},
    within,
};

mod kernel;

use kernel::{ConntrackMax, Flood, all_drops, conntrack_count, service_entries, table_full_drops};

use crate::{Agent, agent, nft, ports, say, step};

const PORT: u16 = 8080;
/// The DNS-like UDP service (an echo), public too.
const DNS_PORT: u16 = 5353;
/// Another service the stateful firewall allows, and one it does not.
const TRACKED_PORT: u16 = 9090;
const CLOSED_PORT: u16 = 7070;
/// The conntrack table size for the scenario (global; restored after).
const TABLE: u32 = 512;
/// The floods come from everywhere and from one address of the clients'
/// network, and are stopped once the legitimate side has been tried: SYNs
/// to the TCP service as fast as hping3 sends (`--flood`), datagrams to
/// the UDP one 100 us apart (about 5,000/s each here: the single-threaded
/// echo standing in for a DNS server answers that many; a full-speed flood
/// drops queries in its socket, a test of the stand-in, not of conntrack).
const SYN_FLOOD: [&str; 4] = ["-S", "-p", "8080", "--flood"];
const UDP_FLOOD: [&str; 5] = ["--udp", "-p", "5353", "-i", "u100"];
/// A spoofed source in the clients' own network.
const SPOOFED_CLIENT: &str = "10.210.0.77";
const CONNECTIONS: usize = 10;
/// Tries per legitimate query.
const QUERY_TRIES: usize = 3;
/// How long the flood may take to fill the table (or, with the agent, to
/// pass it in numbers).
const FLOOD_EFFECT: Duration = Duration::from_secs(15);
const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// The host's stateful firewall: new connections to two services, replies.
const STATEFUL: &str =
    "table inet fa_stateful { chain input { type filter hook input priority filter; policy drop;
    iifname \"lo\" accept
    ct state established,related accept
    tcp dport { 8080, 9090 } ct state new accept
    udp dport 5353 ct state new accept
  }
}
";

/// filter-agent in front of it: the service is public, and its flows skip
/// conntrack; everything else meets the stateful firewall as before.
const RULES: &str = r#"
[filter]
default = "allow"

[[rule]]
name = "public-web"
action = "allow"
proto = "tcp"
dport = "8080"
notrack = true
limit = { rate = "200/s", burst = 50, per = "source", ipv4_prefix = 32 }

[[rule]]
name = "public-dns"
action = "allow"
proto = "udp"
dport = "5353"
notrack = true
limit = { rate = "200/s", burst = 50, per = "source", ipv4_prefix = 32 }
"#;

/// The per-source rate above.
const SOURCE_RATE: u64 = 200;
/// The services' rules above: TCP, then UDP.
const SERVICE_RULES: [&str; 2] = ["public-web", "public-dns"];

/// What the legitimate side saw during a flood.
#[derive(Debug, Default)]
pub struct Served {
    /// The most conntrack entries seen, and those of the two services.
    pub entries: u64,
    /// The table's count at each legitimate attempt.
    pub entries_over_time: Vec<u64>,
    pub service_entries: u64,
    /// TCP connections and UDP queries answered, of [`CONNECTIONS`].
    pub connections: usize,
    pub queries: usize,
    /// The host's own UDP `sendto()` refused with EPERM (no entry could
    /// be made for it).
    pub sendto_refused: bool,
}

#[derive(Debug)]
pub struct Outcome {
    pub stateful: Served,
    /// Packets conntrack itself dropped because the table was full: no
    /// firewall rule counts them.
    pub stateful_table_full_drops: u64,
    pub filtered: Served,
    /// How far the drop counters moved with filter-agent, and the flood
    /// packets its rules passed.
    pub filtered_drops_moved: u64,
    pub flood_passed: u64,
    /// Per service rule (TCP, UDP): packets per second it saw while the
    /// legitimate side was tried (the floods' rates at the host's XDP).
    pub flood_rate: [f64; 2],
    /// Per service rule (TCP, UDP): packets its per-source limit dropped,
    /// as /metrics reports them.
    pub over_limit: [u64; 2],
    /// The audit's fixes for the host's firewall, run as printed.
    pub notrack_fixes: Vec<String>,
}

pub fn run(binary: &Path) -> anyhow::Result<Outcome> {
    step!(
        "conntrack-full: public TCP and UDP services on a host with a stateful firewall \
         (nftables, conntrack), nf_conntrack_max {TABLE}, under spoofed SYN and UDP floods from \
         everywhere and from the clients' own network (hping3 --rand-source and -a \
         {SPOOFED_CLIENT}; SYNs with --flood, datagrams with -i u100)"
    );
    let _table = ConntrackMax::set(TABLE)?;

    let (stateful, stateful_table_full_drops) = without_agent(binary)?;
    report("without filter-agent", &stateful);
    say!(
        "conntrack dropped {stateful_table_full_drops} packets because its table was full \
         (/proc/net/stat/nf_conntrack; no firewall rule counted them)"
    );
    ensure!(
        // A few may get in where conntrack's early_drop evicts a flood
        // entry for them.
        stateful.entries >= u64::from(TABLE) * 9 / 10
            && stateful.connections <= CONNECTIONS / 2
            && stateful.queries <= CONNECTIONS / 2
            && stateful.sendto_refused
            && stateful_table_full_drops > 0,
        "the flood did not fill the table and stop new flows: {stateful:?}"
    );

    step!(
        "the same, with filter-agent on the host's interface: both services public, their flows \
         kept out of conntrack (notrack = true) and each source held to {SOURCE_RATE}/s in XDP \
         (limit per source)"
    );
    Ok(Outcome {
        stateful,
        stateful_table_full_drops,
        ..public(binary)?
    })
}

fn report(what: &str, served: &Served) {
    say!(
        "{what}: conntrack entries at each attempt {:?} (at most {}), {} of them for ports {PORT} \
         and {DNS_PORT}; legitimate TCP connections answered: {} of {CONNECTIONS}, UDP queries: {} \
         of {CONNECTIONS} (in up to {QUERY_TRIES} tries); the host's own UDP sendto() refused (EPERM): {}",
        served.entries_over_time,
        served.entries,
        served.service_entries,
        served.connections,
        served.queries,
        served.sendto_refused
    );
}

/// A fresh client and host with the stateful firewall and the services.
fn site() -> anyhow::Result<(Chain, Vec<Responder>)> {
    let chain = Chain::create("ctf", &["cli", "host"])?;
    let host = chain.server();
    // Replies to spoofed sources leave towards the client (and vanish).
    host.ip(&["route", "add", "default", "via", "10.210.0.1"])?;
    nft(host, STATEFUL)?;
    let services = [PORT, DNS_PORT, TRACKED_PORT, CLOSED_PORT]
        .map(|port| Responder::start(host, port))
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    Ok((chain, services))
}

/// Without filter-agent: floods until conntrack drops, then serves while
/// the flood goes on; `filter-agent audit` must flag the full table
/// meanwhile. Returns what was served and the packets conntrack dropped
/// for a full table.
fn without_agent(binary: &Path) -> anyhow::Result<(Served, u64)> {
    let (chain, _services) = site()?;
    let (client, host) = (chain.client(), chain.server());
    let flood = Flood::start(client, &chain.server_addr().to_string())?;
    let flooded = within(FLOOD_EFFECT, || {
        table_full_drops(host).is_ok_and(|drops| drops > 0)
    });
    ensure!(flooded, "the flood had no effect within {FLOOD_EFFECT:?}");
    let audit = agent::json(binary, &["audit"])?;
    let flagged = ports::finding(ports::audited(&audit, host.name())?, "conntrack")?;
    say!(
        "`filter-agent audit` on {}: {}",
        host.name(),
        flagged["problem"].as_str().unwrap_or("?")
    );
    let served = serve(&chain)?;
    drop(flood);
    Ok((served, table_full_drops(host)?))
}

/// The legitimate side during a flood: connections and queries from the
/// client, one datagram the host sends itself, the table sampled between.
fn serve(chain: &Chain) -> anyhow::Result<Served> {
    let host = chain.server();
    let mut served = Served::default();
    for _ in 0..CONNECTIONS {
        served.entries_over_time.push(conntrack_count(host)?);
        served.connections += connect(chain, PORT)?;
        served.queries += query(chain)?;
    }
    served.entries_over_time.push(conntrack_count(host)?);
    served.entries = served.entries_over_time.iter().copied().max().unwrap_or(0);
    served.service_entries = service_entries(host)?;
    let outside = SocketAddr::from((chain.client_addr(), 9));
    let sent = host.run(|| UdpSocket::bind("0.0.0.0:0")?.send_to(b"query", outside))?;
    served.sendto_refused = sent.is_err_and(|err| err.kind() == io::ErrorKind::PermissionDenied);
    Ok(served)
}

/// With filter-agent and the public notrack rules; the audit's fixes for
/// the host's firewall applied first. The stateful fields are left empty.
fn public(binary: &Path) -> anyhow::Result<Outcome> {
    let (chain, _services) = site()?;
    let (client, host) = (chain.client(), chain.server());
    let iface = chain.right_if(0);
    let agent = Agent::start(binary, host, &[&iface], RULES)?;

    let notrack_fixes = fix_the_firewall(binary, host, &agent)?;

    let drops_before = all_drops(host)?;
    let flood = Flood::start(client, &chain.server_addr().to_string())?;
    // Per rule: (passed, over the limit).
    let counted = || {
        let stats = agent.json(&["stats", "--iface", &iface])?;
        let [web, dns] = SERVICE_RULES.map(|rule| agent::rule_counts(&stats, &iface, rule));
        anyhow::Ok([web?, dns?])
    };
    let flooded = within(FLOOD_EFFECT, || {
        counted().is_ok_and(|counts| counts.iter().all(|(passed, _)| *passed >= u64::from(TABLE)))
    });
    ensure!(flooded, "the floods never reached the services in numbers");
    let before = counted()?;
    let started = Instant::now();
    let served = serve(&chain)?;
    let after = counted()?;
    let seconds = started.elapsed().as_secs_f64();
    drop(flood);
    let flood_rate = [0, 1].map(|i| {
        let seen = |(passed, over): (u64, u64)| passed + over;
        (seen(after[i]) - seen(before[i])) as f64 / seconds
    });
    let flood_passed = after.iter().map(|(passed, _)| passed).sum();
    let [web, dns] = SERVICE_RULES;
    let over_limit = [
        metrics_over_limit(host, web)?,
        metrics_over_limit(host, dns)?,
    ];
    let drops_moved = all_drops(host)? - drops_before;
    report("with filter-agent", &served);
    say!(
        "(the floods reached the host's XDP at {:.0} packets/s to the TCP service and {:.0} \
         to the UDP one; the per-source limits dropped {} and {} packets \
         (filter_agent_rule_over_limit_packets_total in /metrics), {flood_passed} passed in all; \
         conntrack's drop counters moved by {drops_moved})",
        flood_rate[0],
        flood_rate[1],
        over_limit[0],
        over_limit[1]
    );
    let (tracked, closed) = still_guarded(&chain)?;
    agent.stop()?;
    held(&served, drops_moved, over_limit, (tracked, closed))?;
    Ok(Outcome {
        stateful: Served::default(),
        stateful_table_full_drops: 0,
        filtered: served,
        filtered_drops_moved: drops_moved,
        flood_passed,
        flood_rate,
        over_limit,
        notrack_fixes,
    })
}

/// What filter-agent must have kept: the services served and out of the
/// table, both floods cut by their limits, the other ports still guarded.
fn held(
    served: &Served,
    drops_moved: u64,
    over_limit: [u64; 2],
    (tracked, closed): (bool, bool),
) -> anyhow::Result<()> {
    ensure!(
        served.connections == CONNECTIONS
            && served.queries == CONNECTIONS
            && !served.sendto_refused
            && served.service_entries == 0
            && served.entries < u64::from(TABLE)
            && drops_moved == 0,
        "filter-agent did not keep the services out of the table: {served:?}, drops {drops_moved}"
    );
    ensure!(
        over_limit.iter().all(|&dropped| dropped > 0),
        "the per-source limits did not cut both floods from {SPOOFED_CLIENT}: {over_limit:?}"
    );
    ensure!(
        tracked && !closed,
        "the stateful firewall no longer guards the other ports"
    );
    Ok(())
}

/// The firewall accepts the services only as `ct state new`: untracked
/// packets would fall to its policy. The audit, run on the host, says so;
/// its fixes are run as printed, and returned.
fn fix_the_firewall(binary: &Path, host: &Netns, agent: &Agent) -> anyhow::Result<Vec<String>> {
    let own = agent::audit_host(binary, host, agent.rules())?;
    let mut notrack_fixes = Vec::new();
    for finding in ports::findings(&own, "notrack") {
        say!(
            "`filter-agent audit` on the host: {}",
            finding["problem"].as_str().unwrap_or("?")
        );
        let fix = finding["fix"].as_str().context("no fix")?.to_owned();
        say!("  {fix}");
        host.exec("sh", &["-c", &fix])?;
        notrack_fixes.push(fix);
    }
    ensure!(
        notrack_fixes.len() == 2,
        "the audit did not flag both services: {notrack_fixes:?}"
    );
    Ok(notrack_fixes)
}

/// Whether the stateful firewall still answers its tracked port, and the
/// port it does not allow.
fn still_guarded(chain: &Chain) -> anyhow::Result<(bool, bool)> {
    let tracked = connect(chain, TRACKED_PORT)? == 1;
    let closed = connect(chain, CLOSED_PORT)? == 1;
    say!(
        "the stateful firewall still guards the rest: port {TRACKED_PORT} answered: {tracked}, \
         port {CLOSED_PORT} (not allowed) answered: {closed}"
    );
    Ok((tracked, closed))
}

/// The packets `rule`'s rate limit dropped, from the agent's /metrics in
/// `netns`.
fn metrics_over_limit(netns: &Netns, rule: &str) -> anyhow::Result<u64> {
    let (status, body) = traffic::http_get(netns, "127.0.0.1:9469", "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    let label = format!("rule=\"{rule}\"");
    body.lines()
        .find(|line| {
            line.starts_with("filter_agent_rule_over_limit_packets_total{") && line.contains(&label)
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .with_context(|| format!("no over-limit count for {rule} in /metrics"))
}

/// Tries a query as a DNS resolver does, up to three times (the flood
/// overruns the responder's socket now and then): 1 when answered.
fn query(chain: &Chain) -> anyhow::Result<usize> {
    let dns = SocketAddr::from((chain.server_addr(), DNS_PORT));
    for _ in 0..QUERY_TRIES {
        if traffic::udp_exchange(chain.client(), dns)? {
            return Ok(1);
        }
    }
    Ok(0)
}

/// Connects once to `port` on the host: 1 when answered.
fn connect(chain: &Chain, port: u16) -> anyhow::Result<usize> {
    let server = SocketAddr::from((chain.server_addr(), port));
    Ok(usize::from(traffic::tcp_exchange(
        chain.client(),
        server,
        None,
    )?))
}
