//! The one-shot subcommands: `check`, `test`, `replay`, `guard` and `audit`.

use std::{io::Write as _, path::Path};

use anyhow::Context as _;
use filter_agent::{
    audit, compile,
    config::{self, Action},
    events,
    guard::{self, GuardReport},
    lint,
    loader::{self, Filter, xdp_action},
    packet, pcap,
    privileges::{self, Task},
    reference::Outcome,
    state,
};
use filter_common::{guard as guard_stat, reason};
use serde_json::json;

fn verdict_name(xdp_action: u32) -> &'static str {
    if xdp_action == xdp_action::DROP {
        "drop"
    } else {
        "pass"
    }
}

pub fn check(rules: &Path) -> anyhow::Result<()> {
    let config = config::load(rules)?;
    let rule_set = compile::compile(&config)?;
    let warnings = lint::lint(&config);
    for warning in &warnings {
        println!("{warning}");
    }
    println!(
        "{}: ok ({} {}, default {}, {} {}, {:.1} MiB of maps)",
        rules.display(),
        config.rules.len(),
        plural(config.rules.len(), "rule", "rules"),
        config.filter.default.name(),
        warnings.len(),
        plural(warnings.len(), "warning", "warnings"),
        rule_set.map_bytes() as f64 / f64::from(1 << 20),
    );
    Ok(())
}

fn plural(count: usize, one: &'static str, many: &'static str) -> &'static str {
    if count == 1 { one } else { many }
}

/// `filter-agent test`: each packet through the real program, not attached.
pub fn test_packets(rules: &Path, packets: &[String]) -> anyhow::Result<()> {
    let config = config::load(rules)?;
    let specs = packets
        .iter()
        .map(|text| {
            packet::parse_description(text)
                .map_err(|err| anyhow::anyhow!("--packet {text:?}: {err}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rule_set = compile::compile(&config)?;
    privileges::check(Task::TestRun)?;
    let filter = Filter::load_traced(&rule_set).context("loading the XDP program")?;
    for (text, spec) in packets.iter().zip(specs) {
        let (xdp_action, outcome) = filter.trace_frame(&spec.build())?;
        let verdict = verdict_name(xdp_action);
        let decided = match outcome {
            Outcome::Rule(index) => {
                let rule = &rule_set.rules[index];
                format!("rule {:?} ({})", rule.name, rule.action.name())
            }
            Outcome::Reason(why) => reason::NAMES[why as usize].replace('_', " "),
        };
        let would_drop = outcome.action(&rule_set.rules, |rule| rule.action) == Action::Deny;
        let note = if config.filter.mode == config::Mode::Monitor && would_drop {
            " (monitor mode: enforce would drop)"
        } else {
            ""
        };
        println!("{text}: {verdict} by {decided}{note}");
    }
    Ok(())
}

/// One line of `replay --json`.
#[derive(serde::Serialize)]
struct ReplayedPacket<'a> {
    packet: u64,
    /// What the program returned: "pass" or "drop".
    verdict: &'static str,
    /// What enforce mode does: "allow" or "deny" (differs from the verdict
    /// in monitor mode).
    action: &'static str,
    /// The deciding rule, or null when no rule decided.
    rule: Option<&'a str>,
    /// "rule", or why no rule decided: "default_deny", "malformed", ...
    reason: &'static str,
}

/// `filter-agent replay`: every packet of a capture through the program.
pub fn replay(rules: &Path, capture: &Path, json: bool) -> anyhow::Result<()> {
    let config = config::load(rules)?;
    let rule_set = compile::compile(&config)?;
    privileges::check(Task::TestRun)?;
    let filter = Filter::load_traced(&rule_set).context("loading the XDP program")?;
    let mut rule_hits = vec![0u64; rule_set.rules.len()];
    let mut reason_hits = [0u64; reason::COUNT as usize];
    let (mut passed, mut dropped, mut number) = (0u64, 0u64, 0u64);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    pcap::for_each_frame(capture, |frame| -> anyhow::Result<()> {
        number += 1;
        let (xdp_action, outcome) = filter.trace_frame(frame)?;
        let verdict = verdict_name(xdp_action);
        if xdp_action == xdp_action::DROP {
            dropped += 1;
        } else {
            passed += 1;
        }
        let action = outcome.action(&rule_set.rules, |rule| rule.action).name();
        let (rule, reason) = match outcome {
            Outcome::Rule(index) => {
                rule_hits[index] += 1;
                (Some(rule_set.rules[index].name.as_str()), "rule")
            }
            Outcome::Reason(why) => {
                reason_hits[why as usize] += 1;
                (None, reason::NAMES[why as usize])
            }
        };
        if json {
            let line = ReplayedPacket {
                packet: number,
                verdict,
                action,
                rule,
                reason,
            };
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
        }
        Ok(())
    })?;
    if !json {
        writeln!(
            out,
            "{}: {number} packets, {passed} passed, {dropped} dropped",
            capture.display()
        )?;
        for (rule, hits) in rule_set.rules.iter().zip(&rule_hits) {
            writeln!(
                out,
                "  {hits:>10}  rule {:?} ({})",
                rule.name,
                rule.action.name()
            )?;
        }
        for (name, hits) in reason::NAMES.iter().zip(reason_hits) {
            if hits > 0 {
                writeln!(out, "  {hits:>10}  {}", name.replace('_', " "))?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// The interfaces asked for, or every one with pinned state.
fn pinned_interfaces(asked: &[String]) -> anyhow::Result<Vec<String>> {
    if !asked.is_empty() {
        return Ok(asked.to_vec());
    }
    let dirs = std::fs::read_dir(loader::PIN_ROOT).with_context(|| {
        format!(
            "no filter-agent state under {} (is the agent running?)",
            loader::PIN_ROOT
        )
    })?;
    let mut names: Vec<String> = dirs
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// `filter-agent guard`: the guard's counters from the pinned maps.
pub fn guard(iface: Option<&str>, top: usize, json: bool) -> anyhow::Result<()> {
    privileges::check(Task::ReadCounters)?;
    let asked: Vec<String> = iface.map(ToOwned::to_owned).into_iter().collect();
    let ifaces = pinned_interfaces(&asked)?;
    let mut documents = Vec::new();
    for iface in &ifaces {
        let report = GuardReport::read_pinned(&loader::pin_dir(iface))?;
        if json {
            documents.push(guard_json(iface, &report, top));
        } else {
            print_guard(iface, &report, top);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&documents)?);
    }
    Ok(())
}

fn print_guard(iface: &str, report: &GuardReport, top: usize) {
    let packets = |index: u32| report.stats[index as usize].packets;
    println!(
        "{iface}: return traffic {} in range, {} out of range; outbound attempts {} in range, {} out of range",
        packets(guard_stat::RETURN_IN_RANGE),
        packets(guard_stat::RETURN_OUT_OF_RANGE),
        packets(guard_stat::OUTBOUND_IN_RANGE),
        packets(guard_stat::OUTBOUND_OUT_OF_RANGE),
    );
    if !report.ports.is_empty() {
        println!("  out-of-range local ports (packets):");
    }
    for (port, counter) in report.ports.iter().take(top) {
        println!(
            "  {:>10}  {} {}/{}",
            counter.packets,
            guard::direction_name(port.direction),
            guard::proto_name(port.proto),
            port.port
        );
    }
    if !report.peers.is_empty() {
        println!("  out-of-range peers (packets):");
    }
    for (peer, counter) in report.peers.iter().take(top) {
        let remote = std::net::SocketAddr::new(guard::peer_address(peer), peer.port);
        println!(
            "  {:>10}  {} {} {remote}",
            counter.packets,
            guard::direction_name(peer.direction),
            guard::proto_name(peer.proto),
        );
    }
}

fn guard_json(iface: &str, report: &GuardReport, top: usize) -> serde_json::Value {
    let stats: serde_json::Map<String, serde_json::Value> = guard_stat::STAT_NAMES
        .iter()
        .zip(&report.stats)
        .map(|(name, counter)| {
            let value = json!({"packets": counter.packets, "bytes": counter.bytes});
            ((*name).to_owned(), value)
        })
        .collect();
    let ports: Vec<_> = report
        .ports
        .iter()
        .take(top)
        .map(|(port, counter)| {
            json!({
                "direction": guard::direction_name(port.direction),
                "proto": guard::proto_name(port.proto),
                "port": port.port,
                "packets": counter.packets,
                "bytes": counter.bytes,
            })
        })
        .collect();
    let peers: Vec<_> = report
        .peers
        .iter()
        .take(top)
        .map(|(peer, counter)| {
            json!({
                "direction": guard::direction_name(peer.direction),
                "proto": guard::proto_name(peer.proto),
                "address": guard::peer_address(peer).to_string(),
                "port": peer.port,
                "packets": counter.packets,
                "bytes": counter.bytes,
            })
        })
        .collect();
    json!({"iface": iface, "counters": stats, "ports": ports, "peers": peers})
}

/// `filter-agent audit`: every namespace's ephemeral range and NAT rules.
pub fn audit(rules: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let range = match rules {
        Some(rules) => config::load(rules)?.guard.ephemeral,
        None => config::DEFAULT_EPHEMERAL,
    };
    privileges::check(Task::Audit)?;
    let namespaces = audit::run(range);
    if json {
        let document = json!({"range": [range.0, range.1], "namespaces": namespaces});
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    let findings: usize = namespaces.iter().map(|ns| ns.findings.len()).sum();
    println!(
        "{} network namespaces, {findings} {} against the return range {}-{}",
        namespaces.len(),
        plural(findings, "finding", "findings"),
        range.0,
        range.1
    );
    for ns in &namespaces {
        let ports = ns
            .port_range
            .map_or("?".to_owned(), |(low, high)| format!("{low}-{high}"));
        let status = if ns.findings.is_empty() {
            "ok"
        } else {
            "FLAGGED"
        };
        println!("{status:<8} ephemeral {ports:<12} {}", ns.label());
        if let Some(error) = &ns.error {
            println!("         note: {error}");
        }
        for finding in &ns.findings {
            println!("         problem: {}", finding.problem);
            println!("         fix: {}", finding.fix);
        }
    }
    Ok(())
}

/// `filter-agent detach`: removes the pins, which detaches the filter.
pub fn detach(ifaces: &[String]) -> anyhow::Result<()> {
    privileges::check(Task::Detach)?;
    for iface in ifaces {
        let dir = loader::pin_dir(iface);
        if !dir.exists() {
            anyhow::bail!(
                "no filter-agent state for {iface} under {}",
                loader::PIN_ROOT
            );
        }
        let lock = state::InterfaceLock::existing(iface)?;
        loader::remove_pins(&dir);
        drop(lock);
        println!("{iface}: detached");
    }
    Ok(())
}

/// `filter-agent stats`: counters from the pinned maps, optionally again
/// every `watch` seconds with rates.
pub fn stats(asked: &[String], json: bool, watch: Option<u64>) -> anyhow::Result<()> {
    privileges::check(Task::ReadCounters)?;
    let ifaces = pinned_interfaces(asked)?;
    let read = || -> anyhow::Result<Vec<(String, state::Snapshot)>> {
        ifaces
            .iter()
            .map(|iface| {
                Ok((
                    iface.clone(),
                    state::read_snapshot(&loader::pin_dir(iface))?,
                ))
            })
            .collect()
    };
    let mut previous = read()?;
    print_stats(&previous, None, json)?;
    let Some(seconds) = watch else {
        return Ok(());
    };
    let interval = std::time::Duration::from_secs(seconds.max(1));
    loop {
        std::thread::sleep(interval);
        let current = read()?;
        print_stats(&current, Some((&previous, interval.as_secs_f64())), json)?;
        previous = current;
    }
}

type Snapshots = [(String, state::Snapshot)];

/// One row of `stats`: a rule or a reason, its counter and its rate.
struct StatsRow<'a> {
    name: &'a str,
    action: &'static str,
    counter: filter_common::Counter,
    per_second: Option<f64>,
}

/// The rows of one interface; rates against `before` (a snapshot taken
/// `seconds` earlier) when given. A rule's rate needs the same rule in the
/// same slot, which a reload may have changed.
fn stats_rows<'a>(
    snapshot: &'a state::Snapshot,
    before: Option<(&state::Snapshot, f64)>,
) -> Vec<StatsRow<'a>> {
    let rate = |now: u64, earlier: Option<u64>| {
        let (_, seconds) = before?;
        Some(now.saturating_sub(earlier?) as f64 / seconds)
    };
    let rules = snapshot.rules.iter().enumerate().map(|(i, rule)| {
        let earlier = before.and_then(|(b, _)| {
            let old = b.rules.get(i).filter(|old| old.name == rule.name)?;
            Some(old.counter.packets)
        });
        StatsRow {
            name: &rule.name,
            action: rule.action.name(),
            counter: rule.counter,
            per_second: rate(rule.counter.packets, earlier),
        }
    });
    let reasons =
        reason::NAMES
            .iter()
            .zip(&snapshot.reasons)
            .enumerate()
            .map(|(i, (name, counter))| {
                let earlier = before.and_then(|(b, _)| Some(b.reasons.get(i)?.packets));
                StatsRow {
                    name,
                    action: "",
                    counter: *counter,
                    per_second: rate(counter.packets, earlier),
                }
            });
    rules.chain(reasons).collect()
}

/// Prints `current`; with `since`, also packets per second since then.
fn print_stats(
    current: &Snapshots,
    since: Option<(&Snapshots, f64)>,
    json: bool,
) -> anyhow::Result<()> {
    let mut documents = Vec::new();
    for (index, (iface, snapshot)) in current.iter().enumerate() {
        let before = since.and_then(|(previous, seconds)| Some((&previous.get(index)?.1, seconds)));
        let rows = stats_rows(snapshot, before);
        let rule_count = snapshot.rules.len();
        if json {
            let row_json = |row: &StatsRow<'_>| {
                json!({"packets": row.counter.packets, "bytes": row.counter.bytes,
                       "packets_per_second": row.per_second})
            };
            let rules: Vec<_> = rows[..rule_count]
                .iter()
                .map(|row| {
                    let mut value = row_json(row);
                    value["rule"] = json!(row.name);
                    value["action"] = json!(row.action);
                    value
                })
                .collect();
            let reasons: serde_json::Map<String, serde_json::Value> = rows[rule_count..]
                .iter()
                .map(|row| (row.name.to_owned(), row_json(row)))
                .collect();
            documents.push(json!({"iface": iface, "rules": rules, "reasons": reasons}));
            continue;
        }
        println!("{iface}");
        println!(
            "  {:<28} {:<6} {:>14} {:>16} {:>12}",
            "rule / reason", "action", "packets", "bytes", "packets/s"
        );
        for row in &rows {
            let rate = row.per_second.map_or("-".to_owned(), |r| format!("{r:.1}"));
            println!(
                "  {:<28} {:<6} {:>14} {:>16} {:>12}",
                row.name, row.action, row.counter.packets, row.counter.bytes, rate
            );
        }
    }
    if json {
        println!("{}", serde_json::to_string(&documents)?);
    }
    std::io::stdout().flush()?;
    Ok(())
}

/// `filter-agent watch`: the running agents' event lines, as they come.
pub fn watch(asked: &[String]) -> anyhow::Result<()> {
    privileges::check(Task::Watch)?;
    let sockets: Vec<(String, std::path::PathBuf)> = if asked.is_empty() {
        let dir = std::fs::read_dir(events::SOCKET_DIR).with_context(|| {
            format!(
                "no running filter-agent (nothing in {})",
                events::SOCKET_DIR
            )
        })?;
        dir.flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let iface = name.strip_suffix(".sock")?.to_owned();
                Some((iface, entry.path()))
            })
            .collect()
    } else {
        asked
            .iter()
            .map(|iface| (iface.clone(), events::socket_path(iface)))
            .collect()
    };
    if sockets.is_empty() {
        anyhow::bail!(
            "no running filter-agent (nothing in {})",
            events::SOCKET_DIR
        );
    }
    let streams = sockets
        .iter()
        .map(|(iface, path)| {
            std::os::unix::net::UnixStream::connect(path)
                .map(|stream| (iface.clone(), stream))
                .with_context(|| format!("no filter-agent is running for {iface}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let prefix = streams.len() > 1;
    let readers: Vec<_> = streams
        .into_iter()
        .map(|(iface, stream)| {
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    if prefix {
                        println!("{iface}: {line}");
                    } else {
                        println!("{line}");
                    }
                }
            })
        })
        .collect();
    for reader in readers {
        let _ = reader.join();
    }
    eprintln!("filter-agent stopped");
    Ok(())
}
