//! Named address sets: inline lists, and set files (one CIDR per line).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use toml::{Spanned, Value};

use super::{ConfigError, Location, geoip, read, source::Source};

impl Source<'_> {
    pub(super) fn set(
        &self,
        name: &str,
        value: &Spanned<Value>,
        max_file: u64,
    ) -> Result<Vec<IpNet>, ConfigError> {
        let span = value.span();
        match value.get_ref() {
            Value::Array(values) => values
                .iter()
                .map(|item| match item {
                    Value::String(text) => {
                        parse_net(text).map_err(|message| self.item_error(&span, item, message))
                    }
                    _ => Err(self.item_error(
                        &span,
                        item,
                        format!("set {name:?}: entries are CIDR strings"),
                    )),
                })
                .collect(),
            Value::Table(table) => {
                let file = match (table.get("file"), table.len()) {
                    (Some(Value::String(file)), 1) => file,
                    _ => {
                        return Err(self.error(
                            span,
                            format!("set {name:?}: use a list or {{ file = \"path\" }}"),
                        ));
                    }
                };
                let path = self.path.parent().unwrap_or(Path::new(".")).join(file);
                // Named at the set, so that the rules file's line is in it.
                let text = read(&path, "set file", max_file).map_err(|err| {
                    let message = match &err {
                        ConfigError::Read { source, .. } => format!("{err}: {source}"),
                        _ => err.to_string(),
                    };
                    self.error(span.clone(), format!("set {name:?}: {message}"))
                })?;
                parse_set_file(&path, &text)
            }
            _ => Err(self.error(
                span,
                format!("set {name:?}: use a list or {{ file = \"path\" }}"),
            )),
        }
    }
}

/// The set files a rules file at `path` names (for watching them), as far
/// as `text` can be read; an unreadable file names none.
pub fn set_files(path: &Path, text: &str) -> Vec<PathBuf> {
    let Ok(raw) = toml::from_str::<toml::Table>(text) else {
        return Vec::new();
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let upstream = raw
        .get("upstream")
        .and_then(|upstream| upstream.get("file")?.as_str());
    let mut files: Vec<PathBuf> = raw
        .get("sets")
        .and_then(Value::as_table)
        .into_iter()
        .flat_map(|sets| sets.values())
        .filter_map(|set| set.get("file")?.as_str())
        .chain(upstream)
        .map(|file| base.join(file))
        .collect();
    // Country sets: the GeoIP files (a package update changes them).
    if text.contains("@country:") {
        let configured = raw
            .get("filter")
            .and_then(|filter| filter.get("geoip")?.as_str());
        let dir = base.join(configured.unwrap_or(geoip::DEFAULT_DIR));
        files.extend([geoip::V4_FILE, geoip::V6_FILE].map(|file| dir.join(file)));
    }
    files
}

/// One CIDR per line; '#' starts a comment.
fn parse_set_file(path: &Path, text: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut nets = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or_default();
        let entry = content.trim();
        if entry.is_empty() {
            continue;
        }
        let net = parse_net(entry).map_err(|message| ConfigError::Invalid {
            location: Location {
                file: path.to_owned(),
                line: index + 1,
                column: content.find(entry).unwrap_or(0) + 1,
            },
            message,
        })?;
        nets.push(net);
    }
    Ok(nets)
}

/// A CIDR or a bare address (a /32 or /128). Host bits must be clear.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    if !text.contains('/') {
        let addr: IpAddr = text
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR or an address"))?;
        return Ok(IpNet::from(addr));
    }
    let net: IpNet = text
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR or an address"))?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set (did you mean \"{}\"?)",
            net.trunc()
        ));
    }
    Ok(net)
}
