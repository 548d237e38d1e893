//! The binary's error behaviour: one line on stderr, a non-zero exit, never
//! a panic or a backtrace.

use std::{
    io::Write as _,
    process::{Command, Output},
};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_filter-agent"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

/// Asserts exit code `code` and exactly one stderr line containing `needle`.
fn assert_one_line_error(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

fn rules_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

#[test]
fn missing_arguments() {
    assert_one_line_error(&agent(&[]), 2, "--iface");
    assert_one_line_error(&agent(&["--iface", "lo"]), 2, "--rules");
    assert_one_line_error(
        &agent(&["--iface", "lo", "--rules", "x", "--xdp-mode", "turbo"]),
        2,
        "turbo",
    );
}

#[test]
fn missing_rules_file() {
    let output = agent(&["--iface", "lo", "--rules", "/nonexistent/rules.toml"]);
    assert_one_line_error(&output, 1, "cannot read rules file /nonexistent/rules.toml");
}

#[test]
fn invalid_rules_file_names_line_and_column() {
    let rules = rules_file("[filter]\ndefault = \"sometimes\"\n");
    let path = rules.path().to_str().unwrap();
    let output = agent(&["--iface", "lo", "--rules", path]);
    assert_one_line_error(&output, 1, &format!("{path}:2:11: "));
}

#[test]
fn unknown_interface() {
    let rules = rules_file("[filter]\ndefault = \"allow\"\n");
    let output = agent(&[
        "--iface",
        "nosuchif0",
        "--rules",
        rules.path().to_str().unwrap(),
    ]);
    assert_one_line_error(&output, 1, "no network interface named `nosuchif0`");
}

#[test]
fn missing_privileges() {
    use std::os::unix::fs::PermissionsExt as _;
    let rules = rules_file("[filter]\ndefault = \"allow\"\n");
    std::fs::set_permissions(rules.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_filter-agent"))
        .args(["--iface", "lo", "--rules", rules.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_one_line_error(&output, 1, "missing privileges");
}

#[test]
fn check_accepts_and_rejects() {
    let good = rules_file("[filter]\ndefault = \"deny\"\n");
    let output = agent(&["check", "--rules", good.path().to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let bad = rules_file("[filter]\ndefault = \"deny\"\nextra = 1\n");
    let output = agent(&["check", "--rules", bad.path().to_str().unwrap()]);
    assert_one_line_error(&output, 1, ":3:1: ");
}
