//! Incident 4 (Cloudflare): a stateful firewall needs a conntrack entry for
//! every new flow. A spoofed SYN flood fills the table, and then the
//! kernel drops every new connection, legitimate or not, with no rule
//! saying so. filter-agent drops the flood in XDP, before conntrack.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use testbed::{
    Chain, Netns,
    traffic::{self, Responder},
    within,
};

use crate::{Agent, agent, nft, ports, say, step};

const PORT: u16 = 8080;
/// The conntrack table size for the scenario (global; restored after).
const TABLE: u32 = 512;
/// Spoofed SYNs per flood at most (5,000 a second, so at most 8 s); it is
/// stopped once the legitimate connections have been tried.
const FLOOD: u32 = 40_000;
const FLOOD_INTERVAL: &str = "u200";
const CONNECTIONS: usize = 10;
/// How long the flood may take to fill the table (or, with the agent, to be
/// dropped in numbers).
const FLOOD_EFFECT: Duration = Duration::from_secs(15);
const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// The host's stateful firewall: new connections to the service, replies.
const STATEFUL: &str =
    "table inet fa_stateful { chain input { type filter hook input priority filter; policy drop;
    iifname \"lo\" accept
    ct state established,related accept
    tcp dport 8080 ct state new accept
  }
}
";

/// filter-agent in front of it: the service only for the client network.
const RULES: &str = r#"
[filter]
default = "deny"

[[rule]]
name = "service"
action = "allow"
proto = "tcp"
src = "10.210.0.0/24"
dport = "8080"
"#;

#[derive(Debug)]
pub struct Outcome {
    /// conntrack entries after the flood, and legitimate connections
    /// answered, without and with filter-agent.
    pub stateful_entries: u64,
    pub stateful_answered: usize,
    /// Packets conntrack itself dropped because the table was full: no
    /// firewall rule counts them.
    pub stateful_table_full_drops: u64,
    pub filtered_entries: u64,
    pub filtered_answered: usize,
    /// Flood packets filter-agent dropped (its `default_deny` count).
    pub dropped_in_xdp: u64,
}

pub fn run(binary: &Path) -> anyhow::Result<Outcome> {
    step!(
        "conntrack-full: a host with a stateful firewall (nftables, conntrack), \
         nf_conntrack_max {TABLE}, under a spoofed SYN flood (hping3 --rand-source, 5,000/s)"
    );
    let _table = ConntrackMax::set(TABLE)?;

    let (stateful_entries, stateful_answered, stateful_table_full_drops) =
        flood_and_connect(binary, false)?;
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
        "the same, with filter-agent on the host's interface: the service only for 10.210.0.0/24"
    );
    let (filtered_entries, filtered_answered, dropped_in_xdp) = flood_and_connect(binary, true)?;
    say!(
        "with filter-agent: {filtered_entries} conntrack entries during the flood \
         ({dropped_in_xdp} flood packets dropped in XDP, default_deny); \
         legitimate connections answered: {filtered_answered} of {CONNECTIONS}"
    );
    ensure!(
        filtered_answered == CONNECTIONS && filtered_entries < u64::from(TABLE) / 10,
        "filter-agent did not keep the table free"
    );
    ensure!(
        dropped_in_xdp >= u64::from(TABLE) * 4,
        "filter-agent dropped only {dropped_in_xdp} packets"
    );
    Ok(Outcome {
        stateful_entries,
        stateful_answered,
        stateful_table_full_drops,
        filtered_entries,
        filtered_answered,
        dropped_in_xdp,
    })
}

/// A fresh client and host; when `filtered`, filter-agent (`binary`) on
/// the host. Starts the flood, lets it fill the table, connects while it
/// goes on: (conntrack entries, connections answered, packets dropped: by
/// conntrack for a full table without the agent, in XDP with it). Without
/// the agent, `filter-agent audit` must flag the full table meanwhile.
fn flood_and_connect(binary: &Path, filtered: bool) -> anyhow::Result<(u64, usize, u64)> {
    let chain = Chain::create("ctf", &["cli", "host"])?;
    let (client, host) = (chain.client(), chain.server());
    let iface = chain.right_if(0);
    // Replies to spoofed sources leave towards the client (and vanish).
    host.ip(&["route", "add", "default", "via", "10.210.0.1"])?;
    nft(host, STATEFUL)?;
    let _service = Responder::start(host, PORT)?;
    let agent = filtered
        .then(|| Agent::start(binary, host, &[&iface], RULES))
        .transpose()?;

    let target = chain.server_addr().to_string();
    // Bounded by its count; killed as soon as the connections were tried
    // (nsenter execs hping3, so the child is hping3 itself).
    let mut flood = client
        .command("hping3")
        .args(["-q", "-S", "-p", "8080", "--rand-source"])
        .args(["-i", FLOOD_INTERVAL, "-c", &FLOOD.to_string(), &target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("running hping3")?;
    // The flood has its effect before the connections: without the agent
    // the table is full and conntrack drops what does not fit, with it the
    // flood is being dropped in XDP.
    let flooded = within(FLOOD_EFFECT, || match &agent {
        None => table_full_drops(host).is_ok_and(|drops| drops > 0),
        Some(agent) => agent
            .json(&["stats", "--iface", &iface])
            .and_then(|stats| agent::reason_packets(&stats, &iface, "default_deny"))
            .is_ok_and(|dropped| dropped >= u64::from(TABLE) * 4),
    });
    if !flooded {
        let _ = flood.kill();
        let _ = flood.wait();
        anyhow::bail!("the flood had no effect within {FLOOD_EFFECT:?}");
    }
    let attempts = (|| -> anyhow::Result<(u64, usize)> {
        let entries = conntrack_count(host)?;
        if !filtered {
            let audit = agent::json(binary, &["audit"])?;
            let flagged = ports::finding(ports::audited(&audit, host.name())?, "conntrack")?;
            say!(
                "`filter-agent audit` on {}: {}",
                host.name(),
                flagged["problem"].as_str().unwrap_or("?")
            );
        }
        let server = SocketAddr::from((chain.server_addr(), PORT));
        let mut answered = 0;
        for _ in 0..CONNECTIONS {
            answered += usize::from(traffic::tcp_exchange(client, server, None)?);
        }
        Ok((entries, answered))
    })();
    let _ = flood.kill();
    let _ = flood.wait();
    let (entries, answered) = attempts?;
    let dropped = match agent {
        Some(agent) => {
            let stats = agent.json(&["stats", "--iface", &iface])?;
            let dropped = agent::reason_packets(&stats, &iface, "default_deny")?;
            agent.stop()?;
            dropped
        }
        None => table_full_drops(host)?,
    };
    Ok((entries, answered, dropped))
}

fn conntrack_count(netns: &Netns) -> anyhow::Result<u64> {
    let output = netns.exec("sysctl", &["-n", "net.netfilter.nf_conntrack_count"])?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
}

/// The `drop` column of /proc/net/stat/nf_conntrack (hex, one line per
/// CPU): packets dropped because no entry could be made for them.
fn table_full_drops(netns: &Netns) -> anyhow::Result<u64> {
    let output = netns.exec("cat", &["/proc/net/stat/nf_conntrack"])?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines();
    let header = lines.next().context("empty conntrack statistics")?;
    let column = header
        .split_whitespace()
        .position(|name| name == "drop")
        .context("no drop column")?;
    let mut drops = 0;
    for line in lines {
        let field = line.split_whitespace().nth(column).context("short line")?;
        drops += u64::from_str_radix(field, 16)?;
    }
    Ok(drops)
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
