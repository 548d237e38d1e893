//! What `cargo xtask vm-test` proves in a real Debian 12 with systemd as
//! PID 1: the Debian package installed with apt, named interfaces in
//! /etc/default, enabled and rebooted into, then every promise of the
//! unit (reload, a rejected reload, restart, stop, the watchdog, bounded
//! retries on a kernel that refuses the program, hardening) and of the
//! package (upgrade in place, remove, purge), checked from outside: traffic
//! through the virtio NIC and veth, systemd's own view, the kernel's state.

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
    Report,
    checks::{counted, host_get, http_get, peer_get, reloads, wait_for_9000},
    qemu::Vm,
};

const RULES: &str = "/etc/filter-agent/rules.toml";
const DEFAULTS: &str = "/etc/default/filter-agent";
const WAIT: Duration = Duration::from_secs(30);
/// WatchdogSec= (30 s) and RestartSec= (5 s) of the unit, with room.
const WATCHDOG_WAIT: Duration = Duration::from_secs(90);

/// The packages the checks install: this version, then a later one.
pub struct Packages {
    pub current: String,
    pub upgrade: String,
}

/// Runs every check in `vm`, recording one line each in `report`.
pub fn run(vm: &mut Vm, packages: &Packages, report: &mut Report) {
    let Some(nic) = installed_and_rebooted(vm, packages, report) else {
        return;
    };
    report.record(
        "escape hatch: a boot with filter-agent.off runs no filter",
        escape_hatch(vm, &nic),
    );
    traffic_checks(vm, &nic, report);
    report.record(
        "lvs-dr on a real IPVS director: UFW loses FINs, RSTs, PMTU; filter-agent does not",
        lvs_dr(vm),
    );
    reload_checks(vm, report);
    report.record("systemctl restart: no gap", restart(vm));
    report.record("watchdog: a hung agent is restarted", watchdog(vm));
    report.record("systemctl stop: the filter stays", stop(vm, &nic));
    report.record("refused program: bounded retries, says why", refused(vm));
    report.record("hardening: systemd-analyze security", security(vm));
    report.record(
        "apt upgrade in place: no moment unfiltered",
        upgrade(vm, &packages.upgrade),
    );
    report.record(
        "apt remove: stopped, filter detached, says so",
        remove(vm, &nic),
    );
    report.record("apt purge: configuration gone", purge(vm));
}

/// The package's lifecycle, on the Debian releases other than 12: the
/// same checks of install, boot, traffic, reload, stop, remove and purge.
pub fn lifecycle(vm: &mut Vm, packages: &Packages, report: &mut Report) {
    let Some(nic) = installed_and_rebooted(vm, packages, report) else {
        return;
    };
    traffic_checks(vm, &nic, report);
    reload_checks(vm, report);
    report.record("systemctl stop: the filter stays", stop(vm, &nic));
    report.record(
        "apt remove: stopped, filter detached, says so",
        remove(vm, &nic),
    );
    report.record("apt purge: configuration gone", purge(vm));
}

/// Allowed and denied traffic on the NIC, then on veth as well.
fn traffic_checks(vm: &mut Vm, nic: &str, report: &mut Report) {
    report.record(
        "virtio NIC: allowed answers, denied does not, stats count",
        nic_traffic(vm, nic),
    );
    report.record(
        "veth in a namespace: allowed answers, denied does not",
        veth(vm, nic),
    );
}

/// A good reload, then a bad one (which leaves the original rules).
fn reload_checks(vm: &mut Vm, report: &mut Report) {
    report.record("systemctl reload: new rules, exit 0", reload(vm));
    report.record(
        "bad rules file: reload fails and says why, old rules stay",
        bad_reload(vm),
    );
}

/// Installs the package, configures and enables it as the README says,
/// and reboots into it; returns the NIC, or None when a step failed.
fn installed_and_rebooted(vm: &mut Vm, packages: &Packages, report: &mut Report) -> Option<String> {
    if !report.record("systemd as PID 1", pid1(vm)) {
        return None;
    }
    if !report.record("apt install ./filter-agent_*.deb", install(vm, packages)) {
        return None;
    }
    report.record(
        "start before naming an interface: one line says so",
        unconfigured(vm),
    );
    let nic = match configure(vm) {
        Ok(nic) => nic,
        Err(err) => {
            report.record("name the NIC, enforce rules, enable --now", Err(err));
            return None;
        }
    };
    report.record(
        "name the NIC, enforce rules, enable --now",
        Ok(format!(
            "{nic} in {DEFAULTS}, examples/rules.toml (enforce)"
        )),
    );
    report
        .record(
            "reboot: filtering before the NIC carries traffic",
            reboot(vm, &nic),
        )
        .then_some(nic)
}

fn pid1(vm: &mut Vm) -> anyhow::Result<String> {
    let state = vm.run("systemctl is-system-running --wait")?.output;
    ensure!(
        state.trim() == "running",
        "the system is {}: {}",
        state.trim(),
        vm.run("systemctl --failed --no-legend")?.output.trim()
    );
    let pid1 = vm.ok("readlink /proc/1/exe")?;
    ensure!(
        pid1.trim().ends_with("/systemd"),
        "PID 1 is {}",
        pid1.trim()
    );
    let version = vm.ok("systemctl --version | head -n1")?;
    let startup = vm.ok("systemd-analyze time | head -n1")?;
    Ok(format!(
        "{}, {}; `{}` at {:.1} s (TCG)",
        version.trim(),
        vm.ok("uname -r")?.trim(),
        startup.trim(),
        vm.boot_seconds
    ))
}

fn install(vm: &mut Vm, packages: &Packages) -> anyhow::Result<String> {
    let started = Instant::now();
    apt(vm, &format!("install /root/debs/{}", packages.current))?;
    let seconds = started.elapsed().as_secs_f64();
    let version = vm.ok("dpkg-query -W -f '${Version}' filter-agent")?;
    vm.ok(
        "test -x /usr/sbin/filter-agent && test -f /usr/share/man/man8/filter-agent.8.gz \
         && test -f /usr/share/bash-completion/completions/filter-agent \
         && grep -q '^mode = \"monitor\"' /etc/filter-agent/rules.toml",
    )?;
    let enabled = vm.run("systemctl is-enabled filter-agent")?.output;
    let active = vm.run("systemctl is-active filter-agent")?.output;
    ensure!(
        enabled.trim() == "disabled" && active.trim() == "inactive",
        "a fresh install is {} and {}: it must wait for the operator",
        enabled.trim(),
        active.trim()
    );
    Ok(format!(
        "{} in {seconds:.1} s; man page, completions, rules in monitor mode; disabled and inactive until configured",
        version.trim()
    ))
}

/// `apt-get -y ARGS`, failing with apt's output.
fn apt(vm: &mut Vm, args: &str) -> anyhow::Result<String> {
    vm.ok(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0 {args} 2>&1"
    ))
}

fn unconfigured(vm: &mut Vm) -> anyhow::Result<String> {
    let start = vm.run("systemctl start filter-agent")?;
    ensure!(start.rc != 0, "the unit started with no interface named");
    let said = vm.ok("journalctl -u filter-agent -o cat --no-pager | grep '^error:'")?;
    let restarts = show_one(vm, "NRestarts")?;
    vm.ok("systemctl stop filter-agent; systemctl reset-failed filter-agent")?;
    let lines: Vec<&str> = said.lines().collect();
    ensure!(
        lines.len() == 1 && lines[0].contains("FILTER_AGENT_IFACES"),
        "expected one error line naming FILTER_AGENT_IFACES: {said}"
    );
    ensure!(
        restarts == "0",
        "a command-line error was retried {restarts} times"
    );
    Ok(format!("not retried; {}", lines[0]))
}

/// Names the NIC in the defaults file, installs enforcing rules, enables
/// and starts the unit, as the README tells the operator; returns the NIC.
fn configure(vm: &mut Vm) -> anyhow::Result<String> {
    let nic = vm.ok("ls /sys/class/net | grep '^en'")?;
    let nic = nic.trim().to_owned();
    ensure!(
        !nic.is_empty() && !nic.contains('\n'),
        "not one NIC: {nic:?}"
    );
    vm.ok(&format!(
        "sed -i 's/^FILTER_AGENT_IFACES=.*/FILTER_AGENT_IFACES=\"{nic}\"/' {DEFAULTS} \
         && cp /vm/rules.toml {RULES} && filter-agent check --rules {RULES} \
         && systemctl enable --now filter-agent"
    ))?;
    Ok(nic)
}

fn reboot(vm: &mut Vm, nic: &str) -> anyhow::Result<String> {
    let prober = Prober::start(vm.forwards[1]);
    let seconds = vm.reboot()?;
    vm.ok("systemctl is-system-running --wait")?;
    let (attempts, answered) = prober.stop();
    ensure!(
        answered == 0,
        "{answered} of {attempts} connections to the denied port were answered during the boot"
    );
    let journal =
        vm.ok("journalctl -b -o short-monotonic --no-pager -u filter-agent -u systemd-networkd")?;
    let attached = monotonic(&journal, &format!("filter attached iface={nic}"))?;
    let up = monotonic(&journal, &format!("{nic}: Link UP"))?;
    ensure!(
        attached < up,
        "{nic} was up at {up:.2} s, the filter attached at {attached:.2} s: {:.2} s unfiltered",
        attached - up
    );
    let one_timestamp = journal
        .lines()
        .find(|line| line.contains("filter attached"))
        .and_then(|line| line.split_once("]: "))
        .is_some_and(|(_, message)| !message.starts_with("20"));
    ensure!(
        one_timestamp,
        "the agent's lines carry their own timestamp:\n{journal}"
    );
    let state = show(vm, &["Type", "ActiveState", "SubState", "StatusText"])?;
    ensure!(
        state == ["notify", "active", "running", &format!("filtering {nic}")],
        "the unit is not active (running) through READY: {state:?}"
    );
    Ok(format!(
        "rebooted in {seconds:.1} s; attached at {attached:.2} s, {nic} up at {up:.2} s (0 s unfiltered); \
         {attempts} connections to :9000 during the boot, 0 answered; READY, status `filtering {nic}`, one timestamp per line"
    ))
}

/// The recovery path for an operator at the console: `filter-agent.off`
/// on the kernel's command line boots without the filter (the unit's
/// condition); the next boot without it filters again.
fn escape_hatch(vm: &mut Vm, nic: &str) -> anyhow::Result<String> {
    let seconds = vm.boot_again("filter-agent.off")?;
    vm.run("systemctl is-system-running --wait")?;
    let state = show(vm, &["ActiveState", "ConditionResult"])?;
    ensure!(
        state == ["inactive", "no"],
        "with filter-agent.off the unit is {state:?}, not skipped by its condition"
    );
    let xdp = vm.run(&format!("ip -d link show {nic} | grep -o 'prog/xdp'"))?;
    ensure!(
        xdp.rc != 0,
        "with filter-agent.off {nic} still has an XDP program"
    );
    ensure!(
        host_get(vm.forwards[1]),
        "with filter-agent.off the NIC's :9000 is not answered"
    );
    vm.boot_again("")?;
    vm.run("systemctl is-system-running --wait")?;
    ensure!(
        show_one(vm, "ActiveState")? == "active",
        "after a normal boot the unit is not active again"
    );
    ensure!(
        !host_get(vm.forwards[1]),
        "after a normal boot the NIC's :9000 is answered"
    );
    Ok(format!(
        "booted with filter-agent.off in {seconds:.1} s: unit skipped (condition), no XDP on {nic}, \
         :9000 answered; a normal boot filters again"
    ))
}

/// The monotonic seconds of the first journal line containing `text`.
fn monotonic(journal: &str, text: &str) -> anyhow::Result<f64> {
    journal
        .lines()
        .find(|line| line.contains(text))
        .and_then(|line| {
            line.strip_prefix('[')?
                .split(']')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no journal line with `{text}`:\n{journal}"))
}

/// The unit's `properties`, in that order.
fn show(vm: &mut Vm, properties: &[&str]) -> anyhow::Result<Vec<String>> {
    Ok(values(&vm.ok(&show_command(properties))?, properties))
}

/// The unit's one `property`.
fn show_one(vm: &mut Vm, property: &str) -> anyhow::Result<String> {
    Ok(show(vm, &[property])?.remove(0))
}

fn show_command(properties: &[&str]) -> String {
    format!("systemctl show filter-agent -p {}", properties.join(" -p "))
}

/// The values of `properties` in `systemctl show`'s `Name=value` lines
/// (which come in systemd's order, not the asked one); empty if missing.
fn values(shown: &str, properties: &[&str]) -> Vec<String> {
    properties
        .iter()
        .map(|property| {
            shown
                .lines()
                .find_map(|line| line.strip_prefix(property)?.strip_prefix('='))
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

fn nic_traffic(vm: &mut Vm, nic: &str) -> anyhow::Result<String> {
    let [allowed, denied, _] = vm.forwards;
    ensure!(host_get(allowed), "the NIC's :8080 (allowed) got no answer");
    ensure!(!host_get(denied), "the NIC's :9000 (denied) was answered");
    let mode = vm.ok(&format!(
        "journalctl -b -u filter-agent -o cat | grep -m1 'filter attached iface={nic}'"
    ))?;
    ensure!(
        mode.contains("mode=\"native\""),
        "the NIC is not in native XDP: {mode}"
    );
    Ok(format!("native XDP; {}", counted_text(vm, nic)?))
}

/// What `stats` and `/metrics` counted on `iface` (both must count).
fn counted_text(vm: &mut Vm, iface: &str) -> anyhow::Result<String> {
    let (web, denied) = counted(vm, iface)?;
    Ok(format!(
        "stats and /metrics: web {web}, default_deny {denied}"
    ))
}

fn veth(vm: &mut Vm, nic: &str) -> anyhow::Result<String> {
    vm.ok(&format!(
        "/vm/veth.sh && sed -i 's/^FILTER_AGENT_IFACES=.*/FILTER_AGENT_IFACES=\"{nic},fa0\"/' {DEFAULTS} \
         && systemctl restart filter-agent"
    ))?;
    ensure!(
        peer_get(vm, 8080)?,
        "peer -> fa0 :8080 (allowed) got no answer"
    );
    ensure!(
        !peer_get(vm, 9000)?,
        "peer -> fa0 :9000 (denied) was answered"
    );
    Ok(format!(
        "peer -> fa0 :8080 answered, :9000 not; {}",
        counted_text(vm, "fa0")?
    ))
}

/// `cargo xtask scenario lvs-dr` on Debian's kernel, which has IPVS: the
/// real director (`scenarios/src/lvs_dr/ipvs.rs`) with the agent the
/// package installed. The figures are the scenario's own lines.
fn lvs_dr(vm: &mut Vm) -> anyhow::Result<String> {
    let output = vm.ok("/vm/fa-scenario lvs-dr /usr/sbin/filter-agent 2>&1")?;
    // The scenario's own narrative, as `cargo xtask scenario` prints it.
    for line in output.lines() {
        println!("      | {line}");
    }
    let figures: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|line| {
            line.contains("transfers complete")
                || line.starts_with("far client")
                || line.starts_with("director:")
        })
        .collect();
    ensure!(
        output.contains("lvs-dr: reproduced"),
        "the scenario did not end as it should: {}",
        output.trim()
    );
    Ok(figures.join(" | "))
}

/// Installs `/vm/FILE` as the rules (by rename, as editors do).
fn put_rules(vm: &mut Vm, file: &str) -> anyhow::Result<()> {
    vm.ok(&format!(
        "cp /vm/{file} {RULES}.new && mv {RULES}.new {RULES}"
    ))?;
    Ok(())
}

fn reload(vm: &mut Vm) -> anyhow::Result<String> {
    let before = reloads(vm, "success")?;
    put_rules(vm, "rules-9000.toml")?;
    vm.ok("systemctl reload filter-agent")?;
    wait_for_9000(vm, true)?;
    let after = reloads(vm, "success")?;
    ensure!(
        after > before,
        "reloads_total{{result=\"success\"}} stayed {before}"
    );
    Ok(format!(
        "exit 0; :9000 now answered; reloads_total{{result=\"success\"}} {before} -> {after}"
    ))
}

fn bad_reload(vm: &mut Vm) -> anyhow::Result<String> {
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
fn without_gap<T>(
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

fn restart(vm: &mut Vm) -> anyhow::Result<String> {
    let (attempts, ()) = without_gap(vm, |vm| vm.ok("systemctl restart filter-agent").map(drop))?;
    Ok(format!(
        "{attempts} connections to :9000 during it, 0 answered; both pinned filters taken over"
    ))
}

fn watchdog(vm: &mut Vm) -> anyhow::Result<String> {
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

fn stop(vm: &mut Vm, nic: &str) -> anyhow::Result<String> {
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

fn refused(vm: &mut Vm) -> anyhow::Result<String> {
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

fn security(vm: &mut Vm) -> anyhow::Result<String> {
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

fn upgrade(vm: &mut Vm, package: &str) -> anyhow::Result<String> {
    let (attempts, ()) = without_gap(vm, |vm| {
        apt(vm, &format!("install /root/debs/{package}")).map(drop)
    })?;
    let version = vm.ok("dpkg-query -W -f '${Version}' filter-agent")?;
    ensure!(
        package.contains(version.trim()),
        "installed {} after upgrading to {package}",
        version.trim()
    );
    ensure!(
        show_one(vm, "ActiveState")? == "active",
        "the unit is not active after the upgrade"
    );
    Ok(format!(
        "{} running; {attempts} connections to :9000 during the upgrade, 0 answered; both pins taken over",
        version.trim()
    ))
}

fn remove(vm: &mut Vm, nic: &str) -> anyhow::Result<String> {
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

fn purge(vm: &mut Vm) -> anyhow::Result<String> {
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
struct Prober {
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicU32>,
    answered: Arc<AtomicU32>,
    threads: Vec<JoinHandle<()>>,
}

impl Prober {
    const THREADS: usize = 3;
    /// Long enough for an answer through qemu's user network under TCG.
    const TIMEOUT: Duration = Duration::from_millis(700);

    fn start(port: u16) -> Self {
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

    fn stop(self) -> (u32, u32) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_monotonic_journal_times() {
        let journal = "[    5.103021] vm systemd-networkd[201]: enp0s2: Link UP\n\
                       [    4.870114] vm filter-agent[190]:  INFO filter attached iface=enp0s2";
        assert_eq!(monotonic(journal, "enp0s2: Link UP").unwrap(), 5.103021);
        assert_eq!(
            monotonic(journal, "filter attached iface=enp0s2").unwrap(),
            4.870114
        );
        assert!(monotonic(journal, "nothing").is_err());
    }

    #[test]
    fn reads_properties_in_the_asked_order() {
        let shown = "Type=notify\nStatusText=filtering a=b\nActiveState=active\n";
        assert_eq!(
            values(shown, &["ActiveState", "StatusText", "Type", "Result"]),
            ["active", "filtering a=b", "notify", ""]
        );
    }
}
