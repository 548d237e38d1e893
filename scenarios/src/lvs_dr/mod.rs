//! Incident 5 (LINE): an LVS director in direct-routing mode sees only the
//! client-to-server half of every flow. Filtered with UFW-style rules
//! (ESTABLISHED,RELATED accept, INVALID drop, dport 80 accept), its
//! conntrack passes SYNs and ACKs as new flows but marks the clients' FINs
//! and RSTs and the ICMP errors about the flows INVALID and drops them;
//! filter-agent's stateless rules on TCP flags and ICMP types pass them.
//! On a kernel with IPVS the director is real ([`ipvs`]); without it a
//! stand-in plays the director's half of the traffic ([`stand_in`]).

pub mod ipvs;
pub mod stand_in;

use std::{path::Path, process::Command};

use crate::say;

/// UFW's shape (before.rules, then the user's `allow 80/tcp`).
const UFW: &str = "*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -p icmp -m icmp --icmp-type 3 -j ACCEPT
-A INPUT -p icmp -m icmp --icmp-type 8 -j ACCEPT
-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT
COMMIT
";

/// The fix, stateless: each packet class allowed by its flags or type, a
/// rule each so that `stats` tells them apart.
const RULES: &str = r#"
[filter]
default = "deny"

[guard]
services = [80]

[[rule]]
name = "http-new"
action = "allow"
proto = "tcp"
dport = "80"
tcp_flags = "syn,!ack"

[[rule]]
name = "http-fin"
action = "allow"
proto = "tcp"
dport = "80"
tcp_flags = "fin"

[[rule]]
name = "http-rst"
action = "allow"
proto = "tcp"
dport = "80"
tcp_flags = "rst"

[[rule]]
name = "http-ack"
action = "allow"
proto = "tcp"
dport = "80"
tcp_flags = "ack"

[[rule]]
name = "icmp-unreachable"
action = "allow"
proto = "icmp"
icmp_type = [3]
"#;
const RULE_NAMES: [&str; 5] = [
    "http-new",
    "http-fin",
    "http-rst",
    "http-ack",
    "icmp-unreachable",
];

#[derive(Debug)]
pub enum Outcome {
    Ipvs(ipvs::Outcome),
    StandIn(Vec<stand_in::Class>),
}

/// The real director where the kernel has IPVS, else the stand-in.
pub fn run(binary: &Path) -> anyhow::Result<Outcome> {
    if ipvs_available() {
        return ipvs::run(binary).map(Outcome::Ipvs);
    }
    say!(
        "this kernel has no IPVS (modprobe ip_vs failed): running the stand-in; \
         the real director runs in `cargo xtask vm-test`"
    );
    stand_in::run(binary).map(Outcome::StandIn)
}

/// Whether IPVS is there (built in, or loaded now).
pub fn ipvs_available() -> bool {
    let _ = Command::new("modprobe").args(["-q", "ip_vs"]).status();
    Path::new("/proc/net/ip_vs").exists()
}
