//! What `cargo xtask vm-test` proves in each kernel, in one booted guest:
//! the agent started as the README says, on the virtio NIC (native XDP,
//! traffic from the host) and on veth in namespaces, and every promise
//! about counters, events, the guard, reloads, restarts, stopping,
//! detaching and failed starts.

use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use super::{
    Report,
    observe::{WAIT, counted, host_get, json_document, peer_get, reloads, wait_for_9000},
    qemu::Vm,
};

/// The README's command, on the NIC and on the veth link.
const START: &str = "filter-agent --iface eth0 --iface fa0 --rules /vm/rules.toml";
const AGENT_LOG: &str = "/tmp/agent.log";
const RESTART_LOG: &str = "/tmp/agent-2.log";

/// Runs every check in `vm`, recording one line each in `report`.
pub fn run(vm: &mut Vm, report: &mut Report) {
    // Without the topology nothing else means anything.
    let setup = vm
        .ok("/vm/setup.sh")
        .map(|_| "namespaces, veth, NAT, services".to_owned());
    if !report.record("guest network", setup) {
        return;
    }
    let baseline = vm.ok("/vm/snapshot.sh");
    report.record("unfiltered: every port answers", unfiltered(vm));
    report.record(
        "refused program: one-line error, nothing left behind",
        refused_program(vm, baseline.as_deref().unwrap_or_default()),
    );
    report.record(
        "failed attach on a 2nd interface: nothing left behind",
        failed_attach(vm, baseline.as_deref().unwrap_or_default()),
    );
    if !report.record("agent starts (README command)", start(vm, "", AGENT_LOG)) {
        return;
    }
    report.record(
        "virtio NIC: allowed answers, denied does not",
        nic_traffic(vm),
    );
    report.record("veth: allowed answers, denied does not", veth_traffic(vm));
    report.record("stats and /metrics count both", counters(vm));
    report.record("watch shows drop events", watch(vm));
    report.record(
        "guard: out-of-range return traffic (ingress)",
        guard_ingress(vm),
    );
    report.record(
        "guard: post-NAT connection attempts (egress)",
        guard_egress(vm),
    );
    report.record("audit flags the wide namespace", audit(vm));
    report.record("reload: good file applied, bad file rejected", reload(vm));
    report.record(
        "kill -9 and restart: pins adopted, no gap",
        kill_and_restart(vm),
    );
    report.record("program sizes", program_sizes(vm));
    report.record("stop: the filter stays (fail-static)", stop(vm));
    report.record(
        "detach: kernel state as before the agent",
        detach(vm, baseline.as_deref().unwrap_or_default()),
    );
}

fn unfiltered(vm: &mut Vm) -> anyhow::Result<String> {
    for port in [vm.forwards[0], vm.forwards[1]] {
        ensure!(
            host_get(port),
            "host port {port} does not answer before the agent runs"
        );
    }
    for port in [8080, 9000] {
        ensure!(
            peer_get(vm, port)?,
            "10.9.0.1:{port} does not answer from peer before the agent runs"
        );
    }
    Ok("the denied checks below can fail".into())
}

/// Starts the agent in the background with `env`, logging to `log`, and
/// waits for its `ready` line.
fn start(vm: &mut Vm, env: &str, log: &str) -> anyhow::Result<String> {
    let started = Instant::now();
    vm.ok(&format!(
        "{env} {START} > {log} 2>&1 & echo $! > /tmp/agent.pid"
    ))?;
    let text = vm.wait_until(
        "the agent's `ready` line",
        WAIT,
        &format!("cat {log}"),
        |answer| answer.output.contains("ready:") || answer.output.contains("error:"),
    )?;
    ensure!(
        !text.contains("error:"),
        "the agent failed: {}",
        text.trim()
    );
    let modes: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("filter attached"))
        .collect();
    for iface in ["eth0", "fa0"] {
        ensure!(
            modes
                .iter()
                .any(|line| line.contains(&format!("iface={iface}"))),
            "no attach line for {iface}: {text}"
        );
    }
    let fallback = text.contains("no TCX before Linux 6.6");
    Ok(format!(
        "{} in {:.1} s{}",
        attach_summary(&modes),
        started.elapsed().as_secs_f64(),
        if fallback {
            "; egress guard on a tc filter (no TCX)"
        } else {
            "; egress guard on TCX"
        }
    ))
}

fn attach_summary(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|line| {
            let iface = field(line, "iface=").unwrap_or("?");
            let mode = field(line, "mode=").unwrap_or("adopted");
            format!("{iface} {}", mode.trim_matches('"'))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()
}

/// The attached programs' instructions after the verifier's rewrites, JIT
/// sizes, and the instructions the verifier processed (the agent's debug
/// line; kernels before 5.16 do not count them).
fn program_sizes(vm: &mut Vm) -> anyhow::Result<String> {
    let programs: Value = serde_json::from_str(&vm.ok("bpftool prog show --json")?)?;
    let log = vm.ok(&format!("grep 'program verified' {RESTART_LOG}"))?;
    let mut sizes = Vec::new();
    for name in ["filter", "guard_egress"] {
        let program = programs
            .as_array()
            .into_iter()
            .flatten()
            .rfind(|program| program["name"] == name)
            .with_context(|| format!("no program {name} in bpftool prog show"))?;
        let xlated = program["bytes_xlated"].as_u64().unwrap_or(0) / 8;
        let jited = program["bytes_jited"].as_u64().unwrap_or(0);
        let verified = log
            .lines()
            .find(|line| line.contains(&format!("program=\"{name}\"")))
            .and_then(|line| field(line, "verified_insns="))
            .filter(|count| *count != "0")
            .unwrap_or("n/a");
        sizes.push(format!(
            "{name} {xlated} insns ({jited} B JIT), verifier processed {verified}"
        ));
    }
    Ok(sizes.join("; "))
}

fn nic_traffic(vm: &mut Vm) -> anyhow::Result<String> {
    let [allowed, denied, _] = vm.forwards;
    ensure!(
        host_get(allowed),
        "127.0.0.1:{allowed} -> guest :8080 (allowed) got no answer"
    );
    ensure!(
        !host_get(denied),
        "127.0.0.1:{denied} -> guest :9000 (denied) was answered"
    );
    Ok("host -> eth0 :8080 answered, :9000 not".into())
}

fn veth_traffic(vm: &mut Vm) -> anyhow::Result<String> {
    ensure!(
        peer_get(vm, 8080)?,
        "peer -> 10.9.0.1:8080 (allowed) got no answer"
    );
    ensure!(
        !peer_get(vm, 9000)?,
        "peer -> 10.9.0.1:9000 (denied) was answered"
    );
    ensure!(
        vm.run("ip netns exec peer ping -c 1 -W 5 10.9.0.1")?.rc == 0,
        "peer's ping (allowed) got no reply"
    );
    Ok("peer -> fa0 :8080 answered, :9000 not, ping answered".into())
}

fn counters(vm: &mut Vm) -> anyhow::Result<String> {
    let mut seen = Vec::new();
    for iface in ["eth0", "fa0"] {
        let (web, denied) = counted(vm, iface)?;
        seen.push(format!("{iface} web {web} deny {denied}"));
    }
    Ok(seen.join(", "))
}

fn watch(vm: &mut Vm) -> anyhow::Result<String> {
    vm.ok("filter-agent watch --iface fa0 > /tmp/watch.log 2>&1 & echo $! > /tmp/watch.pid")?;
    // Each try sends a denied SYN; the watcher shows it once it is connected.
    let line = vm.wait_until("a DROP line in `filter-agent watch`", WAIT, 
        "get_in peer 10.9.0.1 9000; grep -m1 'DROP tcp 10.9.0.2:.* -> 10.9.0.1:9000' /tmp/watch.log",
        |answer| answer.output.contains("DROP tcp"))?;
    vm.ok("kill $(cat /tmp/watch.pid)")?;
    Ok(line.lines().last().unwrap_or_default().trim().to_owned())
}

fn guard_report(vm: &mut Vm) -> anyhow::Result<Value> {
    json_document(&vm.ok("filter-agent guard --iface fa0 --json --top 50")?)
}

fn guard_ports(report: &Value, direction: &str) -> Vec<u64> {
    report["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|port| port["direction"] == direction)
        .filter_map(|port| port["port"].as_u64())
        .collect()
}

fn guard_ingress(vm: &mut Vm) -> anyhow::Result<String> {
    // The host's own connection from port 2000: its SYN-ACK is return
    // traffic outside 32768-60999 (and the rules drop it).
    vm.run(
        "sysctl -q -w net.ipv4.ip_local_port_range='2000 2001'; \
         get 10.9.0.2 8080; \
         sysctl -q -w net.ipv4.ip_local_port_range='32768 60999'",
    )?;
    let report = guard_report(vm)?;
    let ports = guard_ports(&report, "ingress");
    let out = report["counters"]["return_out_of_range"]["packets"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        out > 0 && ports.iter().any(|port| (2000..=2001).contains(port)),
        "return_out_of_range {out}, ingress ports {ports:?}"
    );
    Ok(format!(
        "{out} out-of-range replies, to local ports {ports:?}"
    ))
}

fn guard_egress(vm: &mut Vm) -> anyhow::Result<String> {
    // The "container" connects from its own (in-range) port; masquerade
    // moves it to 3000-3099, which only a post-NAT hook sees.
    vm.run("get_in ctr 10.9.0.2 8080")?;
    let report = guard_report(vm)?;
    let ports = guard_ports(&report, "egress");
    ensure!(
        ports.iter().any(|port| (3000..=3099).contains(port)),
        "no egress port in 3000-3099 (the post-NAT range): {ports:?}"
    );
    Ok(format!("egress out-of-range ports {ports:?}"))
}

fn audit(vm: &mut Vm) -> anyhow::Result<String> {
    let output = vm.run("filter-agent audit --rules /vm/rules.toml")?.output;
    let flagged = output
        .lines()
        .find(|line| line.starts_with("FLAGGED") && line.contains("wide"))
        .with_context(|| format!("the namespace `wide` (1024-65000) is not flagged:\n{output}"))?;
    Ok(flagged.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Replaces the rules file (by rename, as editors do) and waits for the
/// reload counter of `result` to move.
fn replace_rules(vm: &mut Vm, from: &str, result: &str) -> anyhow::Result<()> {
    let before = reloads(vm, result)?;
    vm.ok(&format!(
        "cp {from} /vm/rules.new && mv /vm/rules.new /vm/rules.toml"
    ))?;
    let end = Instant::now() + WAIT;
    while reloads(vm, result)? <= before {
        if Instant::now() > end {
            bail!("replacing the rules with {from} never counted a reload {result}");
        }
    }
    Ok(())
}

fn reload(vm: &mut Vm) -> anyhow::Result<String> {
    vm.ok("cp /vm/rules.toml /vm/rules-original.toml")?;
    // The counter says a reload happened; the traffic says which rules it
    // applied (a slow guest may count an earlier file's reload first).
    replace_rules(vm, "/vm/rules-9000.toml", "success")?;
    wait_for_9000(vm, true)?;
    replace_rules(vm, "/vm/rules-bad.toml", "failure")?;
    let logged = vm.ok(&format!("grep -c 'reload rejected' {AGENT_LOG}"))?;
    ensure!(
        peer_get(vm, 9000)?,
        "after a rejected reload, the previous rules (9000 allowed) are gone"
    );
    replace_rules(vm, "/vm/rules-original.toml", "success")?;
    wait_for_9000(vm, false)?;
    Ok(format!(
        "9000 opened, bad file rejected ({} log line) and old rules kept, 9000 closed again",
        logged.trim()
    ))
}

fn kill_and_restart(vm: &mut Vm) -> anyhow::Result<String> {
    // Denied connection attempts all through the kill and the restart.
    vm.ok(
        "rm -f /tmp/leak; (while :; do get_in peer 10.9.0.1 9000 | grep -q hello && echo leak >> /tmp/leak; done) \
         > /dev/null 2>&1 & echo $! > /tmp/prober.pid",
    )?;
    signal_agent(vm, "KILL")?;
    ensure!(
        !peer_get(vm, 9000)?,
        "with the agent killed, 9000 is answered"
    );
    ensure!(
        peer_get(vm, 8080)?,
        "with the agent killed, 8080 is not answered"
    );
    // At debug level, for the verifier's figures (`program sizes`).
    let restarted = start(vm, "RUST_LOG=debug", RESTART_LOG)?;
    let log = vm.ok(&format!("cat {RESTART_LOG}"))?;
    let adopted = log.matches("took over the pinned filter").count();
    ensure!(
        adopted == 2,
        "the restart took over {adopted} of 2 pinned filters:\n{log}"
    );
    vm.ok("kill $(cat /tmp/prober.pid)")?;
    let leaks = vm.run("cat /tmp/leak")?;
    ensure!(
        leaks.rc != 0,
        "denied connections got through during the restart: {}",
        leaks.output.trim()
    );
    // Before TCX the egress program is one tc filter, replaced in place;
    // with TCX it is a link, which `tc filter show` does not list.
    let expected = u32::from(log.contains("no TCX before Linux 6.6"));
    let filters = vm.ok("tc filter show dev eth0 egress | grep -c 'guard_egress' || true")?;
    ensure!(
        filters.trim().parse::<u32>().ok() == Some(expected),
        "eth0's egress has {} tc filters of the agent after a restart, not {expected}",
        filters.trim()
    );
    Ok(format!(
        "both pins adopted ({restarted}), no denied connection through"
    ))
}

/// Sends the running agent `signal` and waits until it has exited.
fn signal_agent(vm: &mut Vm, signal: &str) -> anyhow::Result<()> {
    vm.ok(&format!("kill -{signal} $(cat /tmp/agent.pid)"))?;
    vm.wait_until(
        &format!("the agent's exit after SIG{signal}"),
        WAIT,
        "kill -0 $(cat /tmp/agent.pid)",
        |answer| answer.rc != 0,
    )?;
    Ok(())
}

fn stop(vm: &mut Vm) -> anyhow::Result<String> {
    signal_agent(vm, "TERM")?;
    vm.ok("test -e /sys/fs/bpf/filter-agent/eth0/xdp_link && test -e /sys/fs/bpf/filter-agent/fa0/xdp_link")?;
    ensure!(
        !peer_get(vm, 9000)?,
        "with the agent stopped, 9000 is answered"
    );
    ensure!(
        !host_get(vm.forwards[1]),
        "with the agent stopped, the NIC's 9000 is answered"
    );
    Ok("pins stay, 9000 still denied on both interfaces".into())
}

fn detach(vm: &mut Vm, baseline: &str) -> anyhow::Result<String> {
    vm.ok("filter-agent detach --iface eth0 --iface fa0")?;
    same_state(vm, baseline, "after detach")?;
    ensure!(peer_get(vm, 9000)?, "after detach, 9000 is still denied");
    Ok("tc, links, programs, maps and pins as before; the operator's own tc filter kept".into())
}

/// Starts the agent on an object the verifier refuses.
fn refused_program(vm: &mut Vm, baseline: &str) -> anyhow::Result<String> {
    let answer = vm.run(&format!("FILTER_AGENT_BPF_OBJECT=/vm/refused.o {START}"))?;
    ensure!(answer.rc != 0, "the agent started with a refused program");
    let errors: Vec<&str> = answer
        .output
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    ensure!(
        errors.len() == 1
            && errors[0].contains("refused the program")
            && answer.output.lines().count() <= 2,
        "not one error line naming the refusal:\n{}",
        answer.output
    );
    vm.ok("test -s /run/filter-agent/verifier-filter.log")?;
    same_state(vm, baseline, "after a refused start")?;
    Ok(errors[0].chars().take(160).collect())
}

/// Attaches to eth0 first, then fails on a link without native XDP.
fn failed_attach(vm: &mut Vm, baseline: &str) -> anyhow::Result<String> {
    let answer = vm
        .run("filter-agent --xdp-mode native --iface eth0 --iface dummy0 --rules /vm/rules.toml")?;
    ensure!(answer.rc != 0, "the agent started on dummy0 in native mode");
    ensure!(
        answer.output.contains("filter attached iface=eth0"),
        "eth0 was never attached, so nothing was undone: {}",
        answer.output
    );
    let error = answer
        .output
        .lines()
        .find(|line| line.starts_with("error: cannot attach to dummy0 in native mode"))
        .with_context(|| {
            format!(
                "expected the native attach to dummy0 to fail: {}",
                answer.output
            )
        })?
        .to_owned();
    same_state(vm, baseline, "after a failed attach")?;
    Ok(error)
}

/// Waits until the kernel state equals `baseline` (programs and maps are
/// freed a moment after their last reference goes).
fn same_state(vm: &mut Vm, baseline: &str, when: &str) -> anyhow::Result<()> {
    ensure!(!baseline.is_empty(), "no baseline snapshot");
    vm.wait_until(
        &format!("the kernel state {when} equal to before"),
        WAIT,
        "/vm/snapshot.sh",
        |answer| answer.output == baseline,
    )
    .map_err(|err| anyhow::anyhow!("{err}\nbefore:\n{baseline}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_attach_lines() {
        let lines = ["2026-12-02T07:00:00Z  INFO filter attached iface=eth0 mode=\"native\""];
        assert_eq!(attach_summary(&lines), "eth0 native");
    }
}
