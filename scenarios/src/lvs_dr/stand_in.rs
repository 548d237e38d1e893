//! The stand-in for kernels without IPVS: the balancer is a namespace that
//! only receives, which is what a direct-routing director's conntrack sees
//! (the client-to-server half of every flow). With UFW-style rules its
//! conntrack takes SYN and ACK for new flows but marks FIN, RST and ICMP
//! destination-unreachable INVALID and drops them; filter-agent's
//! stateless rules on TCP flags and ICMP types pass them.

use std::path::Path;

use anyhow::ensure;
use serde_json::Value;
use testbed::{Netns, Pair};

use super::{RULE_NAMES, RULES, UFW};
use crate::{Agent, agent, say, step};

/// Packets sent per class.
pub const PER_CLASS: u64 = 5;

/// Each class: its name, hping3's arguments, and a source port base of its
/// own (so that no class meets another's conntrack entries).
const CLASSES: [(&str, &[&str]); 5] = [
    ("SYN", &["-S", "-p", "80", "-s", "20000"]),
    ("ACK", &["-A", "-p", "80", "-s", "21000"]),
    ("FIN+ACK", &["-F", "-A", "-p", "80", "-s", "22000"]),
    ("RST", &["-R", "-p", "80", "-s", "23000"]),
    ("ICMP unreachable", &["--icmp", "-C", "3", "-K", "3"]),
];

/// The stand-in balancer never answers itself (in direct routing the real
/// servers do), so its own replies are dropped before conntrack sees them.
const NO_REPLIES: &str = "*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -o lo -j ACCEPT
-A OUTPUT -j DROP
COMMIT
";

/// How many packets of one class got through.
#[derive(Debug)]
pub struct Class {
    pub name: &'static str,
    pub stateful_passed: u64,
    pub stateless_passed: u64,
}

pub fn run(binary: &Path) -> anyhow::Result<Vec<Class>> {
    step!(
        "lvs-dr (stand-in): a direct-routing balancer sees only client-to-server packets; \
         {PER_CLASS} of each class sent to its VIP"
    );
    let (stateful, stateless) = (through_ufw()?, through_filter_agent(binary)?);

    step!("packets that got through, per class");
    say!("{:<18} {:>12} {:>14}", "class", "UFW-style", "filter-agent");
    let mut classes = Vec::new();
    for (((name, _), stateful_passed), stateless_passed) in
        CLASSES.iter().zip(stateful).zip(stateless)
    {
        say!(
            "{name:<18} {:>12} {:>14}",
            format!("{stateful_passed} of {PER_CLASS}"),
            format!("{stateless_passed} of {PER_CLASS}")
        );
        classes.push(Class {
            name,
            stateful_passed,
            stateless_passed,
        });
    }
    for class in &classes {
        let new_flow = matches!(class.name, "SYN" | "ACK");
        ensure!(
            class.stateful_passed == if new_flow { PER_CLASS } else { 0 },
            "UFW-style rules passed {} {} packets",
            class.stateful_passed,
            class.name
        );
        ensure!(
            class.stateless_passed == PER_CLASS,
            "filter-agent passed {} {} packets",
            class.stateless_passed,
            class.name
        );
    }
    say!(
        "(conntrack takes the ACK of a flow it never saw as a new flow; FIN, RST and an error about an unknown flow are INVALID)"
    );
    Ok(classes)
}

/// Packets of each class that UFW-style rules let through.
fn through_ufw() -> anyhow::Result<Vec<u64>> {
    let pair = Pair::create("lvs")?;
    pair.server
        .exec_with_input("iptables-restore", &[], &format!("{NO_REPLIES}{UFW}"))?;
    say!(
        "UFW-style iptables on {} (ESTABLISHED,RELATED accept; INVALID drop; tcp dport 80 accept)",
        pair.server.name()
    );
    let mut passed = Vec::new();
    for (_, args) in CLASSES {
        let before = ufw_accepted(&pair.server)?;
        send(&pair.client, args)?;
        passed.push(ufw_accepted(&pair.server)? - before);
    }
    Ok(passed)
}

/// Packets of each class that filter-agent lets through.
fn through_filter_agent(binary: &Path) -> anyhow::Result<Vec<u64>> {
    let pair = Pair::create("lvs")?;
    let agent = Agent::start(binary, &pair.server, &[&pair.server_if], RULES)?;
    say!(
        "filter-agent on {} instead (rules by TCP flags and ICMP type, default deny)",
        pair.server_if
    );
    let mut passed = Vec::new();
    for (_, args) in CLASSES {
        let before = agent_passed(&agent, &pair.server_if)?;
        send(&pair.client, args)?;
        passed.push(agent_passed(&agent, &pair.server_if)? - before);
    }
    agent.stop()?;
    Ok(passed)
}

/// Sends `PER_CLASS` packets of one class from `client` to the VIP.
fn send(client: &Netns, args: &[&str]) -> anyhow::Result<()> {
    let count = PER_CLASS.to_string();
    let vip = Pair::SERVER_V4.to_string();
    // hping3 exits non-zero when nothing answers, which is the point here.
    client
        .command("hping3")
        .args(["-q", "-i", "u20000", "-c", &count])
        .args(args)
        .arg(&vip)
        .output()?;
    Ok(())
}

/// Packets INPUT accepted from the network so far (iptables-save -c).
fn ufw_accepted(balancer: &Netns) -> anyhow::Result<u64> {
    let saved = balancer.exec("iptables-save", &["-c", "-t", "filter"])?;
    Ok(String::from_utf8_lossy(&saved.stdout)
        .lines()
        .filter(|line| {
            line.contains("-A INPUT") && line.ends_with("-j ACCEPT") && !line.contains("-i lo")
        })
        .filter_map(|line| {
            line.strip_prefix('[')?
                .split(':')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}

/// Packets filter-agent's allow rules passed on `iface` so far.
fn agent_passed(agent: &Agent, iface: &str) -> anyhow::Result<u64> {
    let stats: Value = agent.json(&["stats", "--iface", iface])?;
    let mut passed = 0;
    for rule in RULE_NAMES {
        passed += agent::rule_packets(&stats, iface, rule)?;
    }
    Ok(passed)
}
