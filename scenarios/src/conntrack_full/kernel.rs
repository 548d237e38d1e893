//! What the conntrack-full scenario reads of the kernel (conntrack's
//! counts and drop counters, its table size) and the floods it starts.

use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, ensure};
use testbed::Netns;

use super::{CONNTRACK_MAX, DNS_PORT, PORT, SPOOFED_CLIENT, SYN_FLOOD, UDP_FLOOD};
use crate::say;

/// The spoofed SYN floods, killed on drop (nsenter execs hping3, so each
/// child is hping3 itself).
pub(super) struct Flood(Vec<Child>);

impl Flood {
    pub(super) fn start(client: &Netns, target: &str) -> anyhow::Result<Self> {
        let mut flood = Self(Vec::new());
        let kinds = [&SYN_FLOOD[..], &UDP_FLOOD];
        let sources = [&["--rand-source"][..], &["-a", SPOOFED_CLIENT]];
        for (kind, source) in kinds
            .iter()
            .flat_map(|kind| sources.map(|source| (kind, source)))
        {
            let child = client
                .command("hping3")
                .arg("-q")
                .args(*kind)
                .args(source)
                .arg(target)
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

/// conntrack entries for the two services' ports in `netns`.
pub(super) fn service_entries(netns: &Netns) -> anyhow::Result<u64> {
    let table = netns.run(|| std::fs::read_to_string("/proc/thread-self/net/nf_conntrack"))??;
    let needles = [PORT, DNS_PORT].map(|port| format!("dport={port} "));
    Ok(table
        .lines()
        .filter(|line| needles.iter().any(|needle| line.contains(needle)))
        .count() as u64)
}

pub(super) fn conntrack_count(netns: &Netns) -> anyhow::Result<u64> {
    let output = netns.exec("sysctl", &["-n", "net.netfilter.nf_conntrack_count"])?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
}

/// The `drop` column of /proc/net/stat/nf_conntrack: packets dropped
/// because no entry could be made for them.
pub(super) fn table_full_drops(netns: &Netns) -> anyhow::Result<u64> {
    stat_columns(netns, &["drop"])
}

/// Every silent drop conntrack counts: drop, early_drop, insert_failed.
pub(super) fn all_drops(netns: &Netns) -> anyhow::Result<u64> {
    stat_columns(netns, &["drop", "early_drop", "insert_failed"])
}

/// The sum of `columns` of /proc/net/stat/nf_conntrack (hex, one line per
/// CPU).
pub(super) fn stat_columns(netns: &Netns, columns: &[&str]) -> anyhow::Result<u64> {
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
pub(super) struct ConntrackMax {
    previous: String,
}

impl ConntrackMax {
    pub(super) fn set(value: u32) -> anyhow::Result<Self> {
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
