//! Loads the embedded XDP program into the kernel and attaches it.

mod attach;
mod egress_tc;
mod fill;
mod kernel;
mod probe;
mod shapes;
mod tc_netlink;

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::MapError,
    programs::{
        ProgramError, SchedClassifier, Xdp, links::LinkError, tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
    },
};
use filter_common::{BitmapChunk, Counter, names, reason, source_bucket_count};
use thiserror::Error;

pub use attach::{
    AttachMode, Attached, Installed, detach, if_index, interface_exists, wait_for_running_programs,
};
pub use fill::fill_trie;
use fill::{fill_array, fill_maps};
pub use kernel::{MIN_KERNEL, VERIFIER_LOG_DIR, check_kernel, has_tcx, kernel_version};
use kernel::{log_verified, refused};
pub use probe::{program_verdict, time_program, xdp_action};
pub use shapes::shared_map_shapes;

use crate::{
    kernel::counters,
    kernel::guard::{self, GuardReport, Listeners},
    kernel::pins::{self, PinError},
    rules::compile::RuleSet,
    rules::config::GuardAction,
};

/// How [`Filter::load_with`] loads an instance.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions<'a> {
    /// Pin (or reuse) the shared maps here.
    pub pins: Option<&'a Path>,
    /// Events per second and CPU (`filter_common::event`); 0 sends none.
    pub event_rate: u32,
    /// Record each verdict's slot (for [`Filter::trace_frame`]).
    pub trace: bool,
    /// The key of the per-source buckets' hash (`filter_common::source_hash`);
    /// `None` draws one from the kernel's random source, as the agent does.
    pub source_seed: Option<u64>,
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
    #[error("cannot parse the eBPF object")]
    Parse(#[source] aya_obj::ParseError),
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
    #[error("cannot draw the seed of the per-source buckets' hash")]
    Seed(#[source] getrandom::Error),
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
    Pins(#[from] PinError),
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
            ..LoadOptions::default()
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

    /// Loads an instance as `options` say; the ways above are shorthands.
    pub fn load_with(rules: &RuleSet, options: &LoadOptions<'_>) -> Result<Self, LoadError> {
        let mut ebpf = open(rules, options)?;
        fill_maps(&mut ebpf, rules)?;
        let guard_on = rules.guard.action != GuardAction::Off;
        verify(&mut ebpf, guard_on)?;
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

    /// What the guard has counted (the pinned maps, when pinned).
    pub fn guard_report(&self) -> Result<GuardReport, LoadError> {
        let map = |name: &str| {
            self.ebpf
                .map(name)
                .ok_or_else(|| PinError::NotPinned(PathBuf::from(name)))
        };
        Ok(GuardReport::read(map)?)
    }

    /// Returns the aya-log reader for the program, if it logs at all.
    pub fn logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// Counters per `filter_common::reason`, summed over CPUs.
    pub fn counters(&self) -> Result<[Counter; reason::COUNT as usize], LoadError> {
        self.fixed_counters(names::STATS)
    }

    /// The guard's counters per `filter_common::guard` statistic, summed
    /// over CPUs.
    pub fn guard_stats(
        &self,
    ) -> Result<[Counter; filter_common::guard::STAT_COUNT as usize], LoadError> {
        self.fixed_counters(names::GUARD_STATS)
    }

    fn fixed_counters<const N: usize>(&self, name: &str) -> Result<[Counter; N], LoadError> {
        let mut totals = [Counter::default(); N];
        for (total, counter) in totals.iter_mut().zip(self.sum_counters(name)?) {
            *total = counter;
        }
        Ok(totals)
    }

    /// Counters per rule (in `RuleSet::rules` order), summed over CPUs.
    pub fn rule_counters(&self) -> Result<Vec<Counter>, LoadError> {
        self.sum_counters(names::RULE_STATS)
    }

    /// Per rule, the packets its rate limit dropped, summed over CPUs.
    pub fn over_limit_counters(&self) -> Result<Vec<Counter>, LoadError> {
        self.sum_counters(names::RULE_OVER_LIMIT)
    }

    fn sum_counters(&self, name: &str) -> Result<Vec<Counter>, LoadError> {
        let map = self.ebpf.map(name).ok_or_else(|| missing_map(name))?;
        Ok(counters::array_totals(map)?)
    }
}

/// Reads the object with the rule set's settings as its globals and its
/// maps sized for the rule set (the shared ones pinned as `options` say).
fn open(rules: &RuleSet, options: &LoadOptions<'_>) -> Result<Ebpf, LoadError> {
    let trace = u32::from(options.trace);
    let settings = &rules.settings;
    let (default_action, mode) = (settings.default.raw(), settings.mode.raw());
    let fragments = settings.fragments.raw();
    let guard_mode = rules.guard.action.raw();
    let (low, high) = rules.guard.ephemeral;
    let (low, high) = (u32::from(low), u32::from(high));
    let entries = |len: usize| (len as u32).max(1);
    // One value per class: all its chunks (`by_class`).
    let classes = |bitmaps: &[BitmapChunk]| entries(bitmaps.len() / rules.chunks as usize);
    let rule_count = entries(rules.rules.len());
    let source_buckets = if rules.has_source_limits() {
        source_bucket_count(settings.limit_sources)
    } else {
        1
    };
    let source_seed = match options.source_seed {
        Some(seed) => seed,
        None => getrandom::u64().map_err(LoadError::Seed)?,
    };
    let source_index_mask = source_buckets - 1;
    let custom = ProgramObject::get()?;
    let mut loader = EbpfLoader::new();
    if let Some(dir) = options.pins {
        for name in pins::SHARED_MAPS {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    Ok(loader
        .override_global(names::GUARD_MODE, &guard_mode, true)
        .override_global(names::EPHEMERAL_LOW, &low, true)
        .override_global(names::EPHEMERAL_HIGH, &high, true)
        .override_global(names::DEFAULT_ACTION, &default_action, true)
        .override_global(names::MODE, &mode, true)
        .override_global(names::FRAGMENTS, &fragments, true)
        .override_global(names::CHUNKS, &rules.chunks, true)
        .override_global(names::PAIR_SRC_SHIFT, &rules.pairs.src_shift, true)
        .override_global(names::PAIR_DST_SHIFT, &rules.pairs.dst_shift, true)
        .override_global(names::PAIR_DST_GROUPS, &rules.pairs.dst_groups, true)
        .override_global(names::TRACE, &trace, true)
        .override_global(names::EVENT_RATE, &options.event_rate, true)
        .override_global(names::SOURCE_SEED, &source_seed, true)
        .override_global(names::SOURCE_INDEX_MASK, &source_index_mask, true)
        .map_max_entries(names::SRC_ENTRIES, rules.src.trie.entry_blocks())
        .map_max_entries(names::SRC_NODES, rules.src.trie.node_blocks())
        .map_max_entries(names::DST_ENTRIES, rules.dst.trie.entry_blocks())
        .map_max_entries(names::DST_NODES, rules.dst.trie.node_blocks())
        .map_max_entries(names::SRC_BITS, classes(&rules.src.bitmaps))
        .map_max_entries(names::DST_BITS, classes(&rules.dst.bitmaps))
        .map_max_entries(names::PROTO_BITS, classes(&rules.proto.bitmaps))
        .map_max_entries(names::SPORT_BITS, classes(&rules.sport.bitmaps))
        .map_max_entries(names::DPORT_BITS, classes(&rules.dport.bitmaps))
        .map_max_entries(names::PAIR_SUMMARY, entries(rules.pairs.summaries.len()))
        .map_max_entries(names::RULE_STATS, rule_count)
        .map_max_entries(names::RULE_ACTIONS, rule_count)
        .map_max_entries(names::RULE_OVER_LIMIT, rule_count)
        .map_max_entries(names::LIMITS, entries(rules.limits().len()))
        .map_max_entries(names::SOURCE_BUCKETS, source_buckets)
        .load(custom.as_ref().map_or(PROGRAM_OBJECT, ProgramObject::bytes))?)
}

/// Hands the programs to the verifier: the filter, and the guard's egress
/// half when the guard is on.
fn verify(ebpf: &mut Ebpf, guard_on: bool) -> Result<(), LoadError> {
    let program = program_mut(ebpf)?;
    program.load().map_err(|err| refused(names::PROGRAM, err))?;
    log_verified(names::PROGRAM, program.info());
    if guard_on {
        let egress = egress_mut(ebpf)?;
        let loaded = egress.load();
        loaded.map_err(|err| refused(names::EGRESS_PROGRAM, err))?;
        log_verified(names::EGRESS_PROGRAM, egress.info());
    }
    Ok(())
}

fn missing_map(name: &str) -> LoadError {
    LoadError::Counters(MapError::InvalidName {
        name: name.to_owned(),
    })
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map, LoadError> {
    ebpf.map_mut(name).ok_or_else(|| missing_map(name))
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
