//! Helpers the agent's integration tests share.

use std::path::PathBuf;

use filter_agent::loader;

/// An interface's pin directory, removed (with the filter it keeps
/// attached) when the test ends, also on failure.
pub struct Pins(pub PathBuf);

impl Pins {
    pub fn of(iface: &str) -> Self {
        Self(loader::pin_dir(iface))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        loader::remove_pins(&self.0);
    }
}
