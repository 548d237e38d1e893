//! The subcommands that read or remove what a running agent pinned:
//! `stats`, `guard`, `watch` and `detach`.

use std::io::Write as _;

use anyhow::Context as _;
use filter_common::{guard as guard_stat, reason};
use serde_json::json;

use crate::{
    host::notrack,
    host::privileges::{self, Task},
    kernel::counters::{self, Snapshot},
    kernel::events,
    kernel::guard::{self, GuardReport},
    kernel::loader,
    kernel::pins::{self, InterfaceLock, PinError},
};

/// The interfaces asked for, or every one with pinned state.
fn pinned_interfaces(asked: &[String]) -> anyhow::Result<Vec<String>> {
    if !asked.is_empty() {
        return Ok(asked.to_vec());
    }
    pins::interfaces().with_context(|| {
        format!(
            "no filter-agent state under {} (is the agent running?)",
            pins::ROOT
        )
    })
}

/// `filter-agent guard`: the guard's counters from the pinned maps.
pub fn guard(iface: Option<&str>, top: usize, json: bool) -> anyhow::Result<()> {
    privileges::check(Task::ReadCounters)?;
    let asked: Vec<String> = iface.map(ToOwned::to_owned).into_iter().collect();
    let ifaces = pinned_interfaces(&asked)?;
    let mut documents = Vec::new();
    for iface in &ifaces {
        let report = match GuardReport::read_pinned(&pins::dir(iface)) {
            Ok(report) => report,
            // Found, not asked for: an agent is just starting or detaching.
            Err(PinError::NoGuardMaps(_)) if asked.is_empty() => continue,
            Err(err) => return Err(err.into()),
        };
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

/// `filter-agent detach`: removes the pins, which detaches the filter.
pub fn detach(ifaces: &[String]) -> anyhow::Result<()> {
    privileges::check(Task::Detach)?;
    for iface in ifaces {
        let dir = pins::dir(iface);
        if !dir.exists() {
            anyhow::bail!("no filter-agent state for {iface} under {}", pins::ROOT);
        }
        let lock = InterfaceLock::existing(iface)?;
        loader::detach(&dir);
        notrack::remove(iface)?;
        drop(lock);
        println!("{iface}: detached");
    }
    Ok(())
}

/// `filter-agent stats`: counters from the pinned maps, optionally again
/// every `watch` seconds with rates.
pub fn stats(asked: &[String], json: bool, watch: Option<u64>) -> anyhow::Result<()> {
    privileges::check(Task::ReadCounters)?;
    let read = || -> anyhow::Result<Vec<(String, Snapshot)>> {
        let mut snapshots = Vec::new();
        for iface in pinned_interfaces(asked)? {
            match counters::read_snapshot(&pins::dir(&iface)) {
                Ok(snapshot) => snapshots.push((iface, snapshot)),
                // Found, not asked for: an agent is just starting or
                // detaching there.
                Err(PinError::NotPinned(_)) if asked.is_empty() => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(snapshots)
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

type Snapshots = [(String, Snapshot)];

/// One row of `stats`: a rule or a reason, its counter and its rate, and
/// for a rate-limited rule what its limit dropped.
struct StatsRow<'a> {
    name: &'a str,
    action: &'static str,
    counter: filter_common::Counter,
    per_second: Option<f64>,
    over_limit: Option<(filter_common::Counter, Option<f64>)>,
}

/// The rows of one interface; rates against `before` (a snapshot taken
/// `seconds` earlier) when given. A rule's rate needs the same rule in the
/// same slot, which a reload may have changed.
fn stats_rows<'a>(snapshot: &'a Snapshot, before: Option<(&Snapshot, f64)>) -> Vec<StatsRow<'a>> {
    let rate = |now: u64, earlier: Option<u64>| {
        let (_, seconds) = before?;
        Some(now.saturating_sub(earlier?) as f64 / seconds)
    };
    let rules = snapshot.rules.iter().enumerate().map(|(i, rule)| {
        let old = before.and_then(|(b, _)| b.rules.get(i).filter(|old| old.name == rule.name));
        let (decided, over) = (rule.counts.decided, rule.counts.over_limit);
        StatsRow {
            name: &rule.name,
            action: rule.action.name(),
            counter: decided,
            per_second: rate(decided.packets, old.map(|o| o.counts.decided.packets)),
            over_limit: rule.limited.then(|| {
                let earlier = old.map(|o| o.counts.over_limit.packets);
                (over, rate(over.packets, earlier))
            }),
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
                    over_limit: None,
                }
            });
    rules.chain(reasons).collect()
}

/// One interface's `stats --json` document.
fn stats_json(iface: &str, snapshot: &Snapshot, rows: &[StatsRow<'_>]) -> serde_json::Value {
    let counter_json = |counter: &filter_common::Counter, per_second: Option<f64>| {
        json!({"packets": counter.packets, "bytes": counter.bytes,
               "packets_per_second": per_second})
    };
    let row_json = |row: &StatsRow<'_>| {
        let mut value = counter_json(&row.counter, row.per_second);
        if let Some((counter, per_second)) = &row.over_limit {
            value["over_limit"] = counter_json(counter, *per_second);
        }
        value
    };
    let rule_count = snapshot.rules.len();
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
    let layout = &snapshot.layout;
    json!({"iface": iface, "layout": layout.version, "generation": layout.generation,
           "rules": rules, "reasons": reasons})
}

/// Prints `current`; with `since`, also packets per second since then.
fn print_stats(
    current: &Snapshots,
    since: Option<(&Snapshots, f64)>,
    json: bool,
) -> anyhow::Result<()> {
    let mut documents = Vec::new();
    for (iface, snapshot) in current {
        let before = since.and_then(|(previous, seconds)| {
            let (_, before) = previous.iter().find(|(name, _)| name == iface)?;
            Some((before, seconds))
        });
        let rows = stats_rows(snapshot, before);
        if json {
            documents.push(stats_json(iface, snapshot, &rows));
            continue;
        }
        println!(
            "{iface}  rules generation {}, pin layout {}",
            snapshot.layout.generation, snapshot.layout.version
        );
        println!(
            "  {:<28} {:<10} {:>14} {:>16} {:>12}",
            "rule / reason", "action", "packets", "bytes", "packets/s"
        );
        let line =
            |name: &str, action: &str, counter: &filter_common::Counter, rate: Option<f64>| {
                let rate = rate.map_or("-".to_owned(), |r| format!("{r:.1}"));
                println!(
                    "  {name:<28} {action:<10} {:>14} {:>16} {rate:>12}",
                    counter.packets, counter.bytes
                );
            };
        for row in &rows {
            line(row.name, row.action, &row.counter, row.per_second);
            if let Some((counter, rate)) = &row.over_limit {
                line(row.name, "over-limit", counter, *rate);
            }
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
