//! The only module that knows the agent's bpffs layout. What is pinned for
//! each interface outlives the agent (fail-static), and other commands
//! (`stats`, `guard`, `detach`) read or remove it while the agent is down:
//!
//! ```text
//! /sys/fs/bpf/filter-agent/IFACE/
//!   xdp_link, egress_link      the attachments
//!   egress_tc                  before TCX: which tc filter is the agent's
//!   STATS, GUARD_*, UDP_FLOWS  counters shared by every program instance
//!   EVENTS                     the event ring buffer
//!   RULE_STATS, RULE_OVER_LIMIT  per-rule per-CPU counters of the running rules
//!   RULES                      their names, actions and carried-over counts
//!   LAYOUT                     the layout's version and the rules' generation
//! ```
//!
//! The directory is also the interface's lock: an agent holds `flock` on
//! it for as long as it runs. Nothing here loads or detaches a program:
//! `loader` does, through these paths.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::maps::{Map, MapData, MapError};
use filter_common::names;
use thiserror::Error;

/// Where everything is pinned.
pub const ROOT: &str = "/sys/fs/bpf/filter-agent";
/// The pinned XDP link.
pub const XDP_LINK: &str = "xdp_link";
/// The guard's pinned egress (TCX) link.
pub const EGRESS_LINK: &str = "egress_link";
/// Before TCX, the guard's egress program is a tc filter, which cannot be
/// pinned: this pinned one-entry map records which one is the agent's.
pub const EGRESS_TC: &str = "egress_tc";
/// The rule table (`counters::RuleRecord`).
pub const RULES: &str = "RULES";
/// Maps shared by every program instance on an interface: the reason and
/// guard counters keep counting across rule swaps and restarts.
pub const SHARED_MAPS: [&str; 6] = [
    names::STATS,
    names::EVENTS,
    names::GUARD_STATS,
    names::GUARD_PORTS,
    names::GUARD_PEERS,
    names::UDP_FLOWS,
];

#[derive(Debug, Error)]
pub enum PinError {
    #[error("another filter-agent is already running for {0}")]
    Locked(String),
    #[error("refusing {}: {why}; remove it as root (`filter-agent detach` or `rm -r`) and start again", path.display())]
    Unsafe { path: PathBuf, why: String },
    #[error("cannot use {}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("no filter-agent state under {} (never attached, or detached)", .0.display())]
    NotPinned(PathBuf),
    #[error("no guard maps under {} (is filter-agent running on that interface?)", .0.display())]
    NoGuardMaps(PathBuf),
    #[error("cannot read pinned map {}", path.display())]
    Read { path: PathBuf, source: MapError },
    #[error("cannot pin {}", path.display())]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
}

/// The pin directory for one interface.
pub fn dir(iface: &str) -> PathBuf {
    Path::new(ROOT).join(iface)
}

/// The interfaces that have a pin directory, by name.
pub fn interfaces() -> io::Result<Vec<String>> {
    let dirs = std::fs::read_dir(ROOT)?;
    let mut names: Vec<String> = dirs
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// Opens the map pinned as `name` in `dir`.
pub fn open_map(dir: &Path, name: &str) -> Result<Map, PinError> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(PinError::NotPinned(dir.to_owned()));
    }
    MapData::from_pin(&path)
        .and_then(Map::from_map_data)
        .map_err(|source| PinError::Read { path, source })
}

/// Pins something at a staging name next to `path` with `pin`, then
/// renames it over `path`, so readers see the old object or the new one.
pub fn replace(
    path: &Path,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), PinError> {
    // bpffs refuses names with a dot.
    let mut staged = path.as_os_str().to_owned();
    staged.push("_staged");
    let staged = PathBuf::from(staged);
    let _ = std::fs::remove_file(&staged);
    pin(&staged).map_err(|source| PinError::Pin {
        path: staged.clone(),
        source,
    })?;
    std::fs::rename(&staged, path).map_err(|source| io_error(path, source))
}

/// Unpins `name` in `dir`; an absent pin is not an error.
pub fn unpin(dir: &Path, name: &str) -> Result<(), PinError> {
    let path = dir.join(name);
    match std::fs::remove_file(&path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(io_error(&path, err)),
        _ => Ok(()),
    }
}

/// Removes everything pinned in `dir`, `dir` itself, and [`ROOT`] when that
/// leaves it empty. Links pinned there detach once no process holds them.
pub fn remove(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
    let _ = std::fs::remove_dir(ROOT);
}

fn io_error(path: &Path, source: io::Error) -> PinError {
    PinError::Io {
        path: path.to_owned(),
        source,
    }
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
    pub fn acquire(iface: &str) -> Result<Self, PinError> {
        private_dir(Path::new(ROOT))?;
        let path = dir(iface);
        private_dir(&path)?;
        check_entries(&path)?;
        Self::try_lock(&path)?.ok_or_else(|| PinError::Locked(iface.to_owned()))
    }

    /// Locks `iface`'s existing pin directory to remove it, whoever made it.
    pub fn existing(iface: &str) -> Result<Self, PinError> {
        Self::try_lock(&dir(iface))?.ok_or_else(|| PinError::Locked(iface.to_owned()))
    }

    /// Locks the directory at `path`; `None` when another process holds it.
    fn try_lock(path: &Path) -> Result<Option<Self>, PinError> {
        let dir = File::open(path).map_err(|err| io_error(path, err))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Ok(None)
            } else {
                Err(io_error(path, err))
            };
        }
        Ok(Some(Self { _dir: dir }))
    }
}

/// Makes `path` a directory only its owner can use (mode 0700, whatever the
/// umask), or checks that the one there is the agent's and that nobody else
/// can change what is in it: a directory another user owns, or one that
/// group or others may write, could have its pins deleted or swapped.
pub fn private_dir(path: &Path) -> Result<(), PinError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {
            return std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .map_err(|err| io_error(path, err));
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(io_error(path, err)),
    }
    let metadata = std::fs::symlink_metadata(path).map_err(|err| io_error(path, err))?;
    if !metadata.is_dir() {
        return Err(unsafe_path(path, "not a directory"));
    }
    check_owner(path, &metadata)
}

/// Every entry of a pin directory must be the agent's too.
fn check_entries(dir: &Path) -> Result<(), PinError> {
    let entries = std::fs::read_dir(dir).map_err(|err| io_error(dir, err))?;
    for entry in entries.flatten() {
        if let Ok(metadata) = entry.metadata() {
            check_owner(&entry.path(), &metadata)?;
        }
    }
    Ok(())
}

fn check_owner(path: &Path, metadata: &std::fs::Metadata) -> Result<(), PinError> {
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

fn unsafe_path(path: &Path, why: &str) -> PinError {
    PinError::Unsafe {
        path: path.to_owned(),
        why: why.to_owned(),
    }
}

/// The pin directory of an interface that is gone, locked for removal.
pub struct Vanished {
    pub iface: String,
    pub dir: PathBuf,
    pub lock: InterfaceLock,
}

/// The pin directories of interfaces that are gone: directories no agent
/// holds whose XDP link's device was deleted, or that hold no link at all
/// and name no interface here (left by a start that was interrupted).
/// Interfaces in other network namespaces keep theirs: the link says
/// whether its device exists, wherever it is. A directory another user
/// could have changed is left for the agent's start to refuse by name.
pub fn vanished(interface_exists: impl Fn(&str) -> bool) -> Vec<Vanished> {
    let Ok(dirs) = std::fs::read_dir(ROOT) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in dirs.flatten() {
        let dir = entry.path();
        let iface = entry.file_name().to_string_lossy().into_owned();
        let gone = match xdp_link_ifindex(&dir) {
            Ok(ifindex) => ifindex == 0,
            Err(err) => err.kind() == io::ErrorKind::NotFound && !interface_exists(&iface),
        };
        let trusted = std::fs::symlink_metadata(&dir)
            .is_ok_and(|metadata| metadata.is_dir() && check_owner(&dir, &metadata).is_ok());
        if !gone || !trusted {
            continue;
        }
        // Held: an agent is starting or running there.
        if let Ok(Some(lock)) = InterfaceLock::try_lock(&dir) {
            found.push(Vanished { iface, dir, lock });
        }
    }
    found
}

/// The index of the device the XDP link pinned in `dir` is attached to:
/// 0 once that device was deleted (the link is then defunct and filters
/// nothing). Read from the link's fdinfo, which names the index whatever
/// network namespace the device was in.
pub fn xdp_link_ifindex(dir: &Path) -> io::Result<u32> {
    xdp_link_field(dir, "ifindex:")
}

/// The id of the program the XDP link pinned in `dir` runs.
pub fn xdp_link_program(dir: &Path) -> io::Result<u32> {
    xdp_link_field(dir, "prog_id:")
}

fn xdp_link_field(dir: &Path, field: &str) -> io::Result<u32> {
    let path = dir.join(XDP_LINK);
    let link = pinned_object(&path)?;
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", link.as_raw_fd()))?;
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("{} is not an XDP link", path.display())))
}

/// Opens the BPF object pinned at `path` (`BPF_OBJ_GET`).
fn pinned_object(path: &Path) -> io::Result<OwnedFd> {
    /// The `BPF_OBJ_GET` part of `union bpf_attr`.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        reserved: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        reserved: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed, and
    // `path` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
