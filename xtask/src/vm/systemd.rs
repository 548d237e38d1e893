//! What `cargo xtask vm-test` proves in a real Debian 12 with systemd as
//! PID 1: the Debian package installed with apt, named interfaces in
//! /etc/default, enabled and rebooted into, the escape hatch, traffic,
//! then every promise of the unit and the package (`unit.rs`), checked
//! from outside: traffic through the virtio NIC and veth, systemd's own
//! view, the kernel's state. On Debian 11 and 13, the package's lifecycle.

use std::time::Instant;

use anyhow::{Context as _, ensure};

use super::{
    Report,
    observe::{counted, host_get, peer_get},
    qemu::Vm,
    unit::{Prober, bad_reload, purge, refused, reload, remove, restart, security, stop, watchdog},
    upgrade,
};

pub(super) const RULES: &str = "/etc/filter-agent/rules.toml";
pub(super) const DEFAULTS: &str = "/etc/default/filter-agent";

/// The packages the checks install: this version, the previous release,
/// then a later version of this one.
pub struct Packages {
    pub current: String,
    pub upgrade: String,
    pub previous: String,
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
        "apt downgrade to the previous release: works, no moment unfiltered",
        upgrade::downgrade(vm, &packages.previous),
    );
    report.record(
        "apt upgrade from the previous release across pin layouts: nothing denied passes, nothing allowed lost, counts carried",
        upgrade::upgrade(vm, &packages.upgrade),
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
pub(super) fn apt(vm: &mut Vm, args: &str) -> anyhow::Result<String> {
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
pub(super) fn show(vm: &mut Vm, properties: &[&str]) -> anyhow::Result<Vec<String>> {
    Ok(values(&vm.ok(&show_command(properties))?, properties))
}

/// The unit's one `property`.
pub(super) fn show_one(vm: &mut Vm, property: &str) -> anyhow::Result<String> {
    Ok(show(vm, &[property])?.remove(0))
}

pub(super) fn show_command(properties: &[&str]) -> String {
    format!("systemctl show filter-agent -p {}", properties.join(" -p "))
}

/// The values of `properties` in `systemctl show`'s `Name=value` lines
/// (which come in systemd's order, not the asked one); empty if missing.
pub(super) fn values(shown: &str, properties: &[&str]) -> Vec<String> {
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
