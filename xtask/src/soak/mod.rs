//! `cargo xtask soak --minutes N`: the agent under churn, with traffic the
//! whole time. Allowed and denied datagrams in step (`testbed::steady`)
//! and out-of-range return traffic cross a veth pair whose server end the
//! agent filters; the rules file is rewritten every second, rotating
//! through sets of a few rules, a thousand and 100,000 prefixes; the
//! interface is deleted and re-created every 30 s; the agent is killed
//! with SIGKILL and started again every minute; `stats`, /metrics and
//! `watch` are read throughout. At the end it asserts what the agent
//! promises (see [`report::verdict`]) and prints the figures.

mod life;
mod observe;
mod report;
mod rules;

use std::{
    fs,
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use testbed::{
    Pair,
    steady::{Steady, Tally},
};

use crate::{package, util::workspace_root};
use life::{Agent, LifeReport};
use observe::BpfObjects;

const RELOAD_EVERY: Duration = Duration::from_secs(1);
const RELINK_EVERY: Duration = Duration::from_secs(30);
const RESTART_EVERY: Duration = Duration::from_secs(60);
/// How long a change may take to show: the 100,000-prefix set compiles
/// in well under a second, but this machine may be busy.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// RSS growth over one agent's life that fails the soak.
const RSS_GROWTH_LIMIT: f64 = 0.05;

/// Runs the soak for `minutes`; Ctrl-C ends it early (and still checks).
pub fn run(minutes: f64) -> anyhow::Result<()> {
    // The binary the packages ship (static, musl's allocator).
    let binary = package::host_binary()?;
    let (interrupt, interrupted) = mpsc::channel();
    // Held until the end, so that the channel stays open (its timeout
    // paces the soak) even when the handler below is not installed.
    let _paced = interrupt.clone();
    // Fails only when another task of this run has one: Ctrl-C then does
    // what that one says.
    let _ = ctrlc::set_handler(move || {
        let _ = interrupt.send(());
    });
    let at_start = BpfObjects::count()?;
    let mut soak = Soak::start(binary.to_str().context("a non-UTF-8 path")?)?;
    let churned = soak.churn(Duration::from_secs_f64(minutes * 60.0), &interrupted);
    let verdict = soak.finish(at_start);
    churned.and(verdict)
}

struct Soak {
    binary: String,
    dir: PathBuf,
    pair: Pair,
    traffic: Steady,
    /// None only between a kill and the next start.
    agent: Option<Agent>,
    lives: Vec<LifeReport>,
    step: u64,
    generation: u64,
    relinks: u32,
    restarts: u32,
    out_of_range: UdpSocket,
    out_of_range_sent: u64,
    scrapes: u64,
}

/// What the soak saw, for the report and the verdict.
struct Outcome {
    tally: Tally,
    guard_counted: u64,
    at_start: BpfObjects,
    at_end: anyhow::Result<BpfObjects>,
}

impl Soak {
    fn start(binary: &str) -> anyhow::Result<Self> {
        let dir = workspace_root().join("target/soak");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        rules::write_set(&dir)?;
        rules::write(&dir, 0)?;
        let pair = Pair::create("soak")?;
        let agent = Agent::start(binary, &pair, &dir)?;
        let at = |port| SocketAddr::from((Pair::SERVER_V4, port));
        let traffic = Steady::start(
            &pair.client,
            &pair.server,
            at(rules::ALLOWED_PORT),
            at(rules::DENIED_PORT),
        )?;
        // Return traffic as from a DNS server, to a port outside the range.
        let out_of_range = pair
            .client
            .run(|| UdpSocket::bind((Pair::CLIENT_V4, 53)))??;
        Ok(Self {
            binary: binary.to_owned(),
            dir,
            pair,
            traffic,
            agent: Some(agent),
            lives: Vec::new(),
            step: 0,
            generation: 0,
            relinks: 0,
            restarts: 0,
            out_of_range,
            out_of_range_sent: 0,
            scrapes: 0,
        })
    }

    fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("an agent runs between restarts")
    }

    /// Reloads every second, re-creates the link and restarts the agent
    /// on their schedules, until `duration` or an interrupt.
    fn churn(
        &mut self,
        duration: Duration,
        interrupted: &mpsc::Receiver<()>,
    ) -> anyhow::Result<()> {
        let began = Instant::now();
        let (mut relink_at, mut restart_at) = (began + RELINK_EVERY, began + RESTART_EVERY);
        loop {
            let tick = Instant::now();
            self.reload()?;
            self.scrape()?;
            if Instant::now() >= restart_at {
                self.restart()?;
                restart_at += RESTART_EVERY;
            } else if Instant::now() >= relink_at {
                self.relink()?;
                relink_at += RELINK_EVERY;
            }
            if began.elapsed() >= duration {
                return Ok(());
            }
            // The next second's change, unless interrupted meanwhile.
            let left = RELOAD_EVERY.saturating_sub(tick.elapsed());
            if interrupted.recv_timeout(left).is_ok() {
                println!(
                    "soak: interrupted after {:.0} s",
                    began.elapsed().as_secs_f64()
                );
                return Ok(());
            }
        }
    }

    /// Writes the next step's rules and waits until the agent has them in
    /// force: a new generation, the step's marker rule among the rules.
    fn reload(&mut self) -> anyhow::Result<()> {
        self.step += 1;
        rules::write(&self.dir, self.step)?;
        let (binary, step, after) = (self.binary.clone(), self.step, self.generation);
        let iface = self.pair.server_if.clone();
        self.generation = self.agent().applied(&binary, &iface, step, after)?;
        self.agent().sample_if_small(step)
    }

    /// /metrics agrees with `stats` on the generation; one out-of-range
    /// return datagram more.
    fn scrape(&mut self) -> anyhow::Result<()> {
        let page = observe::metrics(&self.pair.server)?;
        let iface = [("iface", self.pair.server_if.as_str())];
        let shown = crate::vm::metric(&page, "filter_agent_rules_generation", &iface)
            .context("no generation in /metrics")?;
        ensure!(
            shown as u64 == self.generation,
            "/metrics says generation {shown}, stats said {}",
            self.generation
        );
        self.scrapes += 1;
        let to = SocketAddr::from((Pair::SERVER_V4, rules::OUT_OF_RANGE_PORT));
        self.out_of_range.send_to(b"reply", to)?;
        self.out_of_range_sent += 1;
        Ok(())
    }

    /// Deletes the veth pair and creates it again, traffic held meanwhile
    /// (a deleted interface carries nothing, and a new one is unfiltered
    /// until the agent attaches to it, within milliseconds).
    fn relink(&mut self) -> anyhow::Result<()> {
        self.traffic.pause();
        self.pair.delete_link()?;
        self.pair.add_link()?;
        life::attached_again(&self.pair)?;
        self.pair.wait_until_ready()?;
        self.traffic.resume();
        self.relinks += 1;
        Ok(())
    }

    /// SIGKILL, then a new agent, which takes the pinned filter over.
    fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(ended) = self.agent.take() {
            self.lives.push(ended.kill());
        }
        let agent = Agent::start(&self.binary, &self.pair, &self.dir)?;
        ensure!(
            agent.took_over(),
            "the new agent did not take over the pinned filter"
        );
        self.agent = Some(agent);
        self.restarts += 1;
        Ok(())
    }

    /// Stops traffic and the agent, detaches, and checks every promise.
    fn finish(mut self, at_start: BpfObjects) -> anyhow::Result<()> {
        let tally = self.traffic.stop();
        if let Some(agent) = self.agent.take() {
            self.lives.push(agent.stop()?);
        }
        let guard_counted = life::guard_out_of_range(&self.binary, &self.pair.server_if)?;
        life::detach(&self.binary, &self.pair.server_if)?;
        let outcome = Outcome {
            tally,
            guard_counted,
            at_start,
            at_end: life::objects_back(at_start),
        };
        report::print(&self, &outcome);
        report::verdict(&self, &outcome)
    }
}
