//! Checks, before anything is loaded, that the process may load and attach
//! XDP programs, so that a missing privilege is one clear error line.

use std::fs;

use thiserror::Error;

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// What a command is about to do, for the error that says what it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Loading the program and attaching it (the agent).
    Attach,
    /// Loading the program to run packets through it (`test`, `replay`).
    TestRun,
    /// Reading the pinned counters (`stats`, `guard`).
    ReadCounters,
    /// Removing the pins (`detach`).
    Detach,
    /// Entering every network namespace (`audit`).
    Audit,
    /// Connecting to the agent's event sockets (`watch`).
    Watch,
    /// Changing the running agent's rules (`try`, `confirm`).
    Control,
}

impl Task {
    fn what(self) -> &'static str {
        match self {
            Task::Attach => "loading and attaching XDP programs",
            Task::TestRun => "running packets through the XDP program (BPF_PROG_TEST_RUN)",
            Task::ReadCounters => "reading the filter's pinned counters",
            Task::Detach => "removing the filter's pins",
            Task::Audit => "auditing every network namespace",
            Task::Watch => "watching the agent's events",
            Task::Control => "changing the running agent's rules",
        }
    }

    fn needs(self) -> &'static str {
        match self {
            Task::Attach | Task::TestRun => "CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN",
            Task::ReadCounters | Task::Detach => {
                "CAP_BPF (or CAP_SYS_ADMIN) and access to /sys/fs/bpf/filter-agent, which is root's own"
            }
            Task::Audit => "CAP_SYS_ADMIN, to enter each namespace",
            Task::Watch | Task::Control => "access to /run/filter-agent, which is root's own",
        }
    }

    fn allowed(self, effective: u64, root: bool) -> bool {
        let has = |cap: u32| effective & (1 << cap) != 0;
        let bpf = has(CAP_BPF) || has(CAP_SYS_ADMIN);
        let files = root || has(CAP_DAC_OVERRIDE);
        match self {
            Task::Attach | Task::TestRun => bpf && has(CAP_NET_ADMIN),
            Task::ReadCounters | Task::Detach => bpf && files,
            Task::Audit => has(CAP_SYS_ADMIN),
            Task::Watch | Task::Control => files,
        }
    }
}

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error("missing privileges: {} needs {}; run as root", .0.what(), .0.needs())]
    Missing(Task),
    #[error("cannot read the process's capabilities from /proc/self/status: {0}")]
    Unreadable(String),
}

/// Returns `Ok` when the process may do `task`.
pub fn check(task: Task) -> Result<(), PrivilegeError> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|err| PrivilegeError::Unreadable(err.to_string()))?;
    let effective = effective_capabilities(&status)
        .ok_or_else(|| PrivilegeError::Unreadable("no CapEff line".into()))?;
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if task.allowed(effective, root) {
        Ok(())
    } else {
        Err(PrivilegeError::Missing(task))
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

    #[test]
    fn each_task_needs_its_own_capabilities() {
        let caps = |list: &[u32]| list.iter().fold(0u64, |set, cap| set | 1 << cap);
        assert!(Task::Attach.allowed(caps(&[CAP_BPF, CAP_NET_ADMIN]), false));
        assert!(!Task::Attach.allowed(caps(&[CAP_BPF]), true));
        assert!(Task::ReadCounters.allowed(caps(&[CAP_BPF]), true));
        assert!(!Task::ReadCounters.allowed(caps(&[CAP_BPF]), false));
        assert!(Task::Audit.allowed(caps(&[CAP_SYS_ADMIN]), false));
        assert!(!Task::Watch.allowed(0, false));
        assert!(Task::Watch.allowed(0, true));
    }
}
