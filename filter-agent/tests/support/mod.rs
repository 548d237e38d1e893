//! Helpers the agent's integration tests share.

use std::path::PathBuf;

use filter_agent::{kernel::loader, kernel::pins};

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
