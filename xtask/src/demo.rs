//! `cargo xtask demo`: the real agent on a throwaway veth pair, real traffic
//! across it, and what the agent counted.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use testbed::{
    Daemon, Pair,
    traffic::{self, Responder},
};

use crate::util::{cargo, workspace_root};

/// Connections the guard demo lets the kernel pick a port for.
const GUARD_ATTEMPTS: usize = 6;

/// Allowed by the example rules ("web").
const SERVICE_PORT: u16 = 8080;
/// Not allowed: falls through to the default deny.
const OTHER_PORT: u16 = 9000;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Fails once Ctrl-C was pressed, so that everything unwinds and cleans up.
fn checkpoint() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted; cleaned up");
    }
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;
    cargo(&["build", "--quiet", "--package", "filter-agent"])?;
    let root = workspace_root();
    let agent = root.join("target/debug/filter-agent");
    let rules = root.join("examples/rules.toml");
    checkpoint()?;

    let pair = Pair::create("demo").context("creating the demo namespaces")?;
    println!(
        "demo: namespaces {} (client {}) and {} (server {}), joined by veth {} <-> {}",
        pair.client.name(),
        Pair::CLIENT_V4,
        pair.server.name(),
        Pair::SERVER_V4,
        pair.client_if,
        pair.server_if,
    );
    let _responder = Responder::start(&pair.server, SERVICE_PORT)?;

    let mut command = pair
        .server
        .command(agent.to_str().context("non-UTF-8 path")?);
    command
        .args(["--detach-on-exit", "--iface", &pair.server_if, "--rules"])
        .arg(&rules);
    println!(
        "demo: starting {}",
        format_args!(
            "filter-agent --detach-on-exit --iface {} --rules {}",
            pair.server_if,
            rules.display()
        )
    );
    let mut daemon = Daemon::start(command, Some("  agent | "))?;
    if daemon
        .wait_for("filter attached", Duration::from_secs(10))
        .is_none()
    {
        bail!("filter-agent did not attach (its output is above)");
    }
    checkpoint()?;

    send_traffic(&pair)?;

    show_guard(&pair, &agent, &rules)?;

    println!("demo: stopping the agent; it reports what it counted");
    let (status, _) = daemon.stop();
    if !status.is_some_and(|status| status.success()) {
        bail!("filter-agent exited with {status:?}");
    }
    println!("demo: done; namespaces removed");
    Ok(())
}

/// Allowed and denied TCP, UDP and ICMP from the client, over IPv4 and
/// IPv6, each line saying whether it was answered.
fn send_traffic(pair: &Pair) -> anyhow::Result<()> {
    println!(
        "demo: sending real traffic from {} to {}",
        pair.client.name(),
        pair.server.name()
    );
    for server in [IpAddr::from(Pair::SERVER_V4), IpAddr::from(Pair::SERVER_V6)] {
        let service = SocketAddr::new(server, SERVICE_PORT);
        let other = SocketAddr::new(server, OTHER_PORT);
        let results = [
            (
                "tcp",
                service.to_string(),
                traffic::tcp_exchange(&pair.client, service, None)?,
            ),
            (
                "tcp",
                other.to_string(),
                traffic::tcp_exchange(&pair.client, other, None)?,
            ),
            (
                "udp",
                service.to_string(),
                traffic::udp_exchange(&pair.client, service)?,
            ),
            (
                "icmp echo",
                server.to_string(),
                traffic::icmp_echo(&pair.client, server)?,
            ),
        ];
        for (what, to, answered) in results {
            let result = if answered {
                "answered"
            } else {
                "no answer (dropped)"
            };
            println!("  {what:<10} -> {to:<22} {result}");
            checkpoint()?;
        }
    }
    Ok(())
}

/// Incident 1 in miniature: the filtered namespace picks client ports from
/// 1024-65000 while the rules let return traffic reach only 32768-60999.
fn show_guard(pair: &Pair, agent: &Path, rules: &Path) -> anyhow::Result<()> {
    let host = &pair.server;
    println!(
        "demo: the guard: {} now opens connections from ip_local_port_range 1024-65000",
        host.name()
    );
    host.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    let _peer = Responder::start(&pair.client, SERVICE_PORT)?;
    let peer = SocketAddr::from((Pair::CLIENT_V4, SERVICE_PORT));
    // A few fixed ports across the range, then the kernel's own picks.
    let fixed = [2000, 20000, 40000, 50000, 64000].map(Some);
    for from in fixed.into_iter().chain([None; GUARD_ATTEMPTS]) {
        let (answered, port) = traffic::tcp_attempt(host, peer, from)?;
        let result = if answered {
            "answered"
        } else {
            "no answer (reply dropped)"
        };
        println!("  tcp from port {port:<6} -> {peer:<17} {result}");
        checkpoint()?;
    }
    for args in [
        vec!["stats", "--iface", &pair.server_if],
        vec!["guard", "--iface", &pair.server_if],
        vec![
            "audit",
            "--rules",
            rules.to_str().context("non-UTF-8 path")?,
        ],
    ] {
        println!("demo: filter-agent {}", args.join(" "));
        let output = Command::new(agent).args(&args).output()?;
        print!("{}", String::from_utf8_lossy(&output.stdout));
        // The audit exits 1 when it flags something, as it should here.
        let flagged = args[0] == "audit" && output.status.code() == Some(1);
        if !output.status.success() && !flagged {
            bail!(
                "filter-agent {} failed: {}",
                args[0],
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}
