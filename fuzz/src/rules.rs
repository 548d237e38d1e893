//! The rules file: parse + validate + lint + compile.

use std::{fmt::Write as _, path::Path};

use arbitrary::Arbitrary;
use filter_agent::rules::{
    compile::{CompileError, compile},
    config::{self, ConfigError},
    lint,
};

use crate::assert_one_line;

/// The name errors locate in.
const FILE: &str = "fuzz.toml";

/// One rules file's text: an error names where (or the file it could not
/// read) in one line; an accepted file lints, compiles, and reads again as
/// the same rules with the same warnings.
pub fn check_text(text: &str) {
    let path = Path::new(FILE);
    match config::parse(path, text) {
        Err(err @ ConfigError::Invalid { .. }) => {
            if let ConfigError::Invalid { location, .. } = &err {
                assert!(location.line >= 1 && location.column >= 1, "{err}");
            }
            // As the operator sees it: the file's own text quoted in the
            // message has its control characters escaped.
            assert_one_line(&err.to_string());
        }
        Err(err) => assert_one_line(&err.to_string()),
        Ok(config) => {
            let again = config::parse(path, text).expect("accepted once, refused again");
            assert_eq!(config, again, "read twice, two rule sets");
            assert_eq!(lint::lint(&config), lint::lint(&again));
            match compile(&config) {
                // The memory budget is the file's own to set.
                Ok(_) | Err(CompileError::MapMemory { .. }) => {}
                Err(err) => panic!("accepted but does not compile: {err}"),
            }
        }
    }
}

/// A rules file as a structure whose values come from pools of valid and
/// nearly valid ones, so that most inputs get past TOML into validation.
#[derive(Arbitrary, Debug)]
pub struct RulesSpec {
    default_deny: bool,
    mode: u8,
    fragments: u8,
    max_map_mib: Option<u8>,
    guard: Option<GuardSpec>,
    rules: Vec<RuleSpec>,
}

#[derive(Arbitrary, Debug)]
struct GuardSpec {
    ephemeral: (u16, u16),
    services: Vec<u16>,
    action: u8,
}

#[derive(Arbitrary, Debug)]
pub(crate) struct RuleSpec {
    name: u8,
    deny: bool,
    proto: Option<u8>,
    src: Option<Vec<u8>>,
    dst: Option<Vec<u8>>,
    sport: Option<Vec<u8>>,
    dport: Option<Vec<u8>>,
    tcp_flags: Option<Vec<(bool, u8)>>,
    icmp_type: Option<Vec<u8>>,
    icmp_code: Option<u8>,
    notrack: bool,
    limit: Option<(u8, u8, bool)>,
}

/// Prefixes that nest and overlap, both families, and a few that are not.
/// (`@country:` sets read the whole GeoIP table: rules_text reaches them.)
pub(crate) const NETS: [&str; 13] = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.2.0/24",
    "10.1.2.3",
    "192.0.2.0/24",
    "198.51.100.0/22",
    "::/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "2001:db8:1::3",
    "10.1.2.3/33",
    "@nosuchset",
    "",
];
const PORTS: [&str; 10] = [
    "22",
    "53",
    "443",
    "0",
    "65535",
    "\"1024-65535\"",
    "\"32768-60999\"",
    "\"9-3\"",
    "70000",
    "\"x\"",
];
const PROTOS: [&str; 8] = [
    "\"tcp\"",
    "\"udp\"",
    "\"icmp\"",
    "\"icmpv6\"",
    "\"any\"",
    "47",
    "256",
    "\"sctp\"",
];
const FLAGS: [&str; 9] = [
    "fin", "syn", "rst", "psh", "ack", "urg", "ece", "cwr", "xyz",
];
const ICMP_TYPES: [&str; 6] = ["\"echo-request\"", "3", "8", "128", "135", "\"nope\""];
const MODES: [&str; 3] = ["enforce", "monitor", "audit"];
const FRAGMENTS: [&str; 4] = ["match-l3", "allow", "deny", "maybe"];
const GUARD_ACTIONS: [&str; 4] = ["count", "drop", "off", "loud"];

fn pick<'a>(pool: &[&'a str], index: u8) -> &'a str {
    pool[usize::from(index) % pool.len()]
}

fn list(pool: &[&str], indices: &[u8]) -> String {
    match indices {
        [one] => pick(pool, *one).to_owned(),
        many => {
            let items: Vec<&str> = many.iter().map(|&index| pick(pool, index)).collect();
            format!("[{}]", items.join(", "))
        }
    }
}

fn quoted_list(pool: &[&str], indices: &[u8]) -> String {
    let quoted: Vec<String> = pool.iter().map(|item| format!("\"{item}\"")).collect();
    let quoted: Vec<&str> = quoted.iter().map(String::as_str).collect();
    list(&quoted, indices)
}

impl RulesSpec {
    pub fn to_toml(&self) -> String {
        self.render(true)
    }

    /// The rules file; without `limits`, no rule has a rate limit.
    pub(crate) fn render(&self, limits: bool) -> String {
        let mut out = String::from("[filter]\n");
        let default = if self.default_deny { "deny" } else { "allow" };
        let _ = writeln!(out, "default = \"{default}\"");
        let _ = writeln!(out, "mode = \"{}\"", pick(&MODES, self.mode));
        let _ = writeln!(out, "fragments = \"{}\"", pick(&FRAGMENTS, self.fragments));
        if let Some(mib) = self.max_map_mib {
            let _ = writeln!(out, "max_map_mib = {mib}");
        }
        if let Some(guard) = &self.guard {
            let (low, high) = guard.ephemeral;
            let _ = writeln!(out, "[guard]\nephemeral = \"{low}-{high}\"");
            let _ = writeln!(out, "services = {:?}", guard.services);
            let _ = writeln!(out, "action = \"{}\"", pick(&GUARD_ACTIONS, guard.action));
        }
        for (index, rule) in self.rules.iter().enumerate() {
            rule.render(&mut out, index, limits);
        }
        out
    }
}

impl RuleSpec {
    fn render(&self, out: &mut String, index: usize, limits: bool) {
        // Mostly unique names, a duplicate now and then.
        let name = if self.name < 240 { index } else { 0 };
        let action = if self.deny { "deny" } else { "allow" };
        let _ = writeln!(out, "\n[[rule]]\nname = \"r{name}\"\naction = \"{action}\"");
        if let Some(proto) = self.proto {
            let _ = writeln!(out, "proto = {}", pick(&PROTOS, proto));
        }
        let fields = [("src", &self.src), ("dst", &self.dst)];
        for (key, nets) in fields {
            if let Some(nets) = nets.as_deref().filter(|nets| !nets.is_empty()) {
                let _ = writeln!(out, "{key} = {}", quoted_list(&NETS, nets));
            }
        }
        for (key, ports) in [("sport", &self.sport), ("dport", &self.dport)] {
            if let Some(ports) = ports.as_deref().filter(|ports| !ports.is_empty()) {
                let _ = writeln!(out, "{key} = {}", list(&PORTS, ports));
            }
        }
        if let Some(flags) = &self.tcp_flags {
            let flags: Vec<String> = flags
                .iter()
                .map(|&(clear, flag)| {
                    format!("{}{}", if clear { "!" } else { "" }, pick(&FLAGS, flag))
                })
                .collect();
            let _ = writeln!(out, "tcp_flags = \"{}\"", flags.join(","));
        }
        if let Some(types) = self.icmp_type.as_deref().filter(|types| !types.is_empty()) {
            let _ = writeln!(out, "icmp_type = {}", list(&ICMP_TYPES, types));
        }
        if let Some(code) = self.icmp_code {
            let _ = writeln!(out, "icmp_code = {code}");
        }
        if self.notrack {
            let _ = writeln!(out, "notrack = true");
        }
        if let Some((rate, burst, per_source)) = self.limit.filter(|_| limits) {
            let per = if per_source { "source" } else { "rule" };
            let _ = writeln!(
                out,
                "limit = {{ rate = \"{rate}/s\", burst = {burst}, per = \"{per}\" }}"
            );
        }
    }
}
