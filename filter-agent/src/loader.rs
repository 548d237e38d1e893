//! Loads the embedded XDP program into the kernel and attaches it.

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapError, PerCpuArray},
    programs::{ProgramError, TestRun as _, TestRunOptions, Xdp, XdpMode},
};
use filter_common::{Counter, names, reason};
use thiserror::Error;

use crate::{cli::XdpModeArg, config::FilterSettings};

/// The XDP object built by build.rs from filter-ebpf.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/filter"));

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot load the eBPF object")]
    Object(#[from] EbpfError),
    #[error("the eBPF object has no program named `{}`", names::PROGRAM)]
    MissingProgram,
    #[error("the kernel rejected the XDP program")]
    Program(#[from] ProgramError),
    #[error("no network interface named `{0}`")]
    UnknownInterface(String),
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
}

/// The loaded program and its maps. Dropping it detaches the program.
pub struct Filter {
    ebpf: Ebpf,
}

impl Filter {
    /// Loads the program with `settings` into the kernel (not yet attached).
    pub fn load(settings: &FilterSettings) -> Result<Self, LoadError> {
        let default_action = settings.default.raw();
        let mode = settings.mode.raw();
        let mut ebpf = EbpfLoader::new()
            .override_global(names::DEFAULT_ACTION, &default_action, true)
            .override_global(names::MODE, &mode, true)
            .load(PROGRAM_OBJECT)?;
        program_mut(&mut ebpf)?.load()?;
        Ok(Self { ebpf })
    }

    /// Returns the aya-log reader for the program, if it logs at all.
    pub fn logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// Attaches to `iface`; returns the mode actually used.
    pub fn attach(&mut self, iface: &str, mode: XdpModeArg) -> Result<&'static str, LoadError> {
        if if_index(iface).is_none() {
            return Err(LoadError::UnknownInterface(iface.to_owned()));
        }
        let program = program_mut(&mut self.ebpf)?;
        let try_mode = |program: &mut Xdp, xdp_mode, name: &'static str| {
            program
                .attach(iface, xdp_mode)
                .map(|_| name)
                .map_err(|source| LoadError::Attach {
                    iface: iface.to_owned(),
                    mode: name,
                    source,
                })
        };
        match mode {
            XdpModeArg::Native => try_mode(program, XdpMode::Driver, "native"),
            XdpModeArg::Skb => try_mode(program, XdpMode::Skb, "skb"),
            XdpModeArg::Auto => try_mode(program, XdpMode::Driver, "native").or_else(|err| {
                tracing::warn!(%err, "native XDP unavailable; falling back to skb (generic) mode, which is slower");
                try_mode(program, XdpMode::Skb, "skb")
            }),
        }
    }

    /// Runs `frame` through the loaded program (BPF_PROG_TEST_RUN) and
    /// returns the XDP action it chose.
    pub fn run_packet(&self, frame: &[u8]) -> Result<u32, LoadError> {
        let program: &Xdp = self
            .ebpf
            .program(names::PROGRAM)
            .ok_or(LoadError::MissingProgram)?
            .try_into()?;
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        })?;
        Ok(result.return_value)
    }

    /// Counters per `filter_common::reason`, summed over CPUs.
    pub fn counters(&self) -> Result<[Counter; reason::COUNT as usize], LoadError> {
        let map = self.ebpf.map(names::STATS).ok_or(MapError::InvalidName {
            name: names::STATS.to_owned(),
        })?;
        let stats = PerCpuArray::<_, Counter>::try_from(map)?;
        let mut totals = [Counter::default(); reason::COUNT as usize];
        for (index, total) in (0u32..).zip(totals.iter_mut()) {
            for per_cpu in stats.get(&index, 0)?.iter() {
                total.add(per_cpu);
            }
        }
        Ok(totals)
    }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let program = ebpf
        .program_mut(names::PROGRAM)
        .ok_or(LoadError::MissingProgram)?;
    Ok(program.try_into()?)
}

/// The interface's index, or `None` when there is no such interface.
fn if_index(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the whole call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}
