//! The packages the systemd guests install, built once before the lanes
//! start: packaging rewrites target/dist and target/debian, so no lane
//! may package while another boots from them.

use std::path::PathBuf;

use super::{ANSIBLE, SYSTEMD_GUESTS, SystemdGuest};
use crate::{package, util::cargo};

/// What the systemd guests install, built before any lane starts.
pub struct Installs {
    /// This build's package (amd64).
    pub current: PathBuf,
    /// For Debian 12's full guest (which also gets `fa-scenario`, built
    /// here): this build as a later version, and the previous release's
    /// package.
    pub upgrade: Option<PathBuf>,
    pub previous: Option<PathBuf>,
}

impl Installs {
    pub fn build(guests: &[&str], previous: Option<PathBuf>) -> anyhow::Result<Option<Self>> {
        let chosen = |guest: &SystemdGuest| guests.contains(&guest.name);
        if !SYSTEMD_GUESTS.iter().any(chosen) && !guests.contains(&ANSIBLE) {
            return Ok(None);
        }
        let full = SYSTEMD_GUESTS
            .iter()
            .any(|guest| guest.full && chosen(guest));
        let current = package::run()?.debs[0].clone();
        let upgrade = if full {
            let version = format!("{}+upgrade", package::VERSION);
            let upgrade = package::build(&version)?.debs[0].clone();
            cargo(&[
                "build",
                "--release",
                "-p",
                "scenarios",
                "--bin",
                "fa-scenario",
            ])?;
            Some(upgrade)
        } else {
            None
        };
        Ok(Some(Self {
            current,
            upgrade,
            previous,
        }))
    }
}
