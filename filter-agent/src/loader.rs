//! Loads the embedded XDP program into the kernel and attaches it.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader, Pod,
    maps::{Array, MapData, MapError, PerCpuArray, RingBuf},
    pin::PinError,
    programs::{
        ProgramError, ProgramInfo, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions,
        TestRunResult, Xdp, XdpMode,
        links::{FdLink, Link as _, LinkError, PinnedLink},
        tc::{
            NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcError,
            TcHandle,
        },
        xdp::{XdpLink, XdpLinkId},
    },
    sys::SyscallError,
    util::KernelVersion,
};
use filter_common::{Counter, DECISION_RULE, Event, fragments, names, reason};
use thiserror::Error;

use crate::{
    cli::XdpModeArg,
    compile::{AddressDim, RuleSet, TableDim},
    config::{Fragments, GuardAction},
    guard::{self, GuardError, GuardReport, Listeners},
    reference::Outcome,
};

/// Where the agent pins the maps that outlive a rule swap (the guard's).
pub const PIN_ROOT: &str = "/sys/fs/bpf/filter-agent";

/// The pin directory for one interface.
pub fn pin_dir(iface: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(iface)
}

/// Removes everything pinned in `dir` (which detaches the filter once no
/// process holds its links any more), `dir` itself, and [`PIN_ROOT`] when
/// that leaves it empty.
pub fn remove_pins(dir: &Path) {
    if let Err(err) = remove_egress_filter(dir) {
        tracing::warn!(%err, dir = %dir.display(), "cannot remove the guard's tc egress filter");
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
    let _ = std::fs::remove_dir(PIN_ROOT);
}

/// The index of the device the XDP link pinned at `path` is attached to:
/// 0 once that device was deleted (the link is then defunct and filters
/// nothing). Read from the link's fdinfo, which names the index whatever
/// network namespace the device was in.
pub fn pinned_xdp_ifindex(path: &Path) -> io::Result<u32> {
    let link = pinned_object(path)?;
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", link.as_raw_fd()))?;
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("ifindex:"))
        .and_then(|index| index.trim().parse().ok())
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

/// How [`Filter::load_with`] loads an instance.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions<'a> {
    /// Pin (or reuse) the shared maps here.
    pub pins: Option<&'a Path>,
    /// Events per second and CPU (`filter_common::event`); 0 sends none.
    pub event_rate: u32,
    /// Record each verdict's slot (for [`Filter::trace_frame`]).
    pub trace: bool,
}

/// The pinned XDP link and the guard's egress (TCX) link.
pub const XDP_LINK_PIN: &str = "xdp_link";
pub const EGRESS_LINK_PIN: &str = "egress_link";
/// Before TCX, the guard's egress program is a tc filter, which cannot be
/// pinned: this pinned one-entry map records which one is the agent's.
pub const EGRESS_TC_PIN: &str = "egress_tc";

/// The oldest kernel filter-agent runs on (Debian 11's, tested in a VM):
/// it needs XDP links (5.9) and BPF ring buffers (5.8).
pub const MIN_KERNEL: (u8, u8) = (5, 10);
/// TCX, and with it pinnable tc links, arrived in Linux 6.6.
const TCX_KERNEL: (u8, u8) = (6, 6);
/// Where the tc fallback filter sits on the clsact egress hook: fixed, so
/// that a restart finds it and replaces its program in place, and before
/// the filters `tc` adds without a pref (49152 and down), because the
/// program only counts and lets the next filter decide.
const TC_PRIORITY: u16 = 4001;
const TC_HANDLE: TcHandle = TcHandle::new(0, 0xfa17);
/// Where a refused program's verifier log is written: the agent's runtime
/// directory.
pub const VERIFIER_LOG_DIR: &str = crate::events::SOCKET_DIR;

/// The record behind [`EGRESS_TC_PIN`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TcRecord {
    /// The interface the filter was added to (a re-created interface with
    /// the same name has a new index and none of the old filters).
    pub ifindex: u32,
    /// 1 when the agent added the clsact qdisc itself, so it may remove it
    /// again once no filter is left in it.
    pub created_qdisc: u32,
}

// SAFETY: `repr(C)`, two `u32`, no padding.
unsafe impl Pod for TcRecord {}

/// The running kernel's version, as aya reads it (Debian's included).
pub fn kernel_version() -> Option<KernelVersion> {
    KernelVersion::current().ok()
}

/// Refuses kernels older than [`MIN_KERNEL`] with one line.
pub fn check_kernel() -> Result<(), LoadError> {
    match kernel_version() {
        Some(version) if !supported(version) => Err(LoadError::OldKernel(version.to_string())),
        _ => Ok(()),
    }
}

fn supported(version: KernelVersion) -> bool {
    at_least(version, MIN_KERNEL)
}

fn at_least(version: KernelVersion, (major, minor): (u8, u8)) -> bool {
    version >= KernelVersion::new(major, minor, 0)
}

/// Whether the guard's egress program can use a TCX link.
pub fn has_tcx() -> bool {
    kernel_version().is_some_and(|version| at_least(version, TCX_KERNEL))
}

/// How [`Filter::attach_pinned`] attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new attachment, in this XDP mode.
    Fresh(&'static str),
    /// The pinned links now run this program.
    Adopted,
}

/// Hands the link pinned at `path` to `update` (a `bpf_link_update`):
/// `Ok(false)` when there is none to adopt. A pinned link that cannot be
/// updated because its interface is gone is unpinned and reported as none.
fn adopt<L: TryFrom<FdLink, Error = LinkError>>(
    path: &Path,
    update: impl FnOnce(L) -> Result<(), LoadError>,
) -> Result<bool, LoadError> {
    if !path.exists() {
        return Ok(false);
    }
    let link = PinnedLink::from_pin(path)?;
    let link = L::try_from(FdLink::from(link))?;
    match update(link) {
        Ok(()) => Ok(true),
        Err(LoadError::Program(ProgramError::SyscallError(SyscallError { io_error, .. })))
            if io_error.raw_os_error() == Some(libc::ENOLINK) =>
        {
            tracing::warn!(path = %path.display(), "replacing a pinned link whose interface is gone");
            std::fs::remove_file(path).map_err(|source| LoadError::Unpin {
                path: path.to_owned(),
                source,
            })?;
            Ok(false)
        }
        Err(err) => Err(err),
    }
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), LoadError> {
    link.pin(path).map(drop).map_err(|source| LoadError::Pin {
        path: path.to_owned(),
        source,
    })
}

/// Pins something at a staging name next to `path` with `pin`, then
/// renames it over `path`, so readers see the old object or the new one.
pub fn replace_pin(
    path: &Path,
    pin: impl FnOnce(&Path) -> Result<(), PinError>,
) -> Result<(), LoadError> {
    // bpffs refuses names with a dot.
    let mut staged = path.as_os_str().to_owned();
    staged.push("_staged");
    let staged = PathBuf::from(staged);
    let _ = std::fs::remove_file(&staged);
    pin(&staged).map_err(|source| LoadError::Pin {
        path: staged.clone(),
        source,
    })?;
    std::fs::rename(&staged, path).map_err(|source| LoadError::Unpin {
        path: path.to_owned(),
        source,
    })
}

/// Maps shared by every program instance on an interface: the reason and
/// guard counters keep counting across rule swaps and restarts.
const PINNED_MAPS: [&str; 6] = [
    names::STATS,
    names::EVENTS,
    names::GUARD_STATS,
    names::GUARD_PORTS,
    names::GUARD_PEERS,
    names::UDP_FLOWS,
];

/// XDP actions as BPF_PROG_TEST_RUN reports them.
pub mod xdp_action {
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
}

/// The XDP object built by build.rs from filter-ebpf.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/filter"));
/// Names an object file to load instead of the embedded one: a custom
/// build of filter-ebpf, or (in the tests) a program the kernel refuses.
pub const OBJECT_ENV: &str = "FILTER_AGENT_BPF_OBJECT";

/// The object to load: the embedded one, or the file [`OBJECT_ENV`] names,
/// copied into 8-byte-aligned memory as the ELF parser needs.
struct ProgramObject {
    words: Vec<u64>,
    len: usize,
}

impl ProgramObject {
    fn get() -> Result<Option<Self>, LoadError> {
        let Some(path) = std::env::var_os(OBJECT_ENV) else {
            return Ok(None);
        };
        let bytes = std::fs::read(&path).map_err(|source| LoadError::ObjectFile {
            path: PathBuf::from(&path),
            source,
        })?;
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut padded = [0u8; 8];
            padded[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_ne_bytes(padded);
        }
        Ok(Some(Self {
            words,
            len: bytes.len(),
        }))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot load the eBPF object")]
    Object(#[from] EbpfError),
    #[error("cannot read the eBPF object {} (${OBJECT_ENV})", path.display())]
    ObjectFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the eBPF object has no program named `{0}`")]
    MissingProgram(&'static str),
    #[error("the kernel rejected the XDP program")]
    Program(#[from] ProgramError),
    #[error(
        "filter-agent needs Linux {major}.{minor} or later (XDP links, BPF ring buffers); this is Linux {0}",
        major = MIN_KERNEL.0,
        minor = MIN_KERNEL.1
    )]
    OldKernel(String),
    #[error(
        "the kernel (Linux {kernel}) refused the program `{program}`: {reason}; likely cause: \
         {cause}; the verifier's log is in {log}"
    )]
    Refused {
        program: &'static str,
        kernel: String,
        reason: String,
        cause: &'static str,
        log: String,
    },
    #[error("the filter is not attached to an interface")]
    NotAttached,
    #[error("no network interface named `{0}`")]
    UnknownInterface(String),
    #[error(
        "{0} already has an XDP program attached (another filter-agent? see `ip link show {0}`)"
    )]
    AlreadyAttached(String),
    #[error(
        "cannot attach to {iface} in {mode} mode{hint}",
        hint = if *mode == "native" {
            " (the driver may lack native XDP: try --xdp-mode skb)"
        } else {
            ""
        }
    )]
    Attach {
        iface: String,
        mode: &'static str,
        source: ProgramError,
    },
    #[error("cannot read counters")]
    Counters(#[from] MapError),
    #[error("a test packet moved {0} counters instead of one (is another packet flowing?)")]
    Counted(usize),
    #[error("cannot fill map {map}")]
    Fill { map: String, source: MapError },
    #[error("cannot attach the guard's egress program to {iface}")]
    AttachEgress { iface: String, source: ProgramError },
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error("cannot pin {}", path.display())]
    Pin { path: PathBuf, source: PinError },
    #[error("cannot replace or remove {}", path.display())]
    Unpin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the pinned link is not usable")]
    Link(#[from] LinkError),
    #[error("cannot remove the clsact qdisc the agent added")]
    Qdisc(#[source] std::io::Error),
}

/// The loaded program and its maps. Dropping it detaches the program.
pub struct Filter {
    ebpf: Ebpf,
    /// The attachment, once attached.
    link: Option<XdpLinkId>,
    /// The guard's egress attachment (absent with `[guard] action = "off"`).
    egress: Option<SchedClassifierLinkId>,
    guard_on: bool,
}

impl Filter {
    /// Loads the program with `rules` into the kernel (not yet attached):
    /// a fresh program and maps sized for this rule set, filled before the
    /// program can see a packet.
    pub fn load(rules: &RuleSet) -> Result<Self, LoadError> {
        Self::load_with(rules, &LoadOptions::default())
    }

    /// Like [`Filter::load`], for the agent: the shared maps pinned in
    /// `dir` (and reused when already there), so that they keep their counts
    /// across rule swaps and other commands can read them, and events at
    /// `event_rate` per second and CPU.
    pub fn load_pinned(rules: &RuleSet, dir: &Path, event_rate: u32) -> Result<Self, LoadError> {
        let options = LoadOptions {
            pins: Some(dir),
            event_rate,
            trace: false,
        };
        Self::load_with(rules, &options)
    }

    /// Loads an instance that records each verdict's slot, for
    /// [`Filter::trace_frame`] (`filter-agent test` and `replay`). Never
    /// attached: tracing costs a map write per packet.
    pub fn load_traced(rules: &RuleSet) -> Result<Self, LoadError> {
        let options = LoadOptions {
            trace: true,
            ..LoadOptions::default()
        };
        Self::load_with(rules, &options)
    }

    pub fn load_with(rules: &RuleSet, options: &LoadOptions<'_>) -> Result<Self, LoadError> {
        let trace = u32::from(options.trace);
        let event_rate = options.event_rate;
        let settings = &rules.settings;
        let default_action = settings.default.raw();
        let mode = settings.mode.raw();
        let fragments = match settings.fragments {
            Fragments::MatchL3 => fragments::MATCH_L3,
            Fragments::Allow => fragments::ALLOW,
            Fragments::Deny => fragments::DENY,
        };
        let guard_mode = rules.guard.action.raw();
        let (low, high) = rules.guard.ephemeral;
        let (low, high) = (u32::from(low), u32::from(high));
        let entries = |len: usize| (len as u32).max(1);
        let rule_count = entries(rules.rules.len());
        let custom = ProgramObject::get()?;
        let mut loader = EbpfLoader::new();
        if let Some(dir) = options.pins {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .override_global(names::GUARD_MODE, &guard_mode, true)
            .override_global(names::EPHEMERAL_LOW, &low, true)
            .override_global(names::EPHEMERAL_HIGH, &high, true)
            .override_global(names::DEFAULT_ACTION, &default_action, true)
            .override_global(names::MODE, &mode, true)
            .override_global(names::FRAGMENTS, &fragments, true)
            .override_global(names::CHUNKS, &rules.chunks, true)
            .override_global(names::TRACE, &trace, true)
            .override_global(names::EVENT_RATE, &event_rate, true)
            .map_max_entries(names::SRC_NODES, entries(rules.src.blocks.len()))
            .map_max_entries(names::DST_NODES, entries(rules.dst.blocks.len()))
            .map_max_entries(names::SRC_BITS, entries(rules.src.bitmaps.len()))
            .map_max_entries(names::DST_BITS, entries(rules.dst.bitmaps.len()))
            .map_max_entries(names::PROTO_BITS, entries(rules.proto.bitmaps.len()))
            .map_max_entries(names::SPORT_BITS, entries(rules.sport.bitmaps.len()))
            .map_max_entries(names::DPORT_BITS, entries(rules.dport.bitmaps.len()))
            .map_max_entries(names::RULE_STATS, rule_count)
            .map_max_entries(names::RULE_ACTIONS, rule_count)
            .load(custom.as_ref().map_or(PROGRAM_OBJECT, ProgramObject::bytes))?;
        fill_addresses(&mut ebpf, names::SRC_NODES, names::SRC_BITS, &rules.src)?;
        fill_addresses(&mut ebpf, names::DST_NODES, names::DST_BITS, &rules.dst)?;
        fill_table(
            &mut ebpf,
            names::PROTO_CLASS,
            names::PROTO_BITS,
            &rules.proto,
        )?;
        fill_table(
            &mut ebpf,
            names::SPORT_CLASS,
            names::SPORT_BITS,
            &rules.sport,
        )?;
        fill_table(
            &mut ebpf,
            names::DPORT_CLASS,
            names::DPORT_BITS,
            &rules.dport,
        )?;
        let actions = rules.rules.iter().map(|rule| rule.action.raw());
        fill_array(&mut ebpf, names::RULE_ACTIONS, actions.enumerate())?;
        let services = guard::service_words(&rules.guard.services, &Listeners::default());
        fill_array(
            &mut ebpf,
            names::SERVICE_PORTS,
            services.into_iter().enumerate(),
        )?;
        let program = program_mut(&mut ebpf)?;
        program.load().map_err(|err| refused(names::PROGRAM, err))?;
        log_verified(names::PROGRAM, program.info());
        let guard_on = rules.guard.action != GuardAction::Off;
        if guard_on {
            let egress = egress_mut(&mut ebpf)?;
            egress
                .load()
                .map_err(|err| refused(names::EGRESS_PROGRAM, err))?;
            log_verified(names::EGRESS_PROGRAM, egress.info());
        }
        Ok(Self {
            ebpf,
            link: None,
            egress: None,
            guard_on,
        })
    }

    /// Replaces the local service ports the guard ignores: the configured
    /// ones plus `listeners`. Takes effect at once, without a swap.
    pub fn set_services(
        &mut self,
        services: &[(u16, u16)],
        listeners: &Listeners,
    ) -> Result<(), LoadError> {
        let words = guard::service_words(services, listeners);
        fill_array(
            &mut self.ebpf,
            names::SERVICE_PORTS,
            words.into_iter().enumerate(),
        )
    }

    /// Takes the events waiting in this instance's ring buffer (those of an
    /// agent are read by the agent; this is for instances of one's own).
    pub fn take_events(&mut self) -> Result<Vec<Event>, LoadError> {
        let map = map_mut(&mut self.ebpf, names::EVENTS)?;
        let mut ring = RingBuf::try_from(map)?;
        let mut taken = Vec::new();
        while let Some(item) = ring.next() {
            taken.extend(crate::events::decode(&item));
        }
        Ok(taken)
    }

    /// The guard's counters, summed over CPUs (`filter_common::guard` order).
    pub fn guard_counters(
        &self,
    ) -> Result<[Counter; filter_common::guard::STAT_COUNT as usize], LoadError> {
        let map = self
            .ebpf
            .map(names::GUARD_STATS)
            .ok_or_else(|| missing_map(names::GUARD_STATS))?;
        Ok(guard::read_stats(map)?)
    }

    /// What the guard has counted (the pinned maps, when pinned).
    pub fn guard_report(&self) -> Result<GuardReport, LoadError> {
        Ok(GuardReport::read(|name| self.ebpf.map(name))?)
    }

    /// Returns the aya-log reader for the program, if it logs at all.
    pub fn logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// Attaches to `iface`; returns the mode actually used.
    pub fn attach(&mut self, iface: &str, mode: XdpModeArg) -> Result<&'static str, LoadError> {
        let mode = self.attach_xdp(iface, mode)?;
        self.attach_egress(iface)?;
        Ok(mode)
    }

    /// Attaches through the links pinned in `dir`, which outlive the agent
    /// (fail-static): when they exist, swaps this program in with one
    /// `bpf_link_update` each, so the interface is never unfiltered;
    /// otherwise attaches and pins them. A pin whose interface is gone (a
    /// defunct link) is replaced.
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        mode: XdpModeArg,
        dir: &Path,
    ) -> Result<Attached, LoadError> {
        let xdp_pin = dir.join(XDP_LINK_PIN);
        let attached = match adopt(&xdp_pin, |link: XdpLink| {
            program_mut(&mut self.ebpf)?.attach_to_link(link)?;
            Ok(())
        }) {
            Ok(true) => Attached::Adopted,
            Ok(false) => {
                let mode = self.attach_xdp(iface, mode)?;
                let id = self.link.take().ok_or(LoadError::NotAttached)?;
                let link = program_mut(&mut self.ebpf)?.take_link(id)?;
                pin_link(FdLink::try_from(link)?, &xdp_pin)?;
                Attached::Fresh(mode)
            }
            Err(err) => return Err(err),
        };
        let egress_pin = dir.join(EGRESS_LINK_PIN);
        if !self.guard_on {
            // The guard was switched off: its egress half goes.
            let _ = std::fs::remove_file(&egress_pin);
            remove_egress_filter(dir)?;
            return Ok(attached);
        }
        if !has_tcx() {
            self.attach_egress_filter(iface, dir)?;
            return Ok(attached);
        }
        let adopted = adopt(&egress_pin, |link: SchedClassifierLink| {
            egress_mut(&mut self.ebpf)?.attach_to_link(link)?;
            Ok(())
        })?;
        if !adopted {
            self.attach_egress(iface)?;
            let id = self.egress.take().ok_or(LoadError::NotAttached)?;
            let link = egress_mut(&mut self.ebpf)?.take_link(id)?;
            pin_link(FdLink::try_from(link)?, &egress_pin)?;
        }
        Ok(attached)
    }

    /// The guard's egress program before TCX: a tc filter at
    /// [`TC_PRIORITY`] on the clsact egress hook, recorded in
    /// [`EGRESS_TC_PIN`]. A restart replaces the program of the recorded
    /// filter in place (no gap); otherwise the filter is added, after the
    /// record, so that a failure from here on can be undone.
    fn attach_egress_filter(&mut self, iface: &str, dir: &Path) -> Result<(), LoadError> {
        let ifindex = if_index(iface).ok_or_else(|| LoadError::UnknownInterface(iface.into()))?;
        let record = read_tc_record(dir).filter(|record| record.ifindex == ifindex);
        let attach_error = |source: ProgramError| LoadError::AttachEgress {
            iface: iface.to_owned(),
            source,
        };
        let program = egress_mut(&mut self.ebpf)?;
        if record.is_some() {
            let link = egress_filter(iface).map_err(attach_error)?;
            match program.attach_to_link(link) {
                Ok(id) => {
                    // Not owned by this instance: it outlives the agent.
                    std::mem::forget(program.take_link(id)?);
                    return Ok(());
                }
                // The filter is gone (someone removed it): add it again.
                Err(err) if netlink_errno(&err) == Some(libc::ENOENT) => {}
                Err(err) => return Err(attach_error(err)),
            }
        }
        let created = match aya::programs::tc::qdisc_add_clsact(iface) {
            Ok(()) => true,
            Err(TcError::NetlinkError(err)) if err.raw_os_error() == Some(libc::EEXIST) => false,
            Err(err) => return Err(attach_error(err.into())),
        };
        let created = created || record.is_some_and(|record| record.created_qdisc != 0);
        write_tc_record(
            dir,
            TcRecord {
                ifindex,
                created_qdisc: u32::from(created),
            },
        )?;
        let options = NlOptions {
            priority: TC_PRIORITY,
            handle: TC_HANDLE,
            classid: None,
        };
        let id = program
            .attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(options),
            )
            .map_err(attach_error)?;
        std::mem::forget(program.take_link(id)?);
        Ok(())
    }

    /// Pins this instance's per-rule counters at `path`, replacing what is
    /// there in one rename.
    pub fn pin_rule_stats(&self, path: &Path) -> Result<(), LoadError> {
        let map = self
            .ebpf
            .map(names::RULE_STATS)
            .ok_or_else(|| missing_map(names::RULE_STATS))?;
        replace_pin(path, |staged| map.pin(staged))
    }

    fn attach_xdp(&mut self, iface: &str, mode: XdpModeArg) -> Result<&'static str, LoadError> {
        if if_index(iface).is_none() {
            return Err(LoadError::UnknownInterface(iface.to_owned()));
        }
        let program = program_mut(&mut self.ebpf)?;
        let try_mode = |program: &mut Xdp, xdp_mode, name: &'static str| {
            program
                .attach(iface, xdp_mode)
                .map(|link| (link, name))
                .map_err(|source| match &source {
                    ProgramError::SyscallError(SyscallError { io_error, .. })
                        if matches!(io_error.raw_os_error(), Some(libc::EEXIST | libc::EBUSY)) =>
                    {
                        LoadError::AlreadyAttached(iface.to_owned())
                    }
                    _ => LoadError::Attach {
                        iface: iface.to_owned(),
                        mode: name,
                        source,
                    },
                })
        };
        let (link, name) = match mode {
            XdpModeArg::Native => try_mode(program, XdpMode::Driver, "native"),
            XdpModeArg::Skb => try_mode(program, XdpMode::Skb, "skb"),
            XdpModeArg::Auto => try_mode(program, XdpMode::Driver, "native").or_else(|err| {
                if matches!(err, LoadError::AlreadyAttached(_)) {
                    return Err(err);
                }
                tracing::warn!(%err, "native XDP unavailable; falling back to skb (generic) mode, which is slower");
                try_mode(program, XdpMode::Skb, "skb")
            }),
        }?;
        self.link = Some(link);
        Ok(name)
    }

    /// Attaches the guard's egress program (TCX on kernels >= 6.6, else a
    /// clsact qdisc), unless the guard is off.
    fn attach_egress(&mut self, iface: &str) -> Result<(), LoadError> {
        if !self.guard_on {
            return Ok(());
        }
        let program = egress_mut(&mut self.ebpf)?;
        let link = program
            .attach(iface, TcAttachType::Egress)
            .or_else(|_| {
                // Before TCX (Linux 6.6) the program needs a clsact qdisc.
                let _ = aya::programs::tc::qdisc_add_clsact(iface);
                program.attach(iface, TcAttachType::Egress)
            })
            .map_err(|source| LoadError::AttachEgress {
                iface: iface.to_owned(),
                source,
            })?;
        self.egress = Some(link);
        Ok(())
    }

    /// Runs `frame` through the loaded program (BPF_PROG_TEST_RUN) and
    /// returns the XDP action it chose.
    pub fn run_packet(&self, frame: &[u8]) -> Result<u32, LoadError> {
        Ok(test_run(self.program()?, frame, 1)?.return_value)
    }

    /// Runs `frame` `repeat` times and returns the kernel's mean time per run.
    pub fn time_packet(&self, frame: &[u8], repeat: u32) -> Result<std::time::Duration, LoadError> {
        time_program(self.program()?, frame, repeat)
    }

    fn program(&self) -> Result<&Xdp, LoadError> {
        let program = self
            .ebpf
            .program(names::PROGRAM)
            .ok_or(LoadError::MissingProgram(names::PROGRAM))?;
        Ok(program.try_into()?)
    }

    /// Runs `frame` through an instance from [`Filter::load_traced`] and
    /// reports the XDP action and the slot the program recorded: one map
    /// read, however many rules there are.
    pub fn trace_frame(&self, frame: &[u8]) -> Result<(u32, Outcome), LoadError> {
        let action = self.run_packet(frame)?;
        let map = self
            .ebpf
            .map(names::LAST_DECISION)
            .ok_or_else(|| missing_map(names::LAST_DECISION))?;
        let decision = Array::<_, u32>::try_from(map)?.get(&0, 0)?;
        let outcome = if decision & DECISION_RULE != 0 {
            Outcome::Rule((decision & !DECISION_RULE) as usize)
        } else {
            Outcome::Reason(decision)
        };
        Ok((action, outcome))
    }

    /// Runs `frame` through the program and reports the XDP action and the
    /// one counter it moved (which rule, or why no rule decided).
    pub fn classify_frame(&self, frame: &[u8]) -> Result<(u32, Outcome), LoadError> {
        let reasons = self.counters()?;
        let rules = self.rule_counters()?;
        let action = self.run_packet(frame)?;
        let moved_reason = (0u32..)
            .zip(reasons.iter().zip(self.counters()?))
            .filter(|(_, (before, after))| **before != *after)
            .map(|(index, _)| Outcome::Reason(index));
        let moved_rule = rules
            .iter()
            .zip(self.rule_counters()?)
            .enumerate()
            .filter(|(_, (before, after))| **before != *after)
            .map(|(index, _)| Outcome::Rule(index));
        let moved: Vec<Outcome> = moved_reason.chain(moved_rule).collect();
        match moved.as_slice() {
            [outcome] => Ok((action, *outcome)),
            _ => Err(LoadError::Counted(moved.len())),
        }
    }

    /// Counters per `filter_common::reason`, summed over CPUs.
    pub fn counters(&self) -> Result<[Counter; reason::COUNT as usize], LoadError> {
        let mut totals = [Counter::default(); reason::COUNT as usize];
        for (total, counter) in totals.iter_mut().zip(self.sum_counters(names::STATS)?) {
            *total = counter;
        }
        Ok(totals)
    }

    /// Counters per rule (in `RuleSet::rules` order), summed over CPUs.
    pub fn rule_counters(&self) -> Result<Vec<Counter>, LoadError> {
        self.sum_counters(names::RULE_STATS)
    }

    fn sum_counters(&self, name: &str) -> Result<Vec<Counter>, LoadError> {
        let map = self.ebpf.map(name).ok_or_else(|| missing_map(name))?;
        let per_cpu = PerCpuArray::<_, Counter>::try_from(map)?;
        per_cpu
            .iter()
            .map(|values| {
                let mut total = Counter::default();
                for value in values?.iter() {
                    total.add(value);
                }
                Ok(total)
            })
            .collect()
    }
}

fn missing_map(name: &str) -> LoadError {
    LoadError::Counters(MapError::InvalidName {
        name: name.to_owned(),
    })
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map, LoadError> {
    ebpf.map_mut(name).ok_or_else(|| missing_map(name))
}

/// Writes `(index, value)` pairs into array map `name`.
fn fill_array<V: Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    values: impl IntoIterator<Item = (usize, V)>,
) -> Result<(), LoadError> {
    let mut array = Array::<_, V>::try_from(map_mut(ebpf, name)?)?;
    for (index, value) in values {
        array
            .set(index as u32, value, 0)
            .map_err(|source| LoadError::Fill {
                map: name.to_owned(),
                source,
            })?;
    }
    Ok(())
}

fn fill_table(ebpf: &mut Ebpf, table: &str, bits: &str, dim: &TableDim) -> Result<(), LoadError> {
    // Maps start zeroed and class 0 is the most common: skip those writes.
    let nonzero = dim
        .table
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, class)| class != 0);
    fill_array(ebpf, table, nonzero)?;
    fill_array(ebpf, bits, dim.bitmaps.iter().copied().enumerate())
}

fn fill_addresses(
    ebpf: &mut Ebpf,
    nodes: &str,
    bits: &str,
    dim: &AddressDim,
) -> Result<(), LoadError> {
    fill_array(ebpf, nodes, dim.blocks.iter().copied().enumerate())?;
    fill_array(ebpf, bits, dim.bitmaps.iter().copied().enumerate())
}

/// Runs `frame` through any loaded XDP program `repeat` times
/// (BPF_PROG_TEST_RUN) and returns the kernel's mean time per run.
pub fn time_program(
    program: &Xdp,
    frame: &[u8],
    repeat: u32,
) -> Result<std::time::Duration, LoadError> {
    Ok(test_run(program, frame, repeat)?.duration)
}

fn test_run(program: &Xdp, frame: &[u8], repeat: u32) -> Result<TestRunResult, LoadError> {
    Ok(program.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    })?)
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let program = ebpf
        .program_mut(names::PROGRAM)
        .ok_or(LoadError::MissingProgram(names::PROGRAM))?;
    Ok(program.try_into()?)
}

fn egress_mut(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoadError> {
    let program = ebpf
        .program_mut(names::EGRESS_PROGRAM)
        .ok_or(LoadError::MissingProgram(names::EGRESS_PROGRAM))?;
    Ok(program.try_into()?)
}

/// Whether this network namespace has an interface named `iface`.
pub fn interface_exists(iface: &str) -> bool {
    if_index(iface).is_some()
}

/// The interface's index, or `None` when there is no such interface.
pub fn if_index(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the whole call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// How much work the verifier did on a program (kernels from 5.16 say),
/// at debug level: the figure that grows towards the verifier's limits.
fn log_verified(program: &str, info: Result<ProgramInfo, ProgramError>) {
    if let Ok(info) = info {
        tracing::debug!(
            program,
            verified_insns = info.verified_instruction_count().unwrap_or(0),
            xlated_bytes = info.size_translated().unwrap_or(0),
            "program verified"
        );
    }
}

/// The errno inside a netlink (tc) attach error.
fn netlink_errno(err: &ProgramError) -> Option<i32> {
    match err {
        ProgramError::TcError(TcError::NetlinkError(err)) => err.raw_os_error(),
        _ => None,
    }
}

/// The agent's tc egress filter on `iface` (before TCX), by its fixed
/// place on the hook.
fn egress_filter(iface: &str) -> Result<SchedClassifierLink, ProgramError> {
    SchedClassifierLink::attached(iface, TcAttachType::Egress, TC_PRIORITY, TC_HANDLE, None)
        .map_err(|err| TcError::IoError(err).into())
}

fn read_tc_record(dir: &Path) -> Option<TcRecord> {
    let map = MapData::from_pin(dir.join(EGRESS_TC_PIN)).ok()?;
    let map = aya::maps::Map::from_map_data(map).ok()?;
    Array::<_, TcRecord>::try_from(map).ok()?.get(&0, 0).ok()
}

fn write_tc_record(dir: &Path, record: TcRecord) -> Result<(), LoadError> {
    let fill = |source| LoadError::Fill {
        map: EGRESS_TC_PIN.to_owned(),
        source,
    };
    let mut array = Array::<MapData, TcRecord>::create(1, 0).map_err(fill)?;
    array.set(0, record, 0).map_err(fill)?;
    replace_pin(&dir.join(EGRESS_TC_PIN), |staged| array.pin(staged))
}

/// Removes the tc egress filter recorded in `dir` (if its interface still
/// exists: a deleted interface took its filters along), and the clsact
/// qdisc when the agent added it and nothing else is left in it.
fn remove_egress_filter(dir: &Path) -> Result<(), LoadError> {
    let Some(record) = read_tc_record(dir) else {
        return Ok(());
    };
    let iface = dir
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or_default();
    if if_index(iface) == Some(record.ifindex) {
        match egress_filter(iface).and_then(|link| link.detach()) {
            Ok(()) => {}
            Err(ProgramError::NetlinkError(err)) if err.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) => {
                return Err(LoadError::AttachEgress {
                    iface: iface.to_owned(),
                    source: err,
                });
            }
        }
        if record.created_qdisc != 0
            && crate::tc::clsact_is_empty(record.ifindex).map_err(LoadError::Qdisc)?
        {
            crate::tc::delete_clsact(record.ifindex).map_err(LoadError::Qdisc)?;
        }
    }
    let _ = std::fs::remove_file(dir.join(EGRESS_TC_PIN));
    Ok(())
}

/// The verifier's last words, which name what it refused (the statistics
/// it prints after them say nothing about why).
fn verifier_reason(log: &str) -> Option<&str> {
    log.lines().rev().map(str::trim).find(|line| {
        !line.is_empty()
            && !line.starts_with("processed ")
            && !line.starts_with("verification time")
            && !line.starts_with("stack depth")
    })
}

/// Turns a refused program into one line, with the verifier's log in a
/// file (or, when that cannot be written, at debug level in the log).
fn refused(program: &'static str, err: ProgramError) -> LoadError {
    let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = err
    else {
        return LoadError::Program(err);
    };
    let log = verifier_log.to_string();
    let reason = verifier_reason(&log).map_or_else(|| io_error.to_string(), str::to_owned);
    let file = Path::new(VERIFIER_LOG_DIR).join(format!("verifier-{program}.log"));
    let written = crate::state::private_dir(Path::new(VERIFIER_LOG_DIR)).is_ok()
        && std::fs::write(&file, &log).is_ok();
    let log = if written {
        file.display().to_string()
    } else {
        tracing::debug!(program, %log, "verifier log");
        "debug log (RUST_LOG=debug)".to_owned()
    };
    let old = kernel_version().is_some_and(|version| !supported(version));
    LoadError::Refused {
        program,
        kernel: kernel_version().map_or_else(|| "unknown".to_owned(), |v| v.to_string()),
        reason,
        cause: if old {
            "this kernel is older than filter-agent supports"
        } else {
            "this kernel's verifier cannot prove a check that newer ones do: please report it with the log"
        },
        log,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_is_the_last_line_before_the_statistics() {
        let log = "0: R1=ctx() R10=fp0\n\
                   53: (71) r2 = *(u8 *)(r1 +53)\n\
                   invalid access to packet, off=53 size=1, R1(id=0,off=53,r=34)\n\
                   R1 offset is outside of the packet\n\
                   processed 1021 insns (limit 1000000) max_states_per_insn 4\n\
                   verification time 2573 usec\n\
                   stack depth 96\n";
        assert_eq!(
            verifier_reason(log),
            Some("R1 offset is outside of the packet")
        );
        assert_eq!(verifier_reason(""), None);
    }

    #[test]
    fn kernels_from_5_10_are_supported() {
        assert!(!supported(KernelVersion::new(5, 4, 250)));
        assert!(!supported(KernelVersion::new(5, 9, 16)));
        assert!(supported(KernelVersion::new(5, 10, 0)));
        assert!(supported(KernelVersion::new(6, 1, 176)));
    }
}
