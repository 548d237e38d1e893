//! Imported upstream ACLs through the real program: each sample file's
//! ACL, imported for each direction, decides random packets (edge ports,
//! ICMP types, both families, other protocols) exactly as the ACL's own
//! semantics do, evaluated here from the raw JSON by an independent
//! first-match reader. Needs root.

mod support;

use std::{net::IpAddr, path::Path};

use filter_agent::{
    kernel::loader::{Filter, xdp_action},
    oracle::packet::{self, PacketSpec, Transport},
    oracle::reference::Outcome,
    rules::compile::compile,
    rules::config,
    rules::upstream::{self, Direction, Format},
};
use filter_common::reason;
use ipnet::IpNet;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use serde_json::Value;

const AWS_SAMPLE: &str = include_str!("../../examples/upstream/aws-nacl.json");
const IBM_SAMPLE: &str = include_str!("../../examples/upstream/ibm-vpc.json");
const SAKURA_SAMPLE: &str = include_str!("../../examples/upstream/sakura.json");
const PACKETS: usize = 400;

/// The host's own addresses: the destination of ingress packets, the
/// source of egress ones (inside and outside the IBM sample's subnet).
const LOCAL: [&str; 3] = ["10.240.0.5", "10.0.1.5", "2001:db8:1::5"];
/// Remote ends inside and outside the samples' blocks.
const REMOTE: [&str; 7] = [
    "198.51.100.7",
    "198.51.200.9",
    "203.0.113.9",
    "10.20.30.40",
    "10.240.1.9",
    "2001:db8:99::1",
    "fd00::7",
];
const PORTS: [u16; 12] = [
    0, 22, 23, 53, 80, 443, 1023, 1024, 49151, 49152, 60000, 65535,
];
/// ICMP types, without IPv6 neighbour discovery (133-137: the rules file
/// lets it through ahead of every rule, and no cloud ACL sees it).
const ICMP_TYPES: [u8; 6] = [0, 3, 8, 11, 128, 129];
const PROTOCOLS: [u8; 3] = [50, 47, 132];

/// What decides a packet: an entry (by the name its rule gets), or the
/// ACL's default.
#[derive(Debug, PartialEq, Eq)]
enum Decided {
    Entry(String),
    Default,
}

/// An AWS NACL's first-match evaluation, from the JSON as AWS documents
/// it (independent of filter-agent's reader).
fn aws_decides(acl: &Value, egress: bool, packet: &Probe) -> (bool, Decided) {
    let mut entries: Vec<&Value> = acl["Entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["Egress"] == egress)
        .collect();
    entries.sort_by_key(|e| e["RuleNumber"].as_i64().unwrap());
    let remote = if egress { packet.dst } else { packet.src };
    for entry in entries {
        let block = entry["CidrBlock"]
            .as_str()
            .or(entry["Ipv6CidrBlock"].as_str());
        let net: IpNet = block.unwrap().parse().unwrap();
        if !net.contains(&remote) {
            continue;
        }
        let protocol = entry["Protocol"].as_str().unwrap();
        if protocol != "-1" && protocol.parse::<u8>().unwrap() != packet.proto {
            continue;
        }
        if matches!(protocol, "6" | "17")
            && let Some(range) = entry.get("PortRange")
        {
            let (from, to) = (
                range["From"].as_i64().unwrap(),
                range["To"].as_i64().unwrap(),
            );
            if !(from..=to).contains(&i64::from(packet.dport)) {
                continue;
            }
        }
        if matches!(protocol, "1" | "58")
            && let Some(icmp) = entry.get("IcmpTypeCode")
        {
            let fits = |wanted: i64, got: u8| wanted == -1 || wanted == i64::from(got);
            if !fits(icmp["Type"].as_i64().unwrap(), packet.icmp.0)
                || !fits(icmp["Code"].as_i64().unwrap(), packet.icmp.1)
            {
                continue;
            }
        }
        let number = entry["RuleNumber"].as_i64().unwrap();
        let allow = entry["RuleAction"] == "allow";
        return if number >= 32767 {
            (allow, Decided::Default)
        } else {
            (allow, Decided::Entry(format!("rule-{number}")))
        };
    }
    (false, Decided::Default)
}

/// An IBM Cloud VPC network ACL's first-match evaluation, from the JSON as
/// IBM documents it; no match is a deny.
fn ibm_decides(acl: &Value, egress: bool, packet: &Probe) -> (bool, Decided) {
    let direction = if egress { "outbound" } else { "inbound" };
    for rule in acl["rules"].as_array().unwrap() {
        if rule["direction"] != direction {
            continue;
        }
        let within = |field: &str, addr: IpAddr| {
            let net: IpNet = rule[field].as_str().unwrap().parse().unwrap();
            net.contains(&addr)
        };
        if !within("source", packet.src) || !within("destination", packet.dst) {
            continue;
        }
        let protocol = rule["protocol"].as_str().unwrap();
        let fits = match protocol {
            "all" | "any" => true,
            "icmp_tcp_udp" => matches!(packet.proto, 1 | 6 | 17),
            "tcp" => packet.proto == 6,
            "udp" => packet.proto == 17,
            "icmp" => packet.proto == 1,
            other => panic!("protocol {other}"),
        };
        if !fits {
            continue;
        }
        let in_range = |min: &str, max: &str, port: u16| {
            let low = rule[min].as_i64().unwrap_or(0);
            let high = rule[max].as_i64().unwrap_or(65535);
            (low..=high).contains(&i64::from(port))
        };
        if matches!(protocol, "tcp" | "udp")
            && !(in_range("source_port_min", "source_port_max", packet.sport)
                && in_range("destination_port_min", "destination_port_max", packet.dport))
        {
            continue;
        }
        let icmp_fits =
            |field: &str, got: u8| rule[field].as_i64().is_none_or(|v| v == i64::from(got));
        if protocol == "icmp"
            && !(icmp_fits("type", packet.icmp.0) && icmp_fits("code", packet.icmp.1))
        {
            continue;
        }
        let allow = rule["action"] == "allow";
        return (
            allow,
            Decided::Entry(rule["name"].as_str().unwrap().to_owned()),
        );
    }
    (false, Decided::Default)
}

/// A Sakura Cloud packet filter's first-match evaluation, from the JSON as
/// Sakura documents it: IPv4 packets arriving only; no match passes.
fn sakura_decides(filter: &Value, egress: bool, packet: &Probe) -> (bool, Decided) {
    let IpAddr::V4(src) = packet.src else {
        return (true, Decided::Default);
    };
    if egress {
        return (true, Decided::Default);
    }
    let expressions = filter["PacketFilter"]["Expression"].as_array().unwrap();
    for (index, expression) in expressions.iter().enumerate() {
        let network = expression["SourceNetwork"].as_str().unwrap();
        let inside = match network.split_once('/') {
            None if network.is_empty() => true,
            None => network.parse::<std::net::Ipv4Addr>().unwrap() == src,
            Some((addr, mask)) => {
                let addr = u32::from(addr.parse::<std::net::Ipv4Addr>().unwrap());
                let mask = match mask.parse::<u32>() {
                    Ok(len) => u32::MAX.checked_shl(32 - len).unwrap_or(0),
                    Err(_) => u32::from(mask.parse::<std::net::Ipv4Addr>().unwrap()),
                };
                u32::from(src) & mask == addr & mask
            }
        };
        if !inside {
            continue;
        }
        let port_fits = |field: &str, port: u16| {
            let text = expression[field].as_str().unwrap();
            let (low, high) = text.split_once('-').unwrap_or((text, text));
            text.is_empty() || (low.parse().unwrap()..=high.parse().unwrap()).contains(&port)
        };
        let fits = match expression["Protocol"].as_str().unwrap() {
            "tcp" | "udp" if packet.fragment => false,
            "tcp" => packet.proto == 6,
            "udp" => packet.proto == 17,
            "icmp" => packet.proto == 1,
            "fragment" => packet.fragment,
            "ip" => true,
            other => panic!("protocol {other}"),
        } && port_fits("SourcePort", packet.sport)
            && port_fits("DestinationPort", packet.dport);
        if fits {
            let allow = expression["Action"] == "allow";
            return (allow, Decided::Entry(format!("expression-{index}")));
        }
    }
    (true, Decided::Default)
}

/// A packet as both sides see it.
struct Probe {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    icmp: (u8, u8),
    /// A non-first fragment (then ports and ICMP fields are not read).
    fragment: bool,
    frame: Vec<u8>,
}

/// A random packet for one direction; `fragments`: some are non-first
/// fragments.
fn random_probe(rng: &mut StdRng, egress: bool, fragments: bool) -> Probe {
    let v6 = rng.random_bool(0.3);
    let locals: Vec<IpAddr> = LOCAL
        .iter()
        .map(|l| l.parse().unwrap())
        .filter(|l: &IpAddr| l.is_ipv6() == v6)
        .collect();
    let local = *locals.choose(rng).unwrap();
    let remotes: Vec<IpAddr> = REMOTE
        .iter()
        .map(|r| r.parse().unwrap())
        .filter(|r: &IpAddr| r.is_ipv6() == v6)
        .collect();
    let remote = *remotes.choose(rng).unwrap();
    let (src, dst) = if egress {
        (local, remote)
    } else {
        (remote, local)
    };
    let port = |rng: &mut StdRng| *PORTS.choose(rng).unwrap();
    let (sport, dport) = (port(rng), port(rng));
    let icmp = (
        *ICMP_TYPES.choose(rng).unwrap(),
        *[0u8, 4].choose(rng).unwrap(),
    );
    let transport = match rng.random_range(0..4) {
        0 => Transport::Tcp {
            sport,
            dport,
            flags: packet::tcp_flag::ACK,
        },
        1 => Transport::Udp { sport, dport },
        2 => Transport::Icmp {
            icmp_type: icmp.0,
            code: icmp.1,
        },
        _ => Transport::Other {
            proto: *PROTOCOLS.choose(rng).unwrap(),
            payload: vec![0; 8],
        },
    };
    let proto = transport.proto(v6);
    let mut spec = PacketSpec::new(src, dst, transport);
    let fragment = fragments && rng.random_bool(0.15);
    if fragment {
        spec.fragment_offset = rng.random_range(1..100);
        spec.ipv6_fragment_header = v6;
    }
    Probe {
        src,
        dst,
        proto,
        sport,
        dport,
        icmp,
        fragment,
        frame: spec.build(),
    }
}

/// Imports every ACL of `sample` for both directions and holds the
/// kernel's verdicts to `decides`; returns the packets an entry decided
/// (the rest fell to the default).
fn check_format(
    format: Format,
    sample: &str,
    acls: &[(Option<&str>, &Value)],
    decides: fn(&Value, bool, &Probe) -> (bool, Decided),
) -> usize {
    let mut rng = StdRng::seed_from_u64(19);
    let mut decided_by_entry = 0;
    for &(id, raw) in acls {
        let acl = upstream::read(format, sample, id).unwrap();
        for direction in [Direction::Ingress, Direction::Egress] {
            let egress = direction == Direction::Egress;
            let Ok(text) = upstream::rules_toml(&acl, direction) else {
                // A direction the ACL does not judge.
                continue;
            };
            let config = config::parse(Path::new("imported.toml"), &text).unwrap();
            let filter = Filter::load_traced(&compile(&config).unwrap()).unwrap();
            let names: Vec<&str> = config.effective_rules().map(|r| r.name.as_str()).collect();
            for _ in 0..PACKETS {
                let probe = random_probe(&mut rng, egress, format == Format::Sakura);
                let (allow, expected) = decides(raw, egress, &probe);
                let (verdict, outcome) = filter.trace_frame(&probe.frame).unwrap();
                let context = format!(
                    "{format} {} {direction:?}: {} -> {} proto {} ports {}->{} icmp {:?}",
                    acl.id, probe.src, probe.dst, probe.proto, probe.sport, probe.dport, probe.icmp
                );
                let got = match outcome {
                    Outcome::Rule(index) => names[index],
                    Outcome::Reason(reason::DEFAULT_DENY | reason::DEFAULT_ALLOW) => "",
                    // `fragments = "allow"`: the entries that pass them.
                    Outcome::Reason(reason::FRAGMENT_ALLOW) if probe.fragment && allow => {
                        match &expected {
                            Decided::Entry(name) => name.as_str(),
                            Decided::Default => "",
                        }
                    }
                    other => panic!("{context}: decided by {other:?}"),
                };
                // One entry may become several rules, NAME-tcp and so on.
                let same = match &expected {
                    Decided::Entry(name) => {
                        got == name
                            || got
                                .strip_prefix(name.as_str())
                                .is_some_and(|rest| rest.starts_with('-'))
                    }
                    Decided::Default => got.is_empty(),
                };
                assert!(
                    same,
                    "{context}: the ACL says {expected:?}, the kernel {got:?}\n{text}"
                );
                let pass = if allow {
                    xdp_action::PASS
                } else {
                    xdp_action::DROP
                };
                assert_eq!(verdict, pass, "{context}");
                decided_by_entry += usize::from(matches!(expected, Decided::Entry(_)));
            }
        }
    }
    decided_by_entry
}

#[test]
fn imported_aws_nacl_decides_as_the_acl() {
    let document: Value = serde_json::from_str(AWS_SAMPLE).unwrap();
    let acls: Vec<(Option<&str>, &Value)> = document["NetworkAcls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|acl| (acl["NetworkAclId"].as_str(), acl))
        .collect();
    let by_entry = check_format(Format::AwsNacl, AWS_SAMPLE, &acls, aws_decides);
    // Both the entries and the default must have decided many packets.
    let total = PACKETS * 2 * acls.len();
    assert!(
        (total / 4..total * 3 / 4).contains(&by_entry),
        "{by_entry} of {total} by an entry"
    );
}

#[test]
fn imported_sakura_packet_filter_decides_as_the_filter() {
    let document: Value = serde_json::from_str(SAKURA_SAMPLE).unwrap();
    let by_entry = check_format(
        Format::Sakura,
        SAKURA_SAMPLE,
        &[(None, &document)],
        sakura_decides,
    );
    // Ingress IPv4 packets meet an entry (the last denies the rest).
    assert!(
        (PACKETS / 2..PACKETS).contains(&by_entry),
        "{by_entry} of {PACKETS} by an entry"
    );
}

#[test]
fn imported_ibm_vpc_acl_decides_as_the_acl() {
    let document: Value = serde_json::from_str(IBM_SAMPLE).unwrap();
    let by_entry = check_format(
        Format::IbmVpc,
        IBM_SAMPLE,
        &[(None, &document)],
        ibm_decides,
    );
    let total = PACKETS * 2;
    assert!(
        (total / 4..total).contains(&by_entry),
        "{by_entry} of {total} by an entry"
    );
}
