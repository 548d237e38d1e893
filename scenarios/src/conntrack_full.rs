//! Incident 4 (Cloudflare): a stateful firewall needs a conntrack entry for
//! every new flow. A spoofed SYN flood fills the table, and then the
//! kernel drops every new connection, legitimate or not, with no rule
//! saying so. The service is public and the flood comes from everywhere,
//! the clients' own network included, so no allow-list can tell them
//! apart: filter-agent keeps the service's flows out of conntrack
//! (`notrack = true`), and the host's stateful firewall goes on guarding
//! everything else.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use serde_json::Value;
use testbed::{
    Chain, Netns,
    traffic::{self, Responder},
    within,
};

use crate::{Agent, agent, nft, ports, say, step};

const PORT: u16 = 8080;
/// Another service the stateful firewall allows, and one it does not.
const TRACKED_PORT: u16 = 9090;
const CLOSED_PORT: u16 = 7070;
/// The conntrack table size for the scenario (global; restored after).
const TABLE: u32 = 512;
/// Spoofed SYNs per flood at most (5,000 a second from everywhere, as
/// many from one address of the clients' network, so at most 8 s); it is
/// stopped once the legitimate connections have been tried.
const FLOOD: u32 = 40_000;
const FLOOD_INTERVAL: &str = "u200";
/// A spoofed source in the clients' own network.
const SPOOFED_CLIENT: &str = "10.210.0.77";
const CONNECTIONS: usize = 10;
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
"#;

#[derive(Debug)]
pub struct Outcome {
    /// conntrack entries after the flood, and legitimate connections
    /// answered, without filter-agent.
    pub stateful_entries: u64,
    pub stateful_answered: usize,
    /// Packets conntrack itself dropped because the table was full: no
    /// firewall rule counts them.
    pub stateful_table_full_drops: u64,
    /// With filter-agent: the most conntrack entries seen during the
    /// flood, those of the service, connections answered, how far the
    /// drop counters moved, and flood packets its rule passed.
    pub filtered_entries: u64,
    pub filtered_service_entries: u64,
    pub filtered_answered: usize,
    pub filtered_drops_moved: u64,
    pub flood_passed: u64,
    /// The audit's fix for the host's firewall, run as printed.
    pub notrack_fix: String,
}

pub fn run(binary: &Path) -> anyhow::Result<Outcome> {
    step!(
        "conntrack-full: a public service on a host with a stateful firewall (nftables, \
         conntrack), nf_conntrack_max {TABLE}, under a spoofed SYN flood from everywhere and from \
         the clients' own network (hping3 --rand-source and -a {SPOOFED_CLIENT}, 5,000/s each)"
    );
    let _table = ConntrackMax::set(TABLE)?;

    let (stateful_entries, stateful_answered, stateful_table_full_drops) = stateful(binary)?;
    say!(
        "without filter-agent: {stateful_entries} conntrack entries during the flood; \
         legitimate connections answered: {stateful_answered} of {CONNECTIONS}"
    );
    say!(
        "conntrack dropped {stateful_table_full_drops} packets because its table was full \
         (/proc/net/stat/nf_conntrack; no firewall rule counted them)"
    );
    ensure!(
        stateful_entries >= u64::from(TABLE) * 9 / 10
            && stateful_answered <= CONNECTIONS / 5
            && stateful_table_full_drops > 0,
        "the flood did not fill the table and stop new connections"
    );

    step!(
        "the same, with filter-agent on the host's interface: the service public, its flows kept \
         out of conntrack (notrack = true)"
    );
    Ok(Outcome {
        stateful_entries,
        stateful_answered,
        stateful_table_full_drops,
        ..public(binary)?
    })
}

/// A fresh client and host with the stateful firewall and the services.
fn site() -> anyhow::Result<(Chain, Vec<Responder>)> {
    let chain = Chain::create("ctf", &["cli", "host"])?;
    let host = chain.server();
    // Replies to spoofed sources leave towards the client (and vanish).
    host.ip(&["route", "add", "default", "via", "10.210.0.1"])?;
    nft(host, STATEFUL)?;
    let services = [PORT, TRACKED_PORT, CLOSED_PORT]
        .map(|port| Responder::start(host, port))
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    Ok((chain, services))
}

/// The spoofed SYN floods, killed on drop (nsenter execs hping3, so each
/// child is hping3 itself).
struct Flood(Vec<Child>);

impl Flood {
    fn start(client: &Netns, target: &str) -> anyhow::Result<Self> {
        let mut flood = Self(Vec::new());
        for source in [&["--rand-source"][..], &["-a", SPOOFED_CLIENT]] {
            let child = client
                .command("hping3")
                .args(["-q", "-S", "-p", "8080"])
                .args(source)
                .args(["-i", FLOOD_INTERVAL, "-c", &FLOOD.to_string(), target])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("running hping3")?;
            flood.0.push(child);
        }
        Ok(flood)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Without filter-agent: floods until conntrack drops, then connects
/// while the flood goes on; `filter-agent audit` must flag the full table
/// meanwhile. (conntrack entries, connections answered, packets conntrack
/// dropped for a full table).
fn stateful(binary: &Path) -> anyhow::Result<(u64, usize, u64)> {
    let (chain, _services) = site()?;
    let (client, host) = (chain.client(), chain.server());
    let flood = Flood::start(client, &chain.server_addr().to_string())?;
    let flooded = within(FLOOD_EFFECT, || {
        table_full_drops(host).is_ok_and(|drops| drops > 0)
    });
    ensure!(flooded, "the flood had no effect within {FLOOD_EFFECT:?}");
    let entries = conntrack_count(host)?;
    let audit = agent::json(binary, &["audit"])?;
    let flagged = ports::finding(ports::audited(&audit, host.name())?, "conntrack")?;
    say!(
        "`filter-agent audit` on {}: {}",
        host.name(),
        flagged["problem"].as_str().unwrap_or("?")
    );
    let answered = connect(&chain, PORT)?;
    drop(flood);
    Ok((entries, answered, table_full_drops(host)?))
}

/// With filter-agent and the public notrack rule; the audit's fix for the
/// host's firewall applied first. The stateful fields are left at zero.
fn public(binary: &Path) -> anyhow::Result<Outcome> {
    let (chain, _services) = site()?;
    let (client, host) = (chain.client(), chain.server());
    let iface = chain.right_if(0);
    let agent = Agent::start(binary, host, &[&iface], RULES)?;

    // The firewall accepts the service only as `ct state new`: untracked
    // packets would fall to its policy. The audit, run on the host, says
    // so; its fix is run as printed.
    let rules = agent.rules().to_str().context("a non-UTF-8 path")?;
    let output = host.exec(
        binary.to_str().context("a non-UTF-8 path")?,
        &["audit", "--json", "--rules", rules],
    )?;
    let audit: Value = serde_json::from_slice(&output.stdout)?;
    let own = audit["namespaces"]
        .as_array()
        .and_then(|all| all.iter().find(|ns| ns["host"] == true))
        .context("no host namespace in the audit")?;
    let finding = ports::finding(own, "notrack")?;
    say!(
        "`filter-agent audit` on the host: {}",
        finding["problem"].as_str().unwrap_or("?")
    );
    let notrack_fix = finding["fix"].as_str().context("no fix")?.to_owned();
    say!("  {notrack_fix}");
    host.exec("sh", &["-c", &notrack_fix])?;

    let drops_before = all_drops(host)?;
    let flood = Flood::start(client, &chain.server_addr().to_string())?;
    let passed = || {
        agent
            .json(&["stats", "--iface", &iface])
            .and_then(|stats| agent::rule_packets(&stats, &iface, "public-web"))
    };
    let flooded = within(FLOOD_EFFECT, || {
        passed().is_ok_and(|count| count >= u64::from(TABLE) * 4)
    });
    ensure!(flooded, "the flood never reached the service in numbers");
    // The table's count over the connections, sampled between them.
    let mut entries = conntrack_count(host)?;
    let mut answered = 0;
    for _ in 0..CONNECTIONS {
        answered += connect(&chain, PORT)?;
        entries = entries.max(conntrack_count(host)?);
    }
    let service_entries = service_entries(host)?;
    let flood_passed = passed()?;
    drop(flood);
    let drops_moved = all_drops(host)? - drops_before;
    say!(
        "with filter-agent: at most {entries} conntrack entries during the flood, {service_entries} \
         of them for port {PORT} ({flood_passed} flood packets passed by the rule public-web); \
         legitimate connections answered: {answered} of {CONNECTIONS}; conntrack's drop counters \
         moved by {drops_moved}"
    );
    let tracked = connect(&chain, TRACKED_PORT)? == 1;
    let closed = connect(&chain, CLOSED_PORT)? == 1;
    say!(
        "the stateful firewall still guards the rest: port {TRACKED_PORT} answered: {tracked}, \
         port {CLOSED_PORT} (not allowed) answered: {closed}"
    );
    agent.stop()?;
    ensure!(
        answered == CONNECTIONS
            && service_entries == 0
            && entries < u64::from(TABLE)
            && drops_moved == 0,
        "filter-agent did not keep the service out of the table"
    );
    ensure!(
        tracked && !closed,
        "the stateful firewall no longer guards the other ports"
    );
    Ok(Outcome {
        stateful_entries: 0,
        stateful_answered: 0,
        stateful_table_full_drops: 0,
        filtered_entries: entries,
        filtered_service_entries: service_entries,
        filtered_answered: answered,
        filtered_drops_moved: drops_moved,
        flood_passed,
        notrack_fix,
    })
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

/// conntrack entries for the service's port in `netns`.
fn service_entries(netns: &Netns) -> anyhow::Result<u64> {
    let table = netns.run(|| std::fs::read_to_string("/proc/thread-self/net/nf_conntrack"))??;
    let needle = format!("dport={PORT} ");
    Ok(table.lines().filter(|line| line.contains(&needle)).count() as u64)
}

fn conntrack_count(netns: &Netns) -> anyhow::Result<u64> {
    let output = netns.exec("sysctl", &["-n", "net.netfilter.nf_conntrack_count"])?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
}

/// The `drop` column of /proc/net/stat/nf_conntrack: packets dropped
/// because no entry could be made for them.
fn table_full_drops(netns: &Netns) -> anyhow::Result<u64> {
    stat_columns(netns, &["drop"])
}

/// Every silent drop conntrack counts: drop, early_drop, insert_failed.
fn all_drops(netns: &Netns) -> anyhow::Result<u64> {
    stat_columns(netns, &["drop", "early_drop", "insert_failed"])
}

/// The sum of `columns` of /proc/net/stat/nf_conntrack (hex, one line per
/// CPU).
fn stat_columns(netns: &Netns, columns: &[&str]) -> anyhow::Result<u64> {
    let output = netns.exec("cat", &["/proc/net/stat/nf_conntrack"])?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .context("empty conntrack statistics")?
        .split_whitespace()
        .collect();
    let mut sum = 0;
    for line in lines {
        for (name, field) in header.iter().zip(line.split_whitespace()) {
            if columns.contains(name) {
                sum += u64::from_str_radix(field, 16)?;
            }
        }
    }
    Ok(sum)
}

/// `nf_conntrack_max` is global (only the initial namespace may set it):
/// set for the scenario, restored on drop, also after a failure.
struct ConntrackMax {
    previous: String,
}

impl ConntrackMax {
    fn set(value: u32) -> anyhow::Result<Self> {
        let previous = std::fs::read_to_string(CONNTRACK_MAX)?.trim().to_owned();
        let status = Command::new("sysctl")
            .args(["-qw", &format!("net.netfilter.nf_conntrack_max={value}")])
            .status()?;
        ensure!(status.success(), "cannot set nf_conntrack_max");
        say!("(nf_conntrack_max {previous} -> {value} for the scenario; restored afterwards)");
        Ok(Self { previous })
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        let _ = Command::new("sysctl")
            .args([
                "-qw",
                &format!("net.netfilter.nf_conntrack_max={}", self.previous),
            ])
            .status();
    }
}
