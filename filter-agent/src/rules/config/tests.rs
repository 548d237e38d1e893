//! Reading rules files: settings, rules, sets, countries, the guard and
//! upstream ACLs.

use super::*;
use filter_common::wire::{IPPROTO_TCP, tcp_flag};

pub(super) fn parse_ok(text: &str) -> Config {
    parse(Path::new("rules.toml"), text).unwrap_or_else(|err| panic!("{err}"))
}

pub(super) fn error_of(text: &str) -> String {
    parse(Path::new("rules.toml"), text)
        .unwrap_err()
        .to_string()
}

pub(super) const HEAD: &str = "[filter]\ndefault = \"deny\"\n";

pub(super) fn with_rule(body: &str) -> String {
    format!("{HEAD}[[rule]]\nname = \"r\"\naction = \"allow\"\n{body}\n")
}

#[test]
fn reads_filter_settings() {
    let config =
        parse_ok("[filter]\ndefault = \"deny\"\nmode = \"monitor\"\nfragments = \"allow\"\n");
    assert_eq!(config.filter.default, Action::Deny);
    assert_eq!(config.filter.mode, Mode::Monitor);
    assert_eq!(config.filter.fragments, Fragments::Allow);
    assert!(config.rules.is_empty());
}

#[test]
fn defaults_are_enforce_and_match_l3() {
    let config = parse_ok("[filter]\ndefault = \"allow\"\n");
    assert_eq!(config.filter.mode, Mode::Enforce);
    assert_eq!(config.filter.fragments, Fragments::MatchL3);
}

#[test]
fn reads_a_full_rule() {
    let config = parse_ok(&with_rule(
        "proto = \"tcp\"\nsrc = [\"203.0.113.0/24\", \"198.51.100.7\"]\ndst = \"10.0.0.0/8\"\n\
         sport = \"1024-65535\"\ndport = [22, \"2222\", \"8000-8080\"]\ntcp_flags = \"syn, !ack\"",
    ));
    let rule = &config.rules[0];
    assert_eq!(rule.name, "r");
    assert_eq!(rule.action, Action::Allow);
    assert_eq!(rule.proto, Some(IPPROTO_TCP));
    let src: Vec<String> = rule
        .src
        .as_ref()
        .unwrap()
        .nets
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(src, ["203.0.113.0/24", "198.51.100.7/32"]);
    assert_eq!(rule.sport, Some(vec![(1024, 65535)]));
    assert_eq!(rule.dport, Some(vec![(22, 22), (2222, 2222), (8000, 8080)]));
    assert_eq!(
        rule.tcp_flags,
        Some(TcpFlags {
            set: tcp_flag::SYN,
            clear: tcp_flag::ACK
        })
    );
    assert_eq!(rule.location.line, 3);
    assert!(rule.needs_l4());
}

#[test]
fn reads_rate_limits() {
    let limit = |body: &str| parse_ok(&with_rule(body)).rules[0].limit;
    let second = 1_000_000_000;
    assert_eq!(
        limit("limit = { rate = \"1000/s\" }"),
        Some(Limit {
            packets: 1000,
            per_ns: second,
            burst: 100,
            per_source: None,
        })
    );
    let per_source =
        limit("limit = { rate = \"30/min\", burst = 5, per = \"source\", ipv4_prefix = 24 }")
            .unwrap();
    assert_eq!(per_source.per_source, Some((24, 64)));
    assert_eq!(
        (per_source.burst, per_source.interval_ns()),
        (5, 2 * second)
    );
    assert_eq!(per_source.to_string(), "30/min burst 5 per source /24 /64");
    // A bare number is packets per second; a slow rate has a burst of one.
    assert_eq!(limit("limit = { rate = 5 }").unwrap().burst, 1);
    assert_eq!(limit("").map(|l| l.burst), None);
    let denied = "[filter]\ndefault = \"allow\"\n[[rule]]\nname = \"d\"\naction = \"deny\"\n\
                  limit = { rate = 5 }\n";
    let message = error_of(denied);
    assert!(
        message.starts_with("rules.toml:6:9: ") && message.contains("limit needs action"),
        "{message}"
    );
    let sources = "[filter]\ndefault = \"allow\"\nlimit_sources = 0\n";
    assert!(error_of(sources).starts_with("rules.toml:3:17: limit_sources must be"));
}

#[test]
fn neighbour_discovery_passes_unless_denied_by_name() {
    let config = parse_ok(&with_rule("proto = \"icmpv6\""));
    assert_eq!(
        config.implicit_nd.as_ref().unwrap().icmp_type,
        Some(vec![133, 134, 135, 136, 137])
    );
    assert_eq!(config.effective_rules().count(), 2);
    let denied = format!(
        "{HEAD}[[rule]]\nname = \"no-ra\"\naction = \"deny\"\nproto = \"icmpv6\"\nicmp_type = \"router-advertisement\"\n"
    );
    assert!(parse_ok(&denied).implicit_nd.is_none());
}

#[test]
fn icmp_types_by_name_and_number() {
    let config = parse_ok(&with_rule(
        "proto = \"icmpv6\"\nicmp_type = [\"echo-request\", 135, \"neighbour-advertisement\"]\nicmp_code = 0",
    ));
    assert_eq!(config.rules[0].icmp_type, Some(vec![128, 135, 136]));
    assert_eq!(config.rules[0].icmp_code, Some(vec![0]));
    let config = parse_ok(&with_rule(
        "proto = \"icmp\"\nicmp_type = \"destination-unreachable\"",
    ));
    assert_eq!(config.rules[0].icmp_type, Some(vec![3]));
}

#[test]
fn sets_are_shared_and_expand() {
    let config = parse_ok(&format!(
        "{HEAD}[sets]\nbad = [\"198.51.100.0/24\", \"2001:db8:bad::/48\"]\n\
         [[rule]]\nname = \"a\"\naction = \"deny\"\nsrc = \"@bad\"\n\
         [[rule]]\nname = \"b\"\naction = \"deny\"\ndst = \"@bad\"\n\
         [[rule]]\nname = \"c\"\naction = \"deny\"\nsrc = [\"@bad\", \"192.0.2.1\"]\n"
    ));
    let [a, b, c] = &config.rules[..] else {
        panic!()
    };
    assert!(Arc::ptr_eq(
        a.src.as_ref().unwrap(),
        b.dst.as_ref().unwrap()
    ));
    assert_eq!(a.src.as_ref().unwrap().set.as_deref(), Some("bad"));
    assert_eq!(c.src.as_ref().unwrap().nets.len(), 3);
}

#[test]
fn set_files_relative_to_the_rules_file() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("partners.txt"),
        "# partners\n192.0.2.0/24\n\n  2001:db8::/32 # v6\n",
    )
    .unwrap();
    let rules = dir.path().join("rules.toml");
    fs::write(&rules, format!("{HEAD}[sets]\np = {{ file = \"partners.txt\" }}\n[[rule]]\nname = \"p\"\naction = \"allow\"\nsrc = \"@p\"\n")).unwrap();
    let config = load(&rules).unwrap();
    assert_eq!(config.rules[0].src.as_ref().unwrap().nets.len(), 2);

    fs::write(
        dir.path().join("partners.txt"),
        "192.0.2.0/24\n  192.0.2.300/24\n",
    )
    .unwrap();
    let message = load(&rules).unwrap_err().to_string();
    let expected = format!("{}:2:3: ", dir.path().join("partners.txt").display());
    assert!(message.starts_with(&expected), "{message}");
}

#[test]
fn set_files_are_found_for_watching() {
    let text = format!(
        "{HEAD}[sets]\na = {{ file = \"a.txt\" }}\nb = [\"10.0.0.0/8\"]\nc = {{ file = \"/etc/c.txt\" }}\n"
    );
    assert_eq!(
        set_files(Path::new("/srv/rules.toml"), &text),
        vec![PathBuf::from("/srv/a.txt"), PathBuf::from("/etc/c.txt")]
    );
    assert!(set_files(Path::new("r.toml"), "not toml [").is_empty());
}

#[test]
fn country_sets_come_from_the_geoip_files() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("geo")).unwrap();
    fs::write(
        dir.path().join("geo").join(geoip::V4_FILE),
        geoip::tests::tiny(),
    )
    .unwrap();
    let rules = dir.path().join("r.toml");
    let text = "[filter]\ndefault = \"allow\"\ngeoip = \"geo\"\n\
        [[rule]]\nname = \"a\"\naction = \"deny\"\nsrc = \"@country:DE\"\n\
        [[rule]]\nname = \"b\"\naction = \"deny\"\ndst = [\"@country:de\", \"@country:US\"]\n";
    fs::write(&rules, text).unwrap();
    let config = load(&rules).unwrap();
    let de = config.rules[0].src.as_ref().unwrap();
    assert_eq!(de.set.as_deref(), Some("country:DE"));
    assert_eq!(de.nets, ["0.0.0.0/1".parse::<IpNet>().unwrap()]);
    let both = &config.rules[1].dst.as_ref().unwrap().nets;
    assert_eq!(both.len(), 2);
    assert_eq!(
        set_files(&rules, text),
        [geoip::V4_FILE, geoip::V6_FILE].map(|file| dir.path().join("geo").join(file))
    );
    // An unknown code, and missing files, are located at the reference.
    fs::write(&rules, text.replace("@country:US", "@country:XQ")).unwrap();
    let err = load(&rules).unwrap_err().to_string();
    assert!(
        err.contains("r.toml:11:23:") && err.contains("unknown country \"XQ\""),
        "{err}"
    );
    fs::write(&rules, text.replace("\"geo\"", "\"elsewhere\"")).unwrap();
    let err = load(&rules).unwrap_err().to_string();
    assert!(
        err.contains("r.toml:7:7:") && err.contains("apt install geoip-database"),
        "{err}"
    );
}

#[test]
fn guard_defaults_to_counting_the_linux_range() {
    let config = parse_ok(HEAD);
    assert_eq!(config.guard, GuardSettings::default());
    assert_eq!(config.guard.action, GuardAction::Count);
    assert_eq!(config.guard.ephemeral, (32768, 60999));
}

#[test]
fn reads_guard_settings() {
    let config = parse_ok(&format!(
        "{HEAD}[guard]\nephemeral = \"49152-65535\"\nservices = [22, \"8000-8080\"]\naction = \"drop\"\n"
    ));
    assert_eq!(config.guard.action, GuardAction::Drop);
    assert_eq!(config.guard.ephemeral, (49152, 65535));
    assert_eq!(config.guard.services, vec![(22, 22), (8000, 8080)]);
}

#[test]
fn upstream_acls_are_read_and_located() {
    let with = |body: &str| format!("{HEAD}[upstream]\n{body}\n");
    // Relative to the rules file, here the crate's directory.
    let good = parse_ok(&with(
        "file = \"../examples/upstream/sakura.json\"\nformat = \"sakura\"",
    ));
    let upstream = good.upstream.expect("read");
    assert_eq!(upstream.acl.id, "web-servers");
    assert_eq!(
        error_of(&with(
            "file = \"../examples/upstream/sakura.json\"\nformat = \"gcp\""
        )),
        "rules.toml:5:10: format must be aws-nacl, sakura or ibm-vpc"
    );
    let wrong = error_of(&with(
        "file = \"../examples/upstream/sakura.json\"\nformat = \"aws-nacl\"",
    ));
    assert!(
        wrong.starts_with("rules.toml:4:8: ../examples/upstream/sakura.json: not the JSON of"),
        "{wrong}"
    );
    let missing = error_of(&with("file = \"nothere.json\"\nformat = \"sakura\""));
    assert!(
        missing.starts_with("cannot read upstream ACL nothere.json"),
        "{missing}"
    );
}
