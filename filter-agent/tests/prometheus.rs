//! A real Prometheus (Debian's) scrapes a real agent that filters real
//! traffic, with the shipped alerting rules loaded: every query of the
//! Grafana dashboard answers with the series the traffic implies, every
//! rule evaluates without error, and the alerts fire (or wait) as the
//! agent's state says. Needs root.

use std::{
    io::Write as _,
    net::UdpSocket,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use support::{Pins, start_agent};
use testbed::{Daemon, Pair, traffic::http_get, wait_until};

mod support;

const PACKAGING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging");
const PROMETHEUS: &str = "127.0.0.1:9090";
const METRICS: &str = "127.0.0.1:9469";
const DENIED: u16 = 9000;
const SENT: u64 = 5;
const RULES: &str = "[filter]\ndefault = \"allow\"\n\n[[rule]]\nname = \"deny-9000\"\naction = \"deny\"\nproto = \"udp\"\ndport = 9000\n";

#[test]
fn prometheus_answers_every_dashboard_query_and_alert_with_what_the_traffic_did() {
    let pair = Pair::create("prom").unwrap();
    let _pins = Pins::of(&pair.server_if);
    // A namespace whose ports do not fit the guard: an audit finding.
    pair.client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65000")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let mut agent = start_agent(
        &pair.server,
        &["--detach-on-exit", "--iface", &pair.server_if],
        &rules,
    );
    let sender = pair
        .client
        .run(|| UdpSocket::bind((Pair::CLIENT_V4, 0)))
        .unwrap()
        .unwrap();
    for _ in 0..SENT {
        sender
            .send_to(b"denied", (Pair::SERVER_V4, DENIED))
            .unwrap();
    }
    let _prometheus = start_prometheus(&pair, dir.path());
    let query = |expr: &str| query(&pair, expr);

    // The denied datagrams, counted by the rule, as Prometheus stored them.
    let denied = "filter_agent_rule_packets_total{rule=\"deny-9000\"}";
    wait_until(
        "Prometheus has the denied count",
        Duration::from_secs(20),
        || values(&query(denied)) == [SENT as f64],
    );
    // Every dashboard query answers (rates need two scrapes: waited for).
    for expr in dashboard_queries() {
        wait_until(
            &format!("a series for {expr}"),
            Duration::from_secs(20),
            || !query(&expr).is_empty(),
        );
    }
    assert_eq!(values(&query("filter_agent_rules_loaded")), [1.0]);
    assert_eq!(
        values(&query("count by (version) (filter_agent_build_info)")),
        [1.0]
    );
    let findings = query("filter_agent_audit_findings{kind=\"port_range\"}");
    assert!(!findings.is_empty(), "no audit finding in Prometheus");

    // A rejected reload: the counter and its alert, which has no delay.
    std::fs::write(&rules, "[filter]\ndefault = \"maybe\"\n").unwrap();
    agent.signal(libc::SIGHUP);
    agent.expect("reload rejected", Duration::from_secs(5));
    wait_until(
        "FilterAgentReloadFailed firing",
        Duration::from_secs(20),
        || alert_state(&pair, "FilterAgentReloadFailed").as_deref() == Some("firing"),
    );
    // The audit finding's alert waits 5 minutes before it fires.
    wait_until(
        "FilterAgentAuditFinding pending",
        Duration::from_secs(20),
        || alert_state(&pair, "FilterAgentAuditFinding").as_deref() == Some("pending"),
    );
    // Every rule loaded and evaluated without error.
    let groups = api(&pair, "/api/v1/rules");
    let rules: Vec<&Value> = groups["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .collect();
    assert_eq!(rules.len(), 7, "{groups}");
    for rule in rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    agent.stop();
}

/// Prometheus in the server's namespace, scraping the agent every second
/// and evaluating the shipped alerting rules; stopped on drop.
fn start_prometheus(pair: &Pair, dir: &Path) -> Daemon {
    let config = dir.join("prometheus.yml");
    let mut file = std::fs::File::create(&config).unwrap();
    write!(
        file,
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {PACKAGING}/prometheus/filter-agent.rules.yml\n\
         scrape_configs:\n  - job_name: filter-agent\n    static_configs:\n      - targets: ['{METRICS}']\n"
    )
    .unwrap();
    let mut command = pair.server.command("prometheus");
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(Stdio::null());
    let mut prometheus = Daemon::start(command, None).unwrap();
    prometheus.expect(
        "Server is ready to receive web requests",
        Duration::from_secs(30),
    );
    prometheus
}

/// The dashboard's queries, with Grafana's variables set to "all".
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(format!("{PACKAGING}/grafana/filter-agent-dashboard.json"))
        .unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| {
            target["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$iface", ".*")
                .replace("$__rate_interval", "30s")
        })
        .collect();
    assert!(queries.len() >= 8, "{queries:?}");
    queries
}

/// The result vector of an instant query.
fn query(pair: &Pair, expr: &str) -> Vec<Value> {
    let response = api(pair, &format!("/api/v1/query?query={}", encode(expr)));
    assert_eq!(response["status"], "success", "{expr}: {response}");
    response["data"]["result"].as_array().unwrap().clone()
}

/// The sample values of a query's result.
fn values(result: &[Value]) -> Vec<f64> {
    result
        .iter()
        .map(|series| series["value"][1].as_str().unwrap().parse().unwrap())
        .collect()
}

/// The state of alert `name` ("pending", "firing"), if it is active.
fn alert_state(pair: &Pair, name: &str) -> Option<String> {
    let alerts = api(pair, "/api/v1/alerts");
    alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|alert| alert["labels"]["alertname"] == name)
        .map(|alert| alert["state"].as_str().unwrap().to_owned())
}

fn api(pair: &Pair, path: &str) -> Value {
    let (status, body) = http_get(&pair.server, PROMETHEUS, path).unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&unchunked(&body)).unwrap_or_else(|err| panic!("{path}: {err}: {body}"))
}

/// The body of an HTTP/1.1 response, with chunked transfer coding undone.
fn unchunked(body: &str) -> String {
    let chunked = body.split_once("\r\n").is_some_and(|(first, _)| {
        !first.is_empty() && first.chars().all(|c| c.is_ascii_hexdigit())
    });
    if !chunked {
        return body.to_owned();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}

/// Percent-encodes a query for a URL.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

#[test]
fn the_scraped_page_passes_promtool() {
    let pair = Pair::create("promtool").unwrap();
    let _pins = Pins::of(&pair.server_if);
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let agent = start_agent(
        &pair.server,
        &["--detach-on-exit", "--iface", &pair.server_if],
        &rules,
    );
    let (status, page) = http_get(&pair.server, METRICS, "/metrics").unwrap();
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(unchunked(&page).as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    agent.stop();
}
