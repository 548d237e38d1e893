//! One agent's life in the soak, from start to SIGKILL (or the final
//! stop): its process, its `watch`, and its descriptors and memory sampled
//! each time the smallest rule set comes round, so that samples compare
//! like with like.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail, ensure};
use testbed::{Daemon, Pair, within};

use super::{
    DEADLINE,
    observe::{BpfObjects, Stats, Usage, Watch},
    rules,
};

/// How long descriptors a reload let go may take to close.
const SETTLE: Duration = Duration::from_secs(2);

/// The agent of one life.
pub struct Agent {
    daemon: Daemon,
    watch: Watch,
    pid: u32,
    /// The first sample after the life's warm-up, and the last.
    warm: Option<Usage>,
    last: Option<Usage>,
    /// Small rule sets seen in force: the first is still warm-up (the
    /// 100,000-prefix set has not come round yet).
    small_sets: u32,
}

/// What one life showed.
#[derive(Clone, Debug)]
pub struct LifeReport {
    pub warm: Option<Usage>,
    pub last: Option<Usage>,
    pub watch_lines: u64,
}

impl LifeReport {
    pub fn rss_growth(&self) -> Option<f64> {
        let (warm, last) = (self.warm.as_ref()?, self.last.as_ref()?);
        Some((last.rss_kib as f64 - warm.rss_kib as f64) / warm.rss_kib as f64)
    }
}

impl Agent {
    /// Starts the agent on `pair`'s server end with the rules in `dir`;
    /// returns once it is ready.
    pub fn start(binary: &str, pair: &Pair, dir: &Path) -> anyhow::Result<Self> {
        let mut command = pair.server.command(binary);
        command
            .args(["--iface", &pair.server_if, "--rules"])
            .arg(dir.join("rules.toml"))
            .arg("--control-socket")
            .arg(dir.join("control.sock"));
        let mut daemon = Daemon::start(command, None)?;
        if daemon.wait_for("ready", DEADLINE).is_none() {
            bail!(
                "the agent was not ready within {DEADLINE:?}: {:?}",
                daemon.seen()
            );
        }
        let watch = Watch::start(binary, &pair.server_if)?;
        Ok(Self {
            pid: daemon.pid(),
            daemon,
            watch,
            warm: None,
            last: None,
            small_sets: 0,
        })
    }

    /// Whether it said it took the pinned filter over.
    pub fn took_over(&self) -> bool {
        self.daemon
            .seen()
            .iter()
            .any(|line| line.contains("took over the pinned filter"))
    }

    /// Waits until the rules of `step` are in force: the agent says so,
    /// and `stats` shows a generation above `after` and the step's marker.
    /// Returns the generation.
    pub fn applied(
        &mut self,
        binary: &str,
        iface: &str,
        step: u64,
        after: u64,
    ) -> anyhow::Result<u64> {
        let marker = rules::marker(step);
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            // A rename can be seen as two changes: look at each report.
            // "rules reloaded" ends the agent's work on one (its new file
            // watch in place).
            if self.daemon.wait_for("rules reloaded", left).is_none() {
                bail!(
                    "the rules of step {step} were never in force (generation stayed {after}): {:?}",
                    self.daemon.seen().iter().rev().take(5).collect::<Vec<_>>()
                );
            }
            let stats = Stats::read(binary, iface)?;
            if stats.generation > after && stats.rules.contains(&marker) {
                return Ok(stats.generation);
            }
        }
    }

    /// Samples descriptors and memory when step `step` has the smallest
    /// rule set in force, after the first such time in this life.
    pub fn sample_if_small(&mut self, step: u64) -> anyhow::Result<()> {
        if !rules::is_smallest(step) {
            return Ok(());
        }
        self.small_sets += 1;
        if self.small_sets < 2 {
            return Ok(());
        }
        let mut usage = Usage::of(self.pid)?;
        if let Some(warm) = &self.warm {
            // The file watch a reload replaced closes its descriptors on
            // its own thread, a moment later: a leak is what stays.
            within(SETTLE, || {
                usage = Usage::of(self.pid).unwrap_or_else(|_| usage.clone());
                warm.fds_grown(&usage).is_empty()
            });
        }
        self.warm.get_or_insert_with(|| usage.clone());
        self.last = Some(usage);
        Ok(())
    }

    /// SIGKILL, as an OOM killer or `kill -9` would.
    pub fn kill(self) -> LifeReport {
        self.daemon.signal(libc::SIGKILL);
        self.end()
    }

    /// The final stop (SIGINT): exit 0 expected.
    pub fn stop(self) -> anyhow::Result<LifeReport> {
        let watch_lines = self.watch.lines();
        let report = LifeReport {
            warm: self.warm,
            last: self.last,
            watch_lines,
        };
        let (status, seen) = self.daemon.stop();
        self.watch.stop();
        ensure!(
            status.is_some_and(|status| status.success()),
            "the agent's stop: {status:?}: {:?}",
            seen.iter().rev().take(5).collect::<Vec<_>>()
        );
        Ok(report)
    }

    fn end(self) -> LifeReport {
        drop(self.daemon);
        LifeReport {
            warm: self.warm,
            last: self.last,
            watch_lines: self.watch.stop(),
        }
    }
}

/// Waits until the re-created server end has the filter again.
pub fn attached_again(pair: &Pair) -> anyhow::Result<()> {
    let attached = within(DEADLINE, || {
        pair.server
            .ip(&["link", "show", "dev", &pair.server_if])
            .is_ok_and(|shown| String::from_utf8_lossy(&shown.stdout).contains("prog/xdp"))
    });
    ensure!(
        attached,
        "the re-created {} never got the filter",
        pair.server_if
    );
    Ok(())
}

/// `filter-agent detach`, then no pin left for the interface.
pub fn detach(binary: &str, iface: &str) -> anyhow::Result<()> {
    let output = Command::new(binary)
        .args(["detach", "--iface", iface])
        .output()?;
    ensure!(
        output.status.success(),
        "detach: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let pins = Path::new("/sys/fs/bpf/filter-agent").join(iface);
    ensure!(
        !pins.exists(),
        "{} still exists after detach",
        pins.display()
    );
    Ok(())
}

/// Waits for the kernel's BPF objects to be as many as `at_start` (their
/// release is deferred); the counts at the end.
pub fn objects_back(at_start: BpfObjects) -> anyhow::Result<BpfObjects> {
    let mut now = BpfObjects::count()?;
    within(Duration::from_secs(10), || {
        now = BpfObjects::count().unwrap_or(now);
        now == at_start
    });
    ensure!(
        now == at_start,
        "BPF objects: {at_start} at the start, {now} at the end"
    );
    Ok(now)
}

/// Out-of-range return packets the guard counted on `iface` (pinned).
pub fn guard_out_of_range(binary: &str, iface: &str) -> anyhow::Result<u64> {
    let output = Command::new(binary)
        .args(["guard", "--json", "--iface", iface])
        .output()?;
    ensure!(output.status.success(), "guard: {output:?}");
    let documents: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    documents[0]["counters"]["return_out_of_range"]["packets"]
        .as_u64()
        .with_context(|| format!("no return_out_of_range in {documents}"))
}
