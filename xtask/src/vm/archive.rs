//! Which Debian archive to fetch kernels and images from: the one this
//! host's own apt already uses (its mirror or its proxy), read from its
//! sources in either format, one-line `.list` or deb822 `.sources`. No
//! mirror's name is written into the xtask.

use std::{fs, path::Path};

use anyhow::Context as _;

const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_PARTS: &str = "/etc/apt/sources.list.d";
/// Debian's release names and aliases, which tell a Debian archive from a
/// third party's repository (whose suites are its own).
const DEBIAN_SUITES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

/// The URI of the Debian archive in this host's apt sources.
pub fn debian_archive() -> anyhow::Result<String> {
    let mut sources = Vec::new();
    if let Ok(text) = fs::read_to_string(SOURCES_LIST) {
        sources.push((SOURCES_LIST.to_owned(), text));
    }
    if let Ok(entries) = fs::read_dir(SOURCES_PARTS) {
        let mut paths: Vec<_> = entries
            .filter_map(|entry| Some(entry.ok()?.path()))
            .collect();
        paths.sort();
        for path in paths {
            if let Some(text) = read_source_file(&path) {
                sources.push((path.display().to_string(), text));
            }
        }
    }
    from_sources(&sources).with_context(|| {
        format!(
            "no Debian archive (a `deb` source of {} with component main) in {SOURCES_LIST} \
             or {SOURCES_PARTS}: vm-test fetches Debian's kernels and images from the archive \
             this host's apt uses",
            DEBIAN_SUITES[1..4].join(", ")
        )
    })
}

/// A `.list` or `.sources` file's text (apt ignores other names).
fn read_source_file(path: &Path) -> Option<String> {
    let extension = path.extension()?.to_str()?;
    matches!(extension, "list" | "sources")
        .then(|| fs::read_to_string(path).ok())
        .flatten()
}

/// The first Debian archive among `(file name, text)`, in apt's order;
/// an archive of a release itself is preferred to `-updates` or
/// `-backports` alone, and the security archive is never taken.
fn from_sources(sources: &[(String, String)]) -> Option<String> {
    let entries: Vec<Entry> = sources
        .iter()
        .flat_map(|(name, text)| {
            if name.ends_with(".sources") {
                deb822_entries(text)
            } else {
                one_line_entries(text)
            }
        })
        .filter(Entry::is_debian)
        .collect();
    entries
        .iter()
        .find(|entry| {
            entry
                .suites
                .iter()
                .any(|suite| DEBIAN_SUITES.contains(&suite.as_str()))
        })
        .or(entries.first())
        .map(|entry| entry.uri.trim_end_matches('/').to_owned())
}

/// One source: a URI with its suites and components (`deb` only).
#[derive(Debug)]
struct Entry {
    uri: String,
    suites: Vec<String>,
    components: Vec<String>,
}

impl Entry {
    fn is_debian(&self) -> bool {
        let release = |suite: &String| {
            let base = suite.split('-').next().unwrap_or_default();
            DEBIAN_SUITES.contains(&base) && !suite.ends_with("-security")
        };
        (self.uri.starts_with("http://") || self.uri.starts_with("https://"))
            && self.suites.iter().any(release)
            && self.components.iter().any(|component| component == "main")
    }
}

/// `deb [options] URI SUITE COMPONENT...` lines.
fn one_line_entries(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let rest = line.strip_prefix("deb ")?.trim_start();
            // Options in brackets come before the URI.
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']')?.1,
                None => rest,
            };
            let mut words = rest.split_whitespace();
            Some(Entry {
                uri: words.next()?.to_owned(),
                suites: vec![words.next()?.to_owned()],
                components: words.map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// deb822 stanzas (`Types:`, `URIs:`, `Suites:`, `Components:`), each
/// URI an entry of its own; `Enabled: no` stanzas are skipped.
fn deb822_entries(text: &str) -> Vec<Entry> {
    let mut entries = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| -> Vec<String> {
            stanza
                .lines()
                .filter(|line| !line.starts_with('#'))
                .filter_map(|line| line.split_once(':'))
                .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
                .map(|(_, value)| value.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default()
        };
        let enabled = field("Enabled").first().is_none_or(|value| value != "no");
        if !enabled || !field("Types").iter().any(|kind| kind == "deb") {
            continue;
        }
        for uri in field("URIs") {
            entries.push(Entry {
                uri,
                suites: field("Suites"),
                components: field("Components"),
            });
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(files: &[(&str, &str)]) -> Option<String> {
        let sources: Vec<(String, String)> = files
            .iter()
            .map(|(name, text)| ((*name).to_owned(), (*text).to_owned()))
            .collect();
        from_sources(&sources)
    }

    #[test]
    fn reads_deb822_sources_and_skips_security_and_third_parties() {
        let debian = "Types: deb\n# a comment\nURIs: http://mirror.internal/debian/\n\
                      Suites: bookworm bookworm-updates\nComponents: main contrib\n\
                      Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                      Types: deb\nURIs: http://mirror.internal/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        let vendor =
            "Types: deb\nURIs: https://vendor.example/apt\nSuites: nodistro\nComponents: main\n";
        assert_eq!(
            archive(&[("a.sources", vendor), ("debian.sources", debian)]).as_deref(),
            Some("http://mirror.internal/debian")
        );
        let only_security = "Types: deb\nURIs: http://m/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(archive(&[("s.sources", only_security)]), None);
        let disabled = format!("Enabled: no\n{debian}");
        // The disabled stanza is skipped, and the security one never taken.
        assert_eq!(archive(&[("d.sources", &disabled)]), None);
    }

    #[test]
    fn reads_one_line_sources_with_options_and_comments() {
        let list = "# deb http://old.internal/debian bookworm main\n\
                    deb-src http://src.internal/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://proxy.internal:3142/debian bookworm main # cached\n";
        assert_eq!(
            archive(&[("/etc/apt/sources.list", list)]).as_deref(),
            Some("http://proxy.internal:3142/debian")
        );
        // A release is preferred to backports alone, whatever the order.
        let backports = "deb http://bp.internal/debian bookworm-backports main\n";
        assert_eq!(
            archive(&[("b.list", backports), ("/etc/apt/sources.list", list)]).as_deref(),
            Some("http://proxy.internal:3142/debian")
        );
        assert_eq!(
            archive(&[("b.list", backports)]).as_deref(),
            Some("http://bp.internal/debian")
        );
        assert_eq!(
            archive(&[("e.list", "deb http://x/debian bookworm contrib\n")]),
            None
        );
    }
}
