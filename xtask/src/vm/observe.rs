//! What the host sees of a guest from outside: its web servers answering
//! through qemu's forwards and over veth, and the agent's counters in
//! `filter-agent stats --json` and `/metrics`. Shared by every guest's
//! checks.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    time::Duration,
};

use anyhow::{bail, ensure};
use serde_json::Value;

use super::qemu::Vm;

/// How long a guest may take to show a change.
pub(super) const WAIT: Duration = Duration::from_secs(30);

/// What the guest's web servers answer.
pub(super) const GUEST_BODY: &str = "hello from the guest";

/// Checks that `filter-agent stats` and `/metrics` count the `web` rule
/// and default denials on `iface`; returns both packet counts.
pub(super) fn counted(vm: &mut Vm, iface: &str) -> anyhow::Result<(u64, u64)> {
    let document = json_document(&vm.ok(&format!("filter-agent stats --iface {iface} --json"))?)?;
    let web = rule_packets(&document, "web").unwrap_or(0);
    let denied = document["reasons"]["default_deny"]["packets"]
        .as_u64()
        .unwrap_or(0);
    ensure!(
        web > 0 && denied > 0,
        "stats for {iface}: web {web}, default_deny {denied}"
    );
    let counted_in = |metrics: &str| {
        let web = metric(
            metrics,
            "filter_agent_rule_packets_total",
            &[("iface", iface), ("rule", "web")],
        );
        let deny = metric(
            metrics,
            "filter_agent_packets_total",
            &[("iface", iface), ("reason", "default_deny")],
        );
        (web, deny)
    };
    // A scrape leaves out an interface whose pins it cannot read at that
    // moment (CI saw fa0 missing once, right after `stats` read it), so
    // the page is asked for again until it counts both, within WAIT.
    let page = vm.wait_until(
        &format!("/metrics counting {iface}"),
        WAIT,
        METRICS,
        |answer| {
            let (web, deny) = counted_in(&answer.output);
            web.is_some_and(|value| value > 0.0) && deny.is_some_and(|value| value > 0.0)
        },
    );
    if page.is_err() {
        let (web, deny) = counted_in(&vm.ok(METRICS)?);
        bail!("/metrics for {iface}: web {web:?}, default_deny {deny:?}");
    }
    Ok((web, denied))
}

/// Packets of `rule` in an interface's `stats --json` document.
pub(super) fn rule_packets(document: &Value, rule: &str) -> Option<u64> {
    let rules = document["rules"].as_array()?;
    rules.iter().find(|entry| entry["rule"] == rule)?["packets"].as_u64()
}

/// The one interface's document of a `--json` listing.
pub(super) fn json_document(text: &str) -> anyhow::Result<Value> {
    let value: Value = serde_json::from_str(text)?;
    Ok(match value {
        Value::Array(mut documents) if documents.len() == 1 => documents.remove(0),
        other => other,
    })
}

/// The agent's `filter_agent_reloads_total` of `result`.
pub(super) fn reloads(vm: &mut Vm, result: &str) -> anyhow::Result<f64> {
    let metrics = vm.ok(METRICS)?;
    Ok(reloads_in(&metrics, result))
}

/// The guest's command that prints the agent's /metrics.
pub(super) const METRICS: &str = "get 127.0.0.1 9469 /metrics";

/// `filter_agent_reloads_total` of `result` in a /metrics text.
pub(super) fn reloads_in(metrics: &str, result: &str) -> f64 {
    metric(metrics, "filter_agent_reloads_total", &[("result", result)]).unwrap_or(0.0)
}

/// Waits until the peer's connections to 10.9.0.1:9000 are answered (or
/// not), within [`WAIT`].
pub(super) fn wait_for_9000(vm: &mut Vm, answered: bool) -> anyhow::Result<()> {
    let what = if answered { "answered" } else { "denied" };
    vm.wait_until(
        &format!("10.9.0.1:9000 {what} from the peer"),
        WAIT,
        "get_in peer 10.9.0.1 9000",
        |answer| answer.output.contains(GUEST_BODY) == answered,
    )?;
    Ok(())
}

/// An HTTP request from the `peer` namespace to 10.9.0.1 (over veth).
pub(super) fn peer_get(vm: &mut Vm, port: u16) -> anyhow::Result<bool> {
    let answer = vm.run(&format!("get_in peer 10.9.0.1 {port}"))?;
    Ok(answer.rc == 0 && answer.output.contains(GUEST_BODY))
}

/// An HTTP request from the host through a 127.0.0.1 forward.
pub(super) fn host_get(port: u16) -> bool {
    http_get(port, Duration::from_secs(8))
}

/// Whether the guest answers an HTTP request on the forward `port` within
/// about `timeout` (connecting, then reading).
pub(super) fn http_get(port: u16, timeout: Duration) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), timeout)
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    if stream.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.contains(GUEST_BODY)
}

/// The value of the series of `name` with all of `labels`, in Prometheus text.
pub(crate) fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with('{'))
        .filter(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_series_by_its_labels() {
        let text = "# HELP x\nfilter_agent_reloads_total{result=\"success\"} 2\n\
                    filter_agent_reloads_total{result=\"failure\"} 1\n";
        assert_eq!(
            metric(text, "filter_agent_reloads_total", &[("result", "failure")]),
            Some(1.0)
        );
        assert_eq!(
            metric(text, "filter_agent_reloads_total", &[("result", "other")]),
            None
        );
    }
}
