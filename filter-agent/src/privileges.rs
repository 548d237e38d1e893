//! Checks, before anything is loaded, that the process may load and attach
//! XDP programs, so that a missing privilege is one clear error line.

use std::fs;

use thiserror::Error;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error(
        "missing privileges: loading and attaching XDP programs needs CAP_BPF (or CAP_SYS_ADMIN) \
         and CAP_NET_ADMIN; run as root"
    )]
    Missing,
    #[error("cannot read the process's capabilities from /proc/self/status: {0}")]
    Unreadable(String),
}

/// Returns `Ok` when the effective capabilities allow loading and attaching.
pub fn check() -> Result<(), PrivilegeError> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|err| PrivilegeError::Unreadable(err.to_string()))?;
    let effective = effective_capabilities(&status)
        .ok_or_else(|| PrivilegeError::Unreadable("no CapEff line".into()))?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    if (has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN) {
        Ok(())
    } else {
        Err(PrivilegeError::Missing)
    }
}

fn effective_capabilities(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_set() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_capabilities("Name:\tx\n"), None);
    }
}
