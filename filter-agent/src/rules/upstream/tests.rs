use std::path::Path;

use super::*;
use crate::rules::config;

const SAMPLE: &str = include_str!("../../../../examples/upstream/aws-nacl.json");
const WEB_TIER: &str = "acl-0a1b2c3d4e5f60718";

fn web_tier() -> Acl {
    read(Format::AwsNacl, SAMPLE, Some(WEB_TIER)).unwrap()
}

#[test]
fn aws_entries_in_rule_number_order_per_direction() {
    let acl = web_tier();
    let order = |direction| {
        acl.entries
            .iter()
            .filter(|e| e.direction == direction)
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        order(Direction::Ingress),
        [
            "rule-90", "rule-100", "rule-110", "rule-120", "rule-125", "rule-130", "rule-140",
            "rule-150", "rule-160"
        ]
    );
    assert_eq!(order(Direction::Egress).len(), 6);
    assert_eq!(acl.default, Action::Deny);
    let icmp = acl.entries.iter().find(|e| e.name == "rule-150").unwrap();
    assert_eq!(
        (icmp.proto, icmp.icmp_type, icmp.icmp_code),
        (Some(1), Some(3), Some(4))
    );
    // Ports of protocols other than TCP and UDP are ignored, as AWS does.
    let esp = acl
        .entries
        .iter()
        .find(|e| e.name == "rule-140" && e.direction == Direction::Egress);
    assert_eq!(esp.unwrap().dst_ports, None);
}

#[test]
fn imported_rules_are_a_valid_rules_file() {
    let acl = web_tier();
    for direction in [Direction::Ingress, Direction::Egress] {
        let text = rules_toml(&acl, direction).unwrap();
        let parsed = config::parse(Path::new("imported.toml"), &text)
            .unwrap_or_else(|err| panic!("{err}\n{text}"));
        let count = acl
            .entries
            .iter()
            .filter(|e| e.direction == direction)
            .count();
        assert_eq!(parsed.rules.len(), count, "{text}");
        assert_eq!(parsed.filter.default, Action::Deny);
    }
    let ingress = rules_toml(&acl, Direction::Ingress).unwrap();
    assert!(
        ingress.contains(
            "# rule 130 (ingress)\n[[rule]]\nname = \"rule-130\"\naction = \"allow\"\n\
             proto = \"tcp\"\nsrc = \"0.0.0.0/0\"\ndport = \"49152-65535\"\n"
        ),
        "{ingress}"
    );
}

#[test]
fn one_acl_must_be_chosen() {
    let err = read(Format::AwsNacl, SAMPLE, None).unwrap_err().to_string();
    assert!(
        err.contains("pick one with --acl") && err.contains(WEB_TIER),
        "{err}"
    );
    let err = read(Format::AwsNacl, SAMPLE, Some("acl-nope"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("no ACL acl-nope (there are: "), "{err}");
}

/// The web tier's ACL with its entry 110 (inbound) changed by `edit`.
fn with_entry(edit: impl Fn(&mut serde_json::Value)) -> String {
    let mut document: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    let entries = document["NetworkAcls"][0]["Entries"]
        .as_array_mut()
        .unwrap();
    let entry = entries
        .iter_mut()
        .find(|e| e["RuleNumber"] == 110 && e["Egress"] == false)
        .unwrap();
    edit(entry);
    document.to_string()
}

#[test]
fn bad_entries_name_the_entry_and_the_field() {
    let error = |text: &str| {
        read(Format::AwsNacl, text, Some(WEB_TIER))
            .unwrap_err()
            .to_string()
    };
    let entry = "acl-0a1b2c3d4e5f60718 rule 110 (ingress): ";
    let cases: [(String, &str); 5] = [
        (
            with_entry(|e| e["Protocol"] = "tcp".into()),
            "Protocol \"tcp\" is not -1 or a number 0-255",
        ),
        (
            with_entry(|e| e["CidrBlock"] = "10.0.0.300/8".into()),
            "CidrBlock \"10.0.0.300/8\" is not a CIDR block",
        ),
        (
            with_entry(|e| e["PortRange"] = serde_json::json!({"From": 90, "To": 80})),
            "PortRange 90-80 is not a range of ports",
        ),
        (
            with_entry(|e| e["RuleAction"] = "accept".into()),
            "RuleAction \"accept\" is not allow or deny",
        ),
        (
            with_entry(|e| e["Ipv6CidrBlock"] = "::/0".into()),
            "CidrBlock exactly one of CidrBlock and Ipv6CidrBlock is needed",
        ),
    ];
    for (text, message) in cases {
        assert_eq!(error(&text), format!("{entry}{message}"));
    }
    // Host bits are dropped, as AWS stores the block.
    let canonical = read(
        Format::AwsNacl,
        &with_entry(|e| e["CidrBlock"] = "10.1.2.3/8".into()),
        Some(WEB_TIER),
    );
    let rule = canonical
        .unwrap()
        .entries
        .into_iter()
        .find(|e| e.name == "rule-110")
        .unwrap();
    assert_eq!(rule.remote, Some("10.0.0.0/8".parse().unwrap()));
    assert!(error("not json").starts_with("not the JSON of `aws ec2 describe-network-acls`: "));
    assert!(
        error("{\"NetworkAcls\": [{\"Entries\": []}]}").contains("missing field `NetworkAclId`")
    );
}

const SAKURA: &str = include_str!("../../../../examples/upstream/sakura.json");

/// The sample packet filter with `edit` applied to its expressions.
fn sakura_with(edit: impl Fn(&mut Vec<serde_json::Value>)) -> Result<Acl, String> {
    let mut document: serde_json::Value = serde_json::from_str(SAKURA).unwrap();
    let expressions = document["PacketFilter"]["Expression"]
        .as_array_mut()
        .unwrap();
    edit(expressions);
    read(Format::Sakura, &document.to_string(), None).map_err(|err| err.to_string())
}

#[test]
fn sakura_filters_judge_ipv4_ingress_and_pass_the_rest() {
    let acl = sakura_with(|_| {}).unwrap();
    assert_eq!(
        (acl.default, acl.fragments),
        (Action::Allow, Fragments::Allow)
    );
    let scanners = &acl.entries[0];
    assert_eq!(scanners.remote, Some("198.51.100.0/24".parse().unwrap()));
    // The fragment entry is the fragments setting, not a rule.
    assert!(acl.entries.iter().all(|e| e.name != "expression-5"));
    let text = rules_toml(&acl, Direction::Ingress).unwrap();
    assert!(text.contains("name = \"expression-6\"\naction = \"allow\"\nproto = \"udp\"\nsrc = \"0.0.0.0/0\"\nsport = 123\n"), "{text}");
    // A tcp entry without ports still needs them (fragments do not match).
    assert!(text.contains("name = \"expression-9\"\naction = \"allow\"\nproto = \"tcp\"\nsrc = \"203.0.113.9/32\"\nsport = \"0-65535\"\n"), "{text}");
    let egress = rules_toml(&acl, Direction::Egress).unwrap_err().to_string();
    assert_eq!(egress, "web-servers judges ingress packets only");
}

#[test]
fn sakura_entries_that_cannot_be_expressed_are_named() {
    let set = |index: usize, field: &'static str, value: &'static str| {
        move |e: &mut Vec<serde_json::Value>| e[index][field] = value.into()
    };
    let cases: [(Result<Acl, String>, &str); 6] = [
        (
            sakura_with(set(2, "SourceNetwork", "10.0.0.0/255.0.255.0")),
            "Expression[2]: SourceNetwork \"10.0.0.0/255.0.255.0\" is not an IPv4 address or network",
        ),
        (
            sakura_with(set(2, "DestinationPort", "70000")),
            "Expression[2]: DestinationPort \"70000\" is not a port or a range N-M of 1-65535",
        ),
        (
            sakura_with(set(2, "Protocol", "sctp")),
            "Expression[2]: Protocol \"sctp\" is not tcp, udp, icmp, fragment or ip",
        ),
        (
            sakura_with(set(5, "SourceNetwork", "192.0.2.0/24")),
            "Expression[5]: SourceNetwork of a fragment entry cannot be expressed",
        ),
        (
            sakura_with(set(5, "Action", "deny")),
            "Expression[5]: Protocol cannot be expressed: Expression[4] (allow) decides some fragments first",
        ),
        (
            sakura_with(set(4, "DestinationPort", "8")),
            "Expression[4]: DestinationPort is only for tcp and udp",
        ),
    ];
    for (result, message) in cases {
        let err = result.unwrap_err();
        assert!(
            err.starts_with(&format!("web-servers {message}")),
            "{err}\nwanted: {message}"
        );
    }
}

/// Incident 1: a Sakura-style filter allowing return traffic to
/// 32768-61000 and a namespace using 1024-65000.
#[test]
fn predicts_incident_one() {
    let acl = sakura_with(|_| {}).unwrap();
    let blocked = predict::blocked(&acl, (1024, 65000));
    let ranges: Vec<(&str, (u16, u16), Option<&str>)> = blocked
        .iter()
        .map(|b| (b.proto, b.ports, b.entry.as_deref()))
        .collect();
    let deny_all = Some("Expression[10]: Deny ALL");
    assert_eq!(
        ranges,
        [
            ("tcp", (1024, 32767), deny_all),
            ("tcp", (61001, 65000), deny_all),
            ("udp", (1024, 32767), deny_all),
            ("udp", (61001, 65000), deny_all),
        ]
    );
    assert_eq!(predict::widest_allowed(&acl), Some((32768, 61000)));
    assert!(predict::blocked(&acl, (32768, 60999)).is_empty());
}

/// Incident 3: an AWS NACL allowing return traffic to 49152-65535 only,
/// and a masquerade that may use any port from 1024 or the Linux default.
#[test]
fn predicts_incident_three() {
    let acl = web_tier();
    let blocked = predict::blocked(&acl, (32768, 60999));
    let ranges: Vec<(&str, (u16, u16))> = blocked.iter().map(|b| (b.proto, b.ports)).collect();
    assert_eq!(ranges, [("tcp", (32768, 49151)), ("udp", (32768, 49151))]);
    assert!(
        blocked.iter().all(|b| b.entry.is_none()),
        "the default denies them"
    );
    // Port 443 is allowed by its own entry (rule 120), so a masquerade
    // over 1024-65535 is blocked around it.
    let nat = predict::blocked(&acl, (1024, 65535));
    assert!(
        nat.iter()
            .any(|b| b.proto == "tcp" && b.ports == (1024, 49151)),
        "{nat:?}"
    );
    assert_eq!(predict::widest_allowed(&acl), Some((49152, 65535)));
}

/// An ACL that also judges outbound packets by their source port: the
/// IBM sample lets connections out only from 32768-60999.
#[test]
fn predicts_outbound_source_ports() {
    let text = include_str!("../../../../examples/upstream/ibm-vpc.json");
    let acl = read(Format::IbmVpc, text, None).unwrap();
    let blocked = predict::blocked(&acl, (1024, 65000));
    let outbound: Vec<(&str, (u16, u16), Option<&str>)> = blocked
        .iter()
        .filter(|b| b.direction == "outbound")
        .map(|b| (b.proto, b.ports, b.entry.as_deref()))
        .collect();
    assert_eq!(
        outbound,
        [
            ("tcp", (1024, 32767), None),
            ("tcp", (61000, 65000), None),
            ("udp", (1024, 32767), None),
            ("udp", (61000, 65000), None),
        ]
    );
    let deny = Some("rule 7: deny-all-inbound (ingress)");
    assert!(
        blocked.iter().any(|b| b.direction == "inbound"
            && b.ports == (1024, 32767)
            && b.entry.as_deref() == deny),
        "{blocked:?}"
    );
    assert_eq!(predict::widest_allowed(&acl), Some((32768, 60999)));
}

/// A protocol an ACL blocks on every port of a direction (UDP here) does
/// not keep the others from having a range.
#[test]
fn a_protocol_blocked_everywhere_leaves_the_range_to_the_others() {
    let nacl = r#"{"NetworkAcls": [{"NetworkAclId": "acl-1", "Entries": [
     {"CidrBlock": "0.0.0.0/0", "Egress": false, "PortRange": {"From": 49152, "To": 65535}, "Protocol": "6", "RuleAction": "allow", "RuleNumber": 100},
     {"CidrBlock": "0.0.0.0/0", "Egress": true, "Protocol": "-1", "RuleAction": "allow", "RuleNumber": 100}]}]}"#;
    let acl = read(Format::AwsNacl, nacl, None).unwrap();
    assert_eq!(
        predict::widest_allowed(&acl),
        Some((49152, 65535)),
        "{:?}",
        predict::decide(&acl, (1024, 65535))
    );
}

/// Found by the `upstream` fuzzer: two IBM rules of one name imported as
/// two rules of one name, which the rules file refuses. Each keeps a name
/// of its own.
#[test]
fn entries_of_one_name_import_as_rules_of_their_own() {
    let rule = |action: &str| {
        format!(
            r#"{{"name": "return-tcp", "action": "{action}", "direction": "inbound", "protocol": "tcp",
              "source": "0.0.0.0/0", "destination": "0.0.0.0/0"}}"#
        )
    };
    let text = format!(
        r#"{{"name": "acl", "rules": [{}, {}]}}"#,
        rule("deny"),
        rule("allow")
    );
    let acl = read(Format::IbmVpc, &text, None).unwrap();
    let rules = rules_toml(&acl, Direction::Ingress).unwrap();
    let config = config::parse(Path::new("imported.toml"), &rules).unwrap();
    let names: Vec<&str> = config.rules.iter().map(|rule| rule.name.as_str()).collect();
    assert_eq!(names, ["return-tcp", "return-tcp-2"]);
}

#[test]
fn names_and_values_from_the_acl_keep_an_error_one_line() {
    let err = UpstreamError::Field {
        entry: "acl\nrule 1".into(),
        field: "RuleAction",
        message: "\"al\nlow\" is not allow or deny".into(),
    };
    assert_eq!(
        err.to_string(),
        "acl\\nrule 1: RuleAction \"al\\nlow\" is not allow or deny"
    );
}
