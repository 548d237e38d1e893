//! What the agent keeps in bpffs for each interface, so that the filter
//! outlives the agent (fail-static) and other commands (`stats`, `guard`,
//! `detach`) can read or remove it while the agent is down:
//!
//! ```text
//! /sys/fs/bpf/filter-agent/IFACE/
//!   xdp_link, egress_link      the attachments
//!   STATS, GUARD_*, UDP_FLOWS  counters shared by every program instance
//!   RULE_STATS                 per-rule per-CPU counters of the running rules
//!   RULES                      their names, actions and carried-over counts
//! ```
//!
//! The directory is also the interface's lock: an agent holds `flock` on
//! it for as long as it runs.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{Array, Map, MapData, MapError, PerCpuArray},
};
use filter_common::{Counter, names};
use thiserror::Error;

use crate::{
    compile::RuleInfo,
    config::Action,
    loader::{self, Filter, LoadError},
};

/// Where the rule table is pinned.
pub const RULES_PIN: &str = "RULES";
/// Bytes of a rule's name in [`RuleRecord`]: the longest name the rules
/// file accepts and a terminating zero.
const NAME_BYTES: usize = crate::config::MAX_RULE_NAME + 1;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("another filter-agent is already running for {0}")]
    Locked(String),
    #[error("refusing {}: {why}; remove it as root (`filter-agent detach` or `rm -r`) and start again", path.display())]
    Unsafe { path: PathBuf, why: String },
    #[error("cannot lock {}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("no filter-agent state under {} (never attached, or detached)", .0.display())]
    NotPinned(PathBuf),
    #[error("cannot read pinned map {}", path.display())]
    Read { path: PathBuf, source: MapError },
    #[error("cannot write the rule table")]
    Write(#[source] MapError),
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// An exclusive claim on an interface: `flock` on its pin directory.
/// Released when dropped (or when the process dies).
#[derive(Debug)]
pub struct InterfaceLock {
    _dir: File,
}

impl InterfaceLock {
    /// Locks `iface`'s pin directory, creating it (and the pin root) private
    /// to root if needed; refuses one that another user could change.
    pub fn acquire(iface: &str) -> Result<Self, StateError> {
        private_dir(Path::new(loader::PIN_ROOT))?;
        let path = loader::pin_dir(iface);
        private_dir(&path)?;
        check_entries(&path)?;
        Self::try_lock(&path)?.ok_or_else(|| StateError::Locked(iface.to_owned()))
    }

    /// Locks `iface`'s existing pin directory to remove it, whoever made it.
    pub fn existing(iface: &str) -> Result<Self, StateError> {
        Self::try_lock(&loader::pin_dir(iface))?.ok_or_else(|| StateError::Locked(iface.to_owned()))
    }

    /// Locks the directory at `path`; `None` when another process holds it.
    fn try_lock(path: &Path) -> Result<Option<Self>, StateError> {
        let lock_error = |source| StateError::Lock {
            path: path.to_owned(),
            source,
        };
        let dir = File::open(path).map_err(lock_error)?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Ok(None)
            } else {
                Err(lock_error(err))
            };
        }
        Ok(Some(Self { _dir: dir }))
    }
}

/// Makes `path` a directory only its owner can use (mode 0700, whatever the
/// umask), or checks that the one there is the agent's and that nobody else
/// can change what is in it: a directory another user owns, or one that
/// group or others may write, could have its pins deleted or swapped.
pub fn private_dir(path: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let io_error = |source| StateError::Lock {
        path: path.to_owned(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {
            return std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .map_err(io_error);
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(io_error(err)),
    }
    let metadata = std::fs::symlink_metadata(path).map_err(io_error)?;
    if !metadata.is_dir() {
        return Err(unsafe_path(path, "not a directory"));
    }
    check_owner(path, &metadata)
}

/// Every entry of a pin directory must be the agent's too.
fn check_entries(dir: &Path) -> Result<(), StateError> {
    let entries = std::fs::read_dir(dir).map_err(|source| StateError::Lock {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        if let Ok(metadata) = entry.metadata() {
            check_owner(&entry.path(), &metadata)?;
        }
    }
    Ok(())
}

fn check_owner(path: &Path, metadata: &std::fs::Metadata) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if metadata.uid() != euid {
        return Err(unsafe_path(
            path,
            &format!("owned by uid {}, not by uid {euid}", metadata.uid()),
        ));
    }
    if metadata.mode() & 0o022 != 0 {
        return Err(unsafe_path(
            path,
            &format!(
                "writable by group or others (mode {:04o})",
                metadata.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

fn unsafe_path(path: &Path, why: &str) -> StateError {
    StateError::Unsafe {
        path: path.to_owned(),
        why: why.to_owned(),
    }
}

/// Removes the pins of interfaces that are gone: directories no agent
/// holds whose XDP link's device was deleted, or that hold no link at all
/// and name no interface here (left by a start that was interrupted).
/// Returns their names. Interfaces in other network namespaces keep
/// theirs: the link says whether its device exists, wherever it is. A
/// directory another user could have changed is left for the agent's
/// start to refuse by name.
pub fn remove_vanished() -> Vec<String> {
    let Ok(dirs) = std::fs::read_dir(loader::PIN_ROOT) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for dir in dirs.flatten() {
        let path = dir.path();
        let name = dir.file_name().to_string_lossy().into_owned();
        let gone = match loader::pinned_xdp_ifindex(&path.join(loader::XDP_LINK_PIN)) {
            Ok(ifindex) => ifindex == 0,
            Err(err) => err.kind() == io::ErrorKind::NotFound && !loader::interface_exists(&name),
        };
        let trusted = std::fs::symlink_metadata(&path)
            .is_ok_and(|metadata| metadata.is_dir() && check_owner(&path, &metadata).is_ok());
        if !gone || !trusted {
            continue;
        }
        // Held: an agent is starting or running there.
        if let Ok(Some(_lock)) = InterfaceLock::try_lock(&path) {
            loader::remove_pins(&path);
            removed.push(name);
        }
    }
    removed
}

/// One entry of the pinned rule table. `base` holds what the rule counted
/// under earlier rule sets (its name is the identity), so that counts
/// continue across reloads: total = base + the per-CPU `RULE_STATS` slots.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RuleRecord {
    pub name: [u8; NAME_BYTES],
    pub action: u32,
    pub reserved: u32,
    pub base: Counter,
}

const _: () = assert!(size_of::<RuleRecord>() == NAME_BYTES + 8 + 16);
// SAFETY: `repr(C)`, integers and a byte array, no padding (size asserted).
unsafe impl Pod for RuleRecord {}

impl RuleRecord {
    pub fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(NAME_BYTES);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// A rule's name, action and total count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleTotal {
    pub name: String,
    pub action: Action,
    pub counter: Counter,
}

/// Everything `stats` shows for one interface.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub rules: Vec<RuleTotal>,
    /// Indexed by `filter_common::reason`.
    pub reasons: Vec<Counter>,
}

/// Reads the rules and counters pinned in `dir`.
pub fn read_snapshot(dir: &Path) -> Result<Snapshot, StateError> {
    if !dir.join(RULES_PIN).exists() {
        return Err(StateError::NotPinned(dir.to_owned()));
    }
    Ok(Snapshot {
        rules: pinned_rule_totals(dir)?,
        reasons: per_cpu_totals(&dir.join(names::STATS))?,
    })
}

fn pinned_rule_totals(dir: &Path) -> Result<Vec<RuleTotal>, StateError> {
    let path = dir.join(RULES_PIN);
    let records = Array::<_, RuleRecord>::try_from(open_pinned(&path)?)
        .map_err(|source| read_error(&path, source))?;
    let records = records
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| read_error(&path, source))?;
    let counters = per_cpu_totals(&dir.join(names::RULE_STATS))?;
    Ok(records
        .iter()
        .zip(counters)
        .map(|(record, counter)| {
            let mut total = record.base;
            total.add(&counter);
            RuleTotal {
                name: record.name(),
                action: if record.action == filter_common::action::DENY {
                    Action::Deny
                } else {
                    Action::Allow
                },
                counter: total,
            }
        })
        .collect())
}

/// Publishes the rules `filter` now runs with in `dir`: its per-rule
/// counters and a rule table whose bases carry over the totals of rules
/// that kept their name. Call it once the new program is attached and the
/// old one has seen its last packet. Returns the bases.
pub fn publish_rules(
    filter: &Filter,
    rules: &[RuleInfo],
    dir: &Path,
) -> Result<Vec<Counter>, StateError> {
    let previous: HashMap<String, Counter> = match pinned_rule_totals(dir) {
        Ok(totals) => totals.into_iter().map(|t| (t.name, t.counter)).collect(),
        Err(_) => HashMap::new(),
    };
    let entries = (rules.len() as u32).max(1);
    let mut table = Array::<MapData, RuleRecord>::create(entries, 0).map_err(StateError::Write)?;
    let mut bases = Vec::with_capacity(rules.len());
    for (index, rule) in rules.iter().enumerate() {
        let base = previous.get(&rule.name).copied().unwrap_or_default();
        let mut name = [0u8; NAME_BYTES];
        let bytes = rule.name.as_bytes();
        let len = bytes.len().min(NAME_BYTES - 1);
        name[..len].copy_from_slice(&bytes[..len]);
        let record = RuleRecord {
            name,
            action: rule.action.raw(),
            reserved: 0,
            base,
        };
        table
            .set(index as u32, record, 0)
            .map_err(StateError::Write)?;
        bases.push(base);
    }
    filter.pin_rule_stats(&dir.join(names::RULE_STATS))?;
    loader::replace_pin(&dir.join(RULES_PIN), |staged| table.pin(staged))?;
    Ok(bases)
}

/// Per-CPU counters in a pinned array, summed.
fn per_cpu_totals(path: &Path) -> Result<Vec<Counter>, StateError> {
    let array = PerCpuArray::<_, Counter>::try_from(open_pinned(path)?)
        .map_err(|source| read_error(path, source))?;
    array
        .iter()
        .map(|values| {
            let values = values.map_err(|source| read_error(path, source))?;
            let mut total = Counter::default();
            values.iter().for_each(|value| total.add(value));
            Ok(total)
        })
        .collect()
}

fn open_pinned(path: &Path) -> Result<Map, StateError> {
    MapData::from_pin(path)
        .and_then(Map::from_map_data)
        .map_err(|source| read_error(path, source))
}

fn read_error(path: &Path, source: MapError) -> StateError {
    StateError::Read {
        path: path.to_owned(),
        source,
    }
}
