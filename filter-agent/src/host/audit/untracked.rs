//! Whether the host's own stateful ruleset drops what `notrack = true`
//! keeps out of conntrack: untracked packets are neither new nor
//! established, so a ruleset that accepts a service only by `ct state`
//! lets them fall to its policy. Read from `nft -j list ruleset`; a
//! finding only where the answer is certain (a chain with a jump, or a
//! rule the audit cannot evaluate that accepts, gives none).

use serde_json::Value;

use super::{Finding, FindingKind};
use crate::rules::config::Rule;

/// Findings for the notrack `rules` against the ruleset `json`.
pub fn findings(json: &Value, rules: &[Rule]) -> Vec<Finding> {
    let mut found = Vec::new();
    for rule in rules.iter().filter(|rule| rule.notrack) {
        let proto = match rule.proto {
            Some(filter_common::wire::IPPROTO_UDP) => "udp",
            _ => "tcp",
        };
        let Some(&(port, _)) = rule.dport.as_ref().and_then(|ports| ports.first()) else {
            continue;
        };
        for chain in input_chains_dropping(json) {
            if verdict(json, &chain, proto, port) != Some(Verdict::Drop) {
                continue;
            }
            let [family, table, name] = &chain;
            found.push(Finding {
                kind: FindingKind::Notrack,
                problem: format!(
                    "rule {:?} keeps {proto} port {port} out of conntrack (notrack = true), but the \
                     host's ruleset drops untracked packets to it (table {family} {table}, chain \
                     {name}, policy drop, accepts it only by ct state)",
                    rule.name
                ),
                fix: format!(
                    "nft insert rule {family} {table} {name} {proto} dport {port} ct state untracked accept"
                ),
                keep: Some("add the same rule to the ruleset's file (/etc/nftables.conf)".to_owned()),
                alternative: None,
            });
        }
    }
    found
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Accept,
    Drop,
}

/// (family, table, chain) of every base chain on the input hook whose
/// policy is drop.
fn input_chains_dropping(json: &Value) -> Vec<[String; 3]> {
    objects(json, "chain")
        .filter(|chain| chain["hook"] == "input" && chain["policy"] == "drop")
        .filter_map(|chain| {
            let text = |key: &str| chain[key].as_str().map(str::to_owned);
            Some([text("family")?, text("table")?, text("name")?])
        })
        .collect()
}

fn objects<'a>(json: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> {
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(move |object| object.get(kind))
}

/// What `chain` does with an untracked `proto` packet to `port`: the first
/// rule that surely matches decides, the policy (drop) if none does;
/// `None` when a rule that may match accepts, or jumps.
fn verdict(json: &Value, chain: &[String; 3], proto: &str, port: u16) -> Option<Verdict> {
    let rules = objects(json, "rule").filter(|rule| {
        rule["family"] == chain[0] && rule["table"] == chain[1] && rule["chain"] == chain[2]
    });
    'rules: for rule in rules {
        let mut sure = true;
        let mut verdict = None;
        for expr in rule["expr"].as_array().into_iter().flatten() {
            if let Some(matched) = expr.get("match") {
                match matches(matched, proto, port) {
                    Some(false) => continue 'rules,
                    Some(true) => {}
                    None => sure = false,
                }
            } else if expr.get("jump").is_some() || expr.get("goto").is_some() {
                // Where it leads is not followed: no certainty.
                return None;
            } else if expr.get("accept").is_some() {
                verdict = Some(Verdict::Accept);
            } else if expr.get("drop").is_some() || expr.get("reject").is_some() {
                verdict = Some(Verdict::Drop);
            }
        }
        match (verdict, sure) {
            (Some(verdict), true) => return Some(verdict),
            (Some(Verdict::Accept), false) => return None,
            _ => {}
        }
    }
    Some(Verdict::Drop)
}

/// Whether a match holds for an untracked `proto` packet to `port`:
/// `None` for what the audit does not evaluate (addresses, interfaces
/// other than loopback).
fn matches(matched: &Value, proto: &str, port: u16) -> Option<bool> {
    let (left, right, op) = (&matched["left"], &matched["right"], &matched["op"]);
    let holds = if left["ct"]["key"] == "state" {
        contains(right, &Value::from("untracked"))
    } else if left["payload"]["field"] == "dport" {
        left["payload"]["protocol"] == proto && contains(right, &Value::from(port))
    } else if left["meta"]["key"] == "l4proto" {
        contains(right, &Value::from(proto))
    } else if matches!(left["meta"]["key"].as_str(), Some("iif" | "iifname")) && right == "lo" {
        // The service's packets come in on a filtered interface.
        false
    } else {
        return None;
    };
    Some(if op == "!=" { !holds } else { holds })
}

/// Whether `right` (a value, a list, a set or a range) holds `value`.
fn contains(right: &Value, value: &Value) -> bool {
    match right {
        Value::Array(items) => items.iter().any(|item| contains(item, value)),
        Value::Object(object) => {
            if let Some(set) = object.get("set") {
                return contains(set, value);
            }
            let Some([low, high]) = object
                .get("range")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
            else {
                return false;
            };
            let (Some(low), Some(high), Some(value)) =
                (low.as_u64(), high.as_u64(), value.as_u64())
            else {
                return false;
            };
            (low..=high).contains(&value)
        }
        _ => right == value,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::rules::config;

    /// `nft -j list ruleset` of a stateful input chain (trimmed to what
    /// the audit reads).
    fn ruleset(service_rule: &str) -> Value {
        let text = format!(
            r#"{{"nftables": [
  {{"chain": {{"family": "inet", "table": "host", "name": "input", "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}}}},
  {{"rule": {{"family": "inet", "table": "host", "chain": "input", "expr": [
    {{"match": {{"op": "in", "left": {{"ct": {{"key": "state"}}}}, "right": ["established", "related"]}}}}, {{"accept": null}}]}}}},
  {{"rule": {{"family": "inet", "table": "host", "chain": "input", "expr": [
    {{"match": {{"op": "in", "left": {{"ct": {{"key": "state"}}}}, "right": "invalid"}}}}, {{"drop": null}}]}}}},
  {{"rule": {{"family": "inet", "table": "host", "chain": "input", "expr": [
    {{"match": {{"op": "==", "left": {{"meta": {{"key": "iif"}}}}, "right": "lo"}}}}, {{"accept": null}}]}}}},
  {{"rule": {{"family": "inet", "table": "host", "chain": "input", "expr": {service_rule}}}}}
]}}"#
        );
        serde_json::from_str(&text).unwrap()
    }

    fn notrack(port: u16) -> Vec<Rule> {
        let text = format!(
            "[filter]\ndefault = \"allow\"\n[[rule]]\nname = \"web\"\naction = \"allow\"\n\
             proto = \"tcp\"\ndport = {port}\nnotrack = true\n"
        );
        config::parse(Path::new("r.toml"), &text).unwrap().rules
    }

    const BY_STATE: &str = r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": [8080, {"range": [9000, 9100]}]}}},
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}, {"accept": null}]"#;
    const BY_PORT: &str = r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"range": [8000, 8100]}}}, {"accept": null}]"#;

    #[test]
    fn flags_a_service_accepted_only_by_state() {
        let found = findings(&ruleset(BY_STATE), &notrack(9050));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].fix,
            "nft insert rule inet host input tcp dport 9050 ct state untracked accept"
        );
        assert!(findings(&ruleset(BY_PORT), &notrack(8080)).is_empty());
        // Not the service's port: the policy drops it either way, but
        // only a notrack rule's own port is judged.
        assert_eq!(findings(&ruleset(BY_PORT), &notrack(22)).len(), 1);
    }

    #[test]
    fn uncertainty_gives_no_finding() {
        let guarded = r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.0.0.1"}}, {"accept": null}]"#;
        assert!(findings(&ruleset(guarded), &notrack(8080)).is_empty());
        let jump = r#"[{"jump": {"target": "services"}}]"#;
        assert!(findings(&ruleset(jump), &notrack(8080)).is_empty());
        let untracked = r#"[{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["untracked"]}}, {"accept": null}]"#;
        assert!(findings(&ruleset(untracked), &notrack(8080)).is_empty());
    }
}
