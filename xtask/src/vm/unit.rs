//! The systemd guest's checks of the running unit and of the package after
//! the first boot: reload and a rejected reload, restart without a gap, the
//! watchdog, stop, bounded retries on a kernel that refuses the program,
//! hardening, remove and purge.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::{
    observe::{METRICS, WAIT, host_get, http_get, peer_get, reloads, reloads_in, wait_for_9000},
    qemu::Vm,
    systemd::{DEFAULTS, RULES, apt, show_command, show_one, values},
};

/// WatchdogSec= (30 s) and RestartSec= (5 s) of the unit, with room.
const WATCHDOG_WAIT: Duration = Duration::from_secs(90);

/// Installs `/vm/FILE` as the rules (by rename, as editors do).
fn put_rules(vm: &mut Vm, file: &str) -> anyhow::Result<()> {
    vm.ok(&format!(
        "cp /vm/{file} {RULES}.new && mv {RULES}.new {RULES}"
    ))?;
    Ok(())
}

pub(super) fn reload(vm: &mut Vm) -> anyhow::Result<String> {
    let before = reloads(vm, "success")?;
    put_rules(vm, "rules-9000.toml")?;
    vm.ok("systemctl reload filter-agent")?;
    wait_for_9000(vm, true)?;
    // The agent counts a reload once the kernel has the new rules, so the
    // counter can trail the traffic that shows them by a moment.
    let counted = vm.wait_until(
        &format!("reloads_total{{result=\"success\"}} above {before}"),
        WAIT,
        METRICS,
        |answer| reloads_in(&answer.output, "success") > before,
    )?;
    let after = reloads_in(&counted, "success");
    Ok(format!(
        "exit 0; :9000 now answered; reloads_total{{result=\"success\"}} {before} -> {after}"
    ))
}

pub(super) fn bad_reload(vm: &mut Vm) -> anyhow::Result<String> {
    put_rules(vm, "rules-bad.toml")?;
    let reload = vm.run("systemctl reload filter-agent")?;
    ensure!(reload.rc != 0, "`systemctl reload` of a bad file exited 0");
    // The agent also saw the file change by itself, and says so in its status.
    let status = vm.wait_until(
        "the unit's status naming the rejected reload",
        WAIT,
        &show_command(&["StatusText"]),
        |answer| answer.output.contains("reload rejected"),
    )?;
    let shown = vm
        .run("systemctl status filter-agent --no-pager -n 20")?
        .output;
    let why = shown
        .lines()
        .find(|line| line.contains("error: /etc/filter-agent/rules.toml:"))
        .with_context(|| format!("`systemctl status` does not say what is wrong:\n{shown}"))?;
    ensure!(
        show_one(vm, "ActiveState")? == "active",
        "the unit stopped after a bad reload"
    );
    ensure!(
        peer_get(vm, 9000)?,
        "after a rejected reload, the previous rules (9000 allowed) are gone"
    );
    put_rules(vm, "rules.toml")?;
    vm.ok("systemctl reload filter-agent")?;
    wait_for_9000(vm, false)?;
    let back = show_one(vm, "StatusText")?;
    ensure!(
        !back.contains("rejected"),
        "after a good reload the status still says: {back}"
    );
    Ok(format!(
        "exit {}; status `{}`; `systemctl status` shows `{}`; old rules kept",
        reload.rc,
        status.trim().trim_start_matches("StatusText="),
        why.split("]: ").last().unwrap_or(why).trim()
    ))
}

/// Runs `action` with the NIC's denied port probed from the host all
/// through it; fails if the agent's pid did not change or a probe was
/// answered. Returns the probes and `action`'s result.
pub(super) fn without_gap<T>(
    vm: &mut Vm,
    action: impl FnOnce(&mut Vm) -> anyhow::Result<T>,
) -> anyhow::Result<(u32, T)> {
    let pid = show_one(vm, "MainPID")?;
    let prober = Prober::start(vm.forwards[1]);
    let result = action(vm);
    let (attempts, answered) = prober.stop();
    let result = result?;
    ensure!(
        answered == 0,
        "{answered} of {attempts} connections to the denied port were answered"
    );
    let new_pid = show_one(vm, "MainPID")?;
    ensure!(
        new_pid != pid && new_pid != "0",
        "the agent was not replaced (pid {pid} -> {new_pid})"
    );
    // The new agent's own lines (a time bound would also take in the
    // previous start's when they share a second).
    let adopted = vm.ok(&format!(
        "journalctl _PID={new_pid} -o cat | grep -c 'took over the pinned filter' || true"
    ))?;
    ensure!(
        adopted.trim() == "2",
        "the new agent took over {} of 2 pinned filters",
        adopted.trim()
    );
    Ok((attempts, result))
}

pub(super) fn restart(vm: &mut Vm) -> anyhow::Result<String> {
    let (attempts, ()) = without_gap(vm, |vm| vm.ok("systemctl restart filter-agent").map(drop))?;
    Ok(format!(
        "{attempts} connections to :9000 during it, 0 answered; both pinned filters taken over"
    ))
}

pub(super) fn watchdog(vm: &mut Vm) -> anyhow::Result<String> {
    let (attempts, seconds) = without_gap(vm, |vm| {
        let started = Instant::now();
        let pid = show_one(vm, "MainPID")?;
        vm.ok(&format!("kill -STOP {pid}"))?;
        let properties = ["MainPID", "SubState"];
        vm.wait_until(
            "systemd's restart of the stopped agent",
            WATCHDOG_WAIT,
            &show_command(&properties),
            |answer| {
                let [new_pid, state] = &values(&answer.output, &properties)[..] else {
                    return false;
                };
                *new_pid != pid && new_pid != "0" && state == "running"
            },
        )?;
        Ok(started.elapsed().as_secs_f64())
    })?;
    let logged = vm.ok("journalctl -u filter-agent -o cat | grep -m1 -i 'watchdog timeout'")?;
    Ok(format!(
        "`{}`; running again after {seconds:.0} s; {attempts} connections to :9000 meanwhile, 0 answered",
        logged.trim()
    ))
}

pub(super) fn stop(vm: &mut Vm, nic: &str) -> anyhow::Result<String> {
    vm.ok("systemctl stop filter-agent")?;
    ensure!(
        show_one(vm, "ActiveState")? == "inactive",
        "the unit is still active"
    );
    vm.ok(&format!(
        "test -e /sys/fs/bpf/filter-agent/{nic}/xdp_link && test -e /sys/fs/bpf/filter-agent/fa0/xdp_link"
    ))?;
    ensure!(
        !host_get(vm.forwards[1]),
        "with the unit stopped, the NIC's :9000 is answered"
    );
    ensure!(
        !peer_get(vm, 9000)?,
        "with the unit stopped, fa0's :9000 is answered"
    );
    vm.ok("systemctl start filter-agent")?;
    Ok("inactive; pins stay, :9000 still denied on both interfaces; started again".into())
}

pub(super) fn refused(vm: &mut Vm) -> anyhow::Result<String> {
    // As on a kernel that refuses the program: the same unit, the object
    // the verifier rejects.
    const DROP_IN: &str = "/run/systemd/system/filter-agent.service.d/refused.conf";
    let since = vm.ok(&format!(
        "mkdir -p $(dirname {DROP_IN}) && \
         printf '[Service]\\nEnvironment=FILTER_AGENT_BPF_OBJECT=/vm/refused.o\\n' > {DROP_IN} && \
         systemctl daemon-reload && systemctl reset-failed filter-agent && date +%s"
    ))?;
    let started = Instant::now();
    let outcome = given_up(vm, since.trim()).map(|()| started.elapsed().as_secs_f64());
    let journal = vm.ok(&format!(
        "journalctl -u filter-agent --since @{} -o cat",
        since.trim()
    ))?;
    let denied = !peer_get(vm, 9000)? && !host_get(vm.forwards[1]);
    // Whatever happened, the next checks start from a running agent.
    vm.ok(&format!(
        "rm {DROP_IN} && systemctl daemon-reload && systemctl reset-failed filter-agent \
         && systemctl start filter-agent"
    ))?;
    let seconds = outcome.with_context(|| format!("the unit's journal:\n{journal}"))?;
    ensure!(denied, "with the agent failed, :9000 is answered");
    let refusals: Vec<&str> = journal
        .lines()
        .filter(|line| line.contains("refused the program"))
        .collect();
    ensure!(
        (1..=3).contains(&refusals.len()),
        "{} attempts (StartLimitBurst=3):\n{journal}",
        refusals.len()
    );
    Ok(format!(
        "{} attempts in {seconds:.0} s, then failed (start request repeated too quickly); the old filter stayed; `{}`",
        refusals.len(),
        refusals[0].chars().take(120).collect::<String>()
    ))
}

/// Restarts the unit, which must fail, and waits until systemd stops
/// retrying it (systemd 252 keeps the last attempt's result, `exit-code`,
/// and says why it stopped in the journal).
fn given_up(vm: &mut Vm, since: &str) -> anyhow::Result<()> {
    let restart = vm.run("systemctl restart filter-agent")?;
    ensure!(restart.rc != 0, "the agent started with a refused program");
    vm.wait_until(
        "systemd giving up on the refused program",
        Duration::from_secs(60),
        &format!("journalctl -u filter-agent --since @{since} -o cat | grep 'Start request repeated too quickly'"),
        |answer| answer.rc == 0,
    )?;
    ensure!(
        show_one(vm, "ActiveState")? == "failed",
        "the unit is not failed"
    );
    Ok(())
}

pub(super) fn security(vm: &mut Vm) -> anyhow::Result<String> {
    let report = vm.ok("systemd-analyze security filter-agent.service --no-pager")?;
    let overall = report
        .lines()
        .find(|line| line.contains("Overall exposure level"))
        .with_context(|| format!("no overall exposure level:\n{report}"))?;
    let level: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("cannot read the level in `{overall}`"))?;
    ensure!(level <= 3.0, "{}", overall.trim());
    Ok(overall
        .trim_start_matches(|c: char| !c.is_alphanumeric())
        .to_owned())
}

pub(super) fn remove(vm: &mut Vm, nic: &str) -> anyhow::Result<String> {
    let said = apt(vm, "remove filter-agent")?;
    let detached: Vec<&str> = said
        .lines()
        .filter(|line| line.contains("detached the filter from"))
        .collect();
    ensure!(detached.len() == 2, "apt remove said:\n{said}");
    ensure!(
        show_one(vm, "ActiveState")? == "inactive",
        "the unit still runs"
    );
    vm.wait_until(
        "the kernel free of the agent's programs",
        WAIT,
        &format!(
            "ls -A /sys/fs/bpf/filter-agent 2>/dev/null; ip -d link show {nic} | grep -o 'prog/xdp.*'; \
             bpftool prog show | grep -E 'name (filter|guard_egress) '"
        ),
        |answer| answer.output.trim().is_empty(),
    )?;
    ensure!(
        host_get(vm.forwards[1]),
        "after remove, the NIC's :9000 is still denied"
    );
    vm.ok(&format!("test -f {RULES}"))?;
    Ok(format!(
        "`{}`; no pins, XDP or programs left; :9000 answered again; {RULES} kept",
        detached.join("`, `")
    ))
}

pub(super) fn purge(vm: &mut Vm) -> anyhow::Result<String> {
    apt(vm, "purge filter-agent")?;
    let left = vm.run(&format!(
        "ls -d /etc/filter-agent {DEFAULTS} /usr/sbin/filter-agent 2>/dev/null; dpkg-query -W -f '${{Status}}' filter-agent"
    ))?;
    ensure!(
        !left.output.contains('/'),
        "after purge: {}",
        left.output.trim()
    );
    Ok("/etc/filter-agent and /etc/default/filter-agent removed, package gone".into())
}

/// Connections to a forwarded port from the host, one after the other
/// on a few threads, until stopped: how many, and how many were answered.
pub(super) struct Prober {
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicU32>,
    answered: Arc<AtomicU32>,
    threads: Vec<JoinHandle<()>>,
}

impl Prober {
    const THREADS: usize = 3;
    /// Long enough for an answer through qemu's user network under TCG.
    const TIMEOUT: Duration = Duration::from_millis(700);

    pub(super) fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicU32::new(0));
        let answered = Arc::new(AtomicU32::new(0));
        let threads = (0..Self::THREADS)
            .map(|_| {
                let (stop, attempts, answered) = (stop.clone(), attempts.clone(), answered.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        if http_get(port, Self::TIMEOUT) {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            attempts,
            answered,
            threads,
        }
    }

    pub(super) fn stop(self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        (
            self.attempts.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed),
        )
    }
}
