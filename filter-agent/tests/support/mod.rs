//! What the agent's integration tests share: its binary, rules files,
//! starting it, and pins removed when a test ends. Each test binary uses
//! part of it.
#![allow(dead_code)]

use std::{ffi::OsStr, io::Write as _, path::Path, path::PathBuf};

use filter_agent::{kernel::loader, kernel::pins};
use testbed::{Daemon, Netns};

/// The agent binary under test.
pub const AGENT: &str = env!("CARGO_BIN_EXE_filter-agent");

/// A temporary rules file holding `text`.
pub fn rules_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

/// The agent in `ns` with `args` and `--rules RULES`; stopped on drop.
pub fn start_agent(ns: &Netns, args: &[&str], rules: &Path) -> Daemon {
    let args = args.iter().map(OsStr::new).chain([OsStr::new("--rules")]);
    Daemon::agent(AGENT, ns, args.chain([rules.as_os_str()]))
}

/// An interface's pin directory, removed (with the filter it keeps
/// attached) when the test ends, also on failure.
pub struct Pins(pub PathBuf);

impl Pins {
    pub fn of(iface: &str) -> Self {
        Self(pins::dir(iface))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        loader::detach(&self.0);
    }
}
