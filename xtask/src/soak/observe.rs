//! What the soak reads from outside the agent: the kernel's BPF objects
//! (bpftool), a process's descriptors and memory (/proc), the agent's own
//! reports (`stats --json`, /metrics) and `watch`'s lines.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
};

use anyhow::{Context as _, bail};
use testbed::Netns;

/// BPF programs, maps and links in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BpfObjects {
    pub programs: usize,
    pub maps: usize,
    pub links: usize,
}

impl BpfObjects {
    pub fn count() -> anyhow::Result<Self> {
        let count = |kind: &str| -> anyhow::Result<usize> {
            let output = Command::new("bpftool")
                .args([kind, "show", "--json"])
                .output()
                .context("running bpftool")?;
            if !output.status.success() {
                bail!(
                    "bpftool {kind} show: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let listed: serde_json::Value = serde_json::from_slice(&output.stdout)?;
            Ok(listed.as_array().map_or(0, Vec::len))
        };
        Ok(Self {
            programs: count("prog")?,
            maps: count("map")?,
            links: count("link")?,
        })
    }
}

impl std::fmt::Display for BpfObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} programs, {} maps, {} links",
            self.programs, self.maps, self.links
        )
    }
}

/// A process's open descriptors (by kind: what they point at, numbers
/// left out) and resident memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    pub fds: BTreeMap<String, usize>,
    pub rss_kib: u64,
}

impl Usage {
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        let mut fds = BTreeMap::new();
        let dir = format!("/proc/{pid}/fd");
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            let target = std::fs::read_link(entry?.path()).unwrap_or_default();
            let kind: String = target
                .to_string_lossy()
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .collect();
            *fds.entry(kind).or_default() += 1;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .context("no VmRSS")?;
        Ok(Self { fds, rss_kib })
    }

    pub fn fd_count(&self) -> usize {
        self.fds.values().sum()
    }

    /// The kinds of descriptor `later` holds more of, with both counts.
    pub fn fds_grown(&self, later: &Usage) -> Vec<String> {
        later
            .fds
            .iter()
            .filter_map(|(kind, &now)| {
                let before = self.fds.get(kind).copied().unwrap_or(0);
                (now > before).then(|| format!("{kind} {before} -> {now}"))
            })
            .collect()
    }
}

/// What `filter-agent stats --json` says about one interface.
pub struct Stats {
    pub generation: u64,
    pub rules: Vec<String>,
}

impl Stats {
    pub fn read(agent: &str, iface: &str) -> anyhow::Result<Self> {
        let output = Command::new(agent)
            .args(["stats", "--json", "--iface", iface])
            .output()?;
        if !output.status.success() {
            bail!("stats: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        let documents: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let document = &documents[0];
        let rules = document["rules"]
            .as_array()
            .context("stats without rules")?
            .iter()
            .filter_map(|rule| Some(rule["rule"].as_str()?.to_owned()))
            .collect();
        Ok(Self {
            generation: document["generation"].as_u64().context("no generation")?,
            rules,
        })
    }
}

/// The agent's /metrics page, fetched from inside its namespace.
pub fn metrics(ns: &Netns) -> anyhow::Result<String> {
    let (status, body) = testbed::traffic::http_get(ns, "127.0.0.1:9469", "/metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(body)
}

/// `filter-agent watch` for one agent's life, counting its lines.
pub struct Watch {
    child: Child,
    reader: JoinHandle<()>,
    lines: Arc<AtomicU64>,
}

impl Watch {
    pub fn start(agent: &str, iface: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(agent)
            .args(["watch", "--iface", iface])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting filter-agent watch")?;
        let stdout = child.stdout.take().context("watch's stdout")?;
        let lines = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&lines);
        let reader = thread::spawn(move || {
            for _ in BufReader::new(stdout).lines().map_while(Result::ok) {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Self {
            child,
            reader,
            lines,
        })
    }

    pub fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Stops it (if the agent's end has not) and returns its lines.
    pub fn stop(self) -> u64 {
        let Self {
            mut child,
            reader,
            lines,
        } = self;
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        lines.load(Ordering::Relaxed)
    }
}
