//! The rules file: TOML in, validated [`Config`] out.
//!
//! Pure logic, no I/O beyond reading the named files. Every error names the
//! file, line and column it is about.

use std::{
    fmt, fs,
    ops::Range,
    path::{Path, PathBuf},
};

use filter_common::{action, mode};
use serde::Deserialize;
use thiserror::Error;

/// A validated rules file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub filter: FilterSettings,
}

/// The `[filter]` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterSettings {
    /// Action for IP packets that match no rule.
    pub default: Action,
    pub mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// The value the XDP program understands.
    pub fn raw(self) -> u32 {
        match self {
            Action::Allow => action::ALLOW,
            Action::Deny => action::DENY,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Monitor,
}

impl Mode {
    /// The value the XDP program understands.
    pub fn raw(self) -> u32 {
        match self {
            Mode::Enforce => mode::ENFORCE,
            Mode::Monitor => mode::MONITOR,
        }
    }
}

/// Where in which file an error is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read rules file {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{location}: {message}")]
    Invalid { location: Location, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    filter: RawFilter,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    default: Action,
    #[serde(default)]
    mode: Mode,
}

/// Reads and validates the rules file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Validates rules-file `text`; `path` is only used in error messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Invalid {
        location: locate(path, text, err.span()),
        message: err.message().to_owned(),
    })?;
    Ok(Config {
        filter: FilterSettings {
            default: raw.filter.default,
            mode: raw.filter.mode,
        },
    })
}

/// Turns a byte span of `text` into a 1-based line and column.
fn locate(path: &Path, text: &str, span: Option<Range<usize>>) -> Location {
    let offset = span.map_or(0, |span| span.start.min(text.len()));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        file: path.to_owned(),
        line,
        column: before[line_start..].chars().count() + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        parse(Path::new("rules.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn reads_filter_settings() {
        let config = parse(
            Path::new("r.toml"),
            "[filter]\ndefault = \"deny\"\nmode = \"monitor\"\n",
        )
        .unwrap();
        assert_eq!(config.filter.default, Action::Deny);
        assert_eq!(config.filter.mode, Mode::Monitor);
    }

    #[test]
    fn mode_defaults_to_enforce() {
        let config = parse(Path::new("r.toml"), "[filter]\ndefault = \"allow\"\n").unwrap();
        assert_eq!(config.filter.mode, Mode::Enforce);
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let message = error_of("[filter]\ndefault = \"deny\"\n  colour = \"red\"\n");
        assert!(message.starts_with("rules.toml:3:3: "), "{message}");
        assert!(message.contains("colour"), "{message}");
    }

    #[test]
    fn bad_action_names_its_value() {
        let message = error_of("[filter]\ndefault = \"maybe\"\n");
        assert!(message.starts_with("rules.toml:2:11: "), "{message}");
        assert!(message.contains("maybe"), "{message}");
    }

    #[test]
    fn missing_default_is_an_error() {
        let message = error_of("[filter]\nmode = \"enforce\"\n");
        assert!(message.contains("default"), "{message}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = load(Path::new("/nonexistent/rules.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/rules.toml"));
    }
}
