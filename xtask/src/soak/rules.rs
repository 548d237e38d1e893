//! The rule sets the soak rotates through: each allows the steady traffic's
//! port, denies its other one and counts out-of-range returns the same
//! way, and carries a marker rule naming its step, so that the running
//! rules say which file they came from. They differ in size: a handful of
//! rules, a thousand, and a set of 100,000 prefixes.

use std::{fmt::Write as _, fs, path::Path};

/// The port the steady traffic's allowed datagrams go to.
pub const ALLOWED_PORT: u16 = 9001;
/// The port its denied datagrams go to.
pub const DENIED_PORT: u16 = 9000;
/// A local port outside the guard's range that return traffic is sent to.
pub const OUT_OF_RANGE_PORT: u16 = 2000;
/// Prefixes in the large set.
pub const LARGE_SET: usize = 100_000;
/// The sizes in turn: extra rules, and whether the large set is in.
const SIZES: [(usize, bool); 4] = [(0, false), (1_000, false), (0, true), (200, false)];
/// The set file's name, next to the rules file.
const SET_FILE: &str = "large-set.txt";

/// The name of step `step`'s marker rule.
pub fn marker(step: u64) -> String {
    format!("soak-{step}")
}

/// Writes the large set's file into `dir`: prefixes of lengths 27 to 32
/// in 100.64.0.0/10, far from the traffic's addresses.
pub fn write_set(dir: &Path) -> std::io::Result<()> {
    let mut text = String::with_capacity(LARGE_SET * 20);
    for index in 0..LARGE_SET as u32 {
        let address = u32::from_be_bytes([100, 64, 0, 0]) + index * 32;
        let length = 27 + index % 6;
        let octets = address.to_be_bytes();
        let _ = writeln!(
            text,
            "{}.{}.{}.{}/{length}",
            octets[0], octets[1], octets[2], octets[3]
        );
    }
    fs::write(dir.join(SET_FILE), text)
}

/// Whether `step` has the smallest rule set.
pub fn is_smallest(step: u64) -> bool {
    step.is_multiple_of(SIZES.len() as u64)
}

/// Writes the rules file of `step` into `dir` by renaming a new file over
/// it, as editors and configuration tools do.
pub fn write(dir: &Path, step: u64) -> std::io::Result<()> {
    let staged = dir.join("rules.toml.new");
    fs::write(&staged, rules(step).0)?;
    fs::rename(staged, dir.join("rules.toml"))
}

/// The rules file of `step`, and how many rules it has.
pub fn rules(step: u64) -> (String, usize) {
    let (extra, large) = SIZES[step as usize % SIZES.len()];
    let mut text = String::from(
        "[filter]\ndefault = \"allow\"\n\n\
         [guard]\nephemeral = \"32768-60999\"\naction = \"count\"\n\n",
    );
    if large {
        let _ = writeln!(text, "[sets]\nlarge = {{ file = \"{SET_FILE}\" }}\n");
    }
    let mut count = 0;
    let mut rule = |text: &mut String, body: String| {
        count += 1;
        let _ = writeln!(text, "[[rule]]\n{body}");
    };
    rule(
        &mut text,
        format!(
            "name = \"{}\"\naction = \"allow\"\nproto = \"udp\"\ndport = {}\n",
            marker(step),
            ALLOWED_PORT + 1
        ),
    );
    rule(
        &mut text,
        format!("name = \"deny\"\naction = \"deny\"\nproto = \"udp\"\ndport = {DENIED_PORT}\n"),
    );
    if large {
        rule(
            &mut text,
            "name = \"large\"\naction = \"deny\"\nsrc = \"@large\"\n".to_owned(),
        );
    }
    for index in 0..extra {
        rule(
            &mut text,
            format!(
                "name = \"filler-{index}\"\naction = \"deny\"\nproto = \"tcp\"\ndport = {}\n",
                20_000 + index
            ),
        );
    }
    (text, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_names_itself_and_denies_the_denied_port() {
        for step in 0..8 {
            let (text, count) = rules(step);
            let parsed: toml::Value = toml::from_str(&text).unwrap();
            let rules = parsed["rule"].as_array().unwrap();
            assert_eq!(rules.len(), count);
            assert_eq!(rules[0]["name"].as_str(), Some(marker(step).as_str()));
            assert_eq!(rules[1]["dport"].as_integer(), Some(i64::from(DENIED_PORT)));
        }
        assert!(rules(2).0.contains("@large"));
        assert_eq!(rules(1).1, 1_002);
    }
}
