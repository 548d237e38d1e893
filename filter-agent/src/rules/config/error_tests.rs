//! Bad rules files: every error names file:line:col and what is wrong.

use super::tests::{HEAD, error_of, parse_ok, with_rule};
use super::*;

#[test]
fn set_file_errors_name_the_rules_file_line() {
    let missing = error_of(&format!(
        "{HEAD}[sets]\nbad = {{ file = \"/nonexistent/x.txt\" }}\n"
    ));
    assert!(
        missing.starts_with(
            "rules.toml:4:7: set \"bad\": cannot read set file /nonexistent/x.txt: No such file"
        ),
        "{missing}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.txt"), "10.0.0.0/8\n".repeat(100_000)).unwrap();
    let rules = dir.path().join("rules.toml");
    let text = "[filter]\ndefault = \"deny\"\nmax_set_file_mib = 1\n[sets]\nbig = { file = \"big.txt\" }\n";
    let err = parse(&rules, text).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:5:7: set \"big\": set file", rules.display()))
            && err.ends_with(
                "larger than 1 MiB, the most filter-agent reads (raise [filter] max_set_file_mib)"
            ),
        "{err}"
    );
    let zero = error_of("[filter]\ndefault = \"deny\"\nmax_map_mib = 0\n");
    assert_eq!(zero, "rules.toml:3:15: must be at least 1 (MiB)");
}

#[test]
fn a_value_quoted_in_an_error_keeps_it_one_line() {
    // Found by the rules_text fuzzer: TOML's escapes put a newline into a
    // value, and the parser's message quotes the value.
    let err = error_of("[filter]\ndefault = \"d\\ny\"\n");
    assert_eq!(
        err,
        "rules.toml:2:11: unknown variant `d\\ny`, expected `allow` or `deny`"
    );
}

#[test]
fn nesting_past_the_parser_limit_is_located() {
    let deep = format!(
        "{HEAD}# a comment. with [dots]\n{}b = 1\n",
        "a.".repeat(300)
    );
    let err = error_of(&deep);
    assert!(err.starts_with("rules.toml:4:1: "), "{err}");
}

#[test]
fn text_that_is_not_utf8_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, b"[filter]\ndefault = \"d\xffeny\"\n").unwrap();
    let err = load(&rules).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("{}:2:13: rules file is not UTF-8 text", rules.display())
    );
}

/// Rule bodies, where their error is, and what it says.
const BAD_RULES: &[(&str, &str, &str)] = &[
    ("colour = 1", "rules.toml:6:1: ", "unknown field `colour`"),
    ("src = \"10.0.0.300/8\"", "rules.toml:6:7: ", "not a CIDR"),
    (
        "src = [\"10.0.0.0/8\", \"10.0.0.1/8\"]",
        "rules.toml:6:22: ",
        "host bits set",
    ),
    (
        "proto = \"tcp\"\ndport = \"90-80\"",
        "rules.toml:7:9: ",
        "inverted port range",
    ),
    (
        "proto = \"tcp\"\ndport = [22, 70000]",
        "rules.toml:7:14: ",
        "not in 0-65535",
    ),
    (
        "proto = \"icmp\"\ndport = 22",
        "rules.toml:7:9: ",
        "dport needs proto",
    ),
    ("sport = 22", "rules.toml:6:9: ", "sport needs proto"),
    (
        "proto = \"udp\"\ntcp_flags = \"syn\"",
        "rules.toml:7:13: ",
        "tcp_flags needs proto = \"tcp\"",
    ),
    (
        "proto = \"tcp\"\ntcp_flags = \"syn,fyn\"",
        "rules.toml:7:13: ",
        "unknown TCP flag \"fyn\"",
    ),
    (
        "proto = \"icmp\"\nicmp_type = [\"echo-request\", \"ping\"]",
        "rules.toml:7:30: ",
        "unknown icmp_type \"ping\"",
    ),
    (
        "proto = \"icmp\"\nnotrack = true",
        "rules.toml:7:11: ",
        "notrack needs proto = \"tcp\" or \"udp\"",
    ),
    (
        "proto = \"tcp\"\ntcp_flags = \"syn\"\nnotrack = true",
        "rules.toml:8:11: ",
        "notrack applies to whole flows",
    ),
    (
        "limit = { rate = \"fast\" }",
        "rules.toml:6:18: ",
        "rate is \"N/s\"",
    ),
    (
        "limit = { rate = \"10/day\" }",
        "rules.toml:6:18: ",
        "unknown unit \"day\"",
    ),
    ("limit = { rate = 0 }", "rules.toml:6:18: ", "at least 1"),
    (
        "limit = { rate = \"2000000000/s\" }",
        "rules.toml:6:18: ",
        "at most 1000000000/s",
    ),
    (
        "limit = { rate = \"10/s\", burst = 0 }",
        "rules.toml:6:34: ",
        "burst must be 1-1000000",
    ),
    (
        "limit = { rate = \"10/s\", per = \"host\" }",
        "rules.toml:6:32: ",
        "per must be \"rule\" or \"source\"",
    ),
    (
        "limit = { rate = \"10/s\", ipv4_prefix = 24 }",
        "rules.toml:6:40: ",
        "ipv4_prefix needs per = \"source\"",
    ),
    (
        "limit = { rate = \"10/s\", per = \"source\", ipv6_prefix = 129 }",
        "rules.toml:6:56: ",
        "ipv6_prefix must be 1-128",
    ),
    (
        "limit = { rate = \"10/s\", brust = 5 }",
        "rules.toml:6:",
        "unknown field `brust`",
    ),
    (
        "proto = \"tcp\"\nicmp_type = 3",
        "rules.toml:7:13: ",
        "icmp_type needs proto",
    ),
    (
        "proto = \"sctp\"",
        "rules.toml:6:9: ",
        "unknown proto \"sctp\"",
    ),
    ("proto = 300", "rules.toml:6:9: ", "not in 0-255"),
    (
        "src = \"@nothere\"",
        "rules.toml:6:7: ",
        "unknown set \"@nothere\"",
    ),
    (
        "src = \"10.0.0.0/8\"\ndst = \"2001:db8::/32\"",
        "rules.toml:7:7: ",
        "share no address family",
    ),
    (
        "action2 = \"allow\"",
        "rules.toml:6:1: ",
        "unknown field `action2`",
    ),
];

/// Every bad input names file:line:col and what is wrong.
#[test]
fn bad_input_is_located() {
    let wrong: Vec<String> = BAD_RULES
        .iter()
        .map(|(body, location, needle)| (body, location, needle, error_of(&with_rule(body))))
        .filter(|(_, location, needle, message)| {
            !message.starts_with(**location) || !message.contains(**needle)
        })
        .map(|(body, _, _, message)| format!("{body}: {message}"))
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn bad_rule_headers_are_located() {
    let message = error_of(&format!(
        "{HEAD}[[rule]]\nname = \"a\"\naction = \"permit\"\n"
    ));
    assert!(message.starts_with("rules.toml:5:10: "), "{message}");
    assert!(message.contains("permit"), "{message}");
    let message = error_of(&format!(
        "{HEAD}[[rule]]\nname = \"a\"\naction = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\n"
    ));
    assert!(
        message.starts_with("rules.toml:7:8: duplicate rule name \"a\""),
        "{message}"
    );
    let message = error_of(&format!(
        "{HEAD}[[rule]]\nname = \"a b\"\naction = \"allow\"\n"
    ));
    assert!(message.starts_with("rules.toml:4:8: "), "{message}");
    let message = error_of(&format!("{HEAD}[sets]\nx = [\"1.2.3.0/33\"]\n"));
    assert!(message.starts_with("rules.toml:4:6: "), "{message}");
}

#[test]
fn unknown_filter_key_and_bad_value() {
    let message = error_of("[filter]\ndefault = \"deny\"\n  colour = \"red\"\n");
    assert!(message.starts_with("rules.toml:3:3: "), "{message}");
    let message = error_of("[filter]\ndefault = \"maybe\"\n");
    assert!(message.starts_with("rules.toml:2:11: "), "{message}");
    assert!(error_of("[filter]\nmode = \"enforce\"\n").contains("default"));
}

#[test]
fn missing_files_name_their_path() {
    let err = load(Path::new("/nonexistent/rules.toml")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/rules.toml"));
    let message = error_of(&format!(
        "{HEAD}[sets]\np = {{ file = \"/nonexistent/p.txt\" }}\n"
    ));
    assert!(
        message.contains("cannot read set file /nonexistent/p.txt"),
        "{message}"
    );
}

#[test]
fn long_rule_names_are_refused() {
    let long = "r".repeat(MAX_RULE_NAME + 1);
    let message = error_of(&format!(
        "{HEAD}[[rule]]\nname = \"{long}\"\naction = \"allow\"\n"
    ));
    assert!(message.starts_with("rules.toml:4:8: "), "{message}");
    assert!(message.contains("at most 63 characters"), "{message}");
    parse_ok(&format!(
        "{HEAD}[[rule]]\nname = \"{}\"\naction = \"allow\"\n",
        &long[1..]
    ));
}

#[test]
fn bad_guard_settings_are_located() {
    let message = error_of(&format!("{HEAD}[guard]\nephemeral = [1, 2]\n"));
    assert!(
        message.starts_with("rules.toml:4:13: ephemeral is one port range"),
        "{message}"
    );
    let message = error_of(&format!("{HEAD}[guard]\nephemeral = \"60999-32768\"\n"));
    assert!(message.contains("inverted port range"), "{message}");
    let message = error_of(&format!("{HEAD}[guard]\naction = \"log\"\n"));
    assert!(message.starts_with("rules.toml:4:10: "), "{message}");
    let message = error_of(&format!("{HEAD}[guard]\nrange = \"1-2\"\n"));
    assert!(message.contains("unknown field `range`"), "{message}");
}
