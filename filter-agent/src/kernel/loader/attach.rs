//! Attaching an instance: through the links pinned for the interface, so
//! that a new instance replaces the running one without a gap and the
//! filter outlives the agent; and detaching it again.

use std::path::Path;

use aya::programs::{
    ProgramError, TcAttachType, Xdp, XdpMode,
    links::{FdLink, LinkError, PinnedLink},
    tc::SchedClassifierLink,
    xdp::XdpLink,
};
use aya::sys::SyscallError;
use filter_common::names;

use super::{Filter, LoadError, egress_mut, has_tcx, missing_map, program_mut};
use crate::{
    kernel::counters::{self, RuleCounts},
    kernel::{layout, pins},
    rules::compile::RuleInfo,
};

/// What [`Filter::install`] did.
#[derive(Clone, Debug)]
pub struct Installed {
    pub attached: Attached,
    /// Per rule: what it counted under earlier rule sets.
    pub bases: Vec<RuleCounts>,
    /// The rules' generation on the interface.
    pub generation: u64,
}

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode, else skb mode with a warning.
    Auto,
    /// Native mode or nothing.
    Native,
    /// skb (generic) mode.
    Skb,
}

/// How [`Filter::attach_pinned`] attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new attachment, in this XDP mode.
    Fresh(&'static str),
    /// The pinned links now run this program.
    Adopted,
}

impl Filter {
    /// Attaches to `iface`; returns the mode actually used.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<&'static str, LoadError> {
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
        mode: AttachMode,
        dir: &Path,
    ) -> Result<Attached, LoadError> {
        let xdp_pin = dir.join(pins::XDP_LINK);
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
        let egress_pin = dir.join(pins::EGRESS_LINK);
        if !self.guard_on {
            // The guard was switched off: its egress half goes.
            pins::unpin(dir, pins::EGRESS_LINK)?;
            super::egress_tc::remove_egress_filter(dir)?;
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

    /// Attaches through the pins in `dir` like [`Filter::attach_pinned`],
    /// then publishes `rules` as the rules running there (their per-rule
    /// counters and the rule table) and records their generation.
    pub fn install(
        &mut self,
        iface: &str,
        mode: AttachMode,
        dir: &Path,
        rules: &[RuleInfo],
    ) -> Result<Installed, LoadError> {
        let attached = self.attach_pinned(iface, mode, dir)?;
        if attached == Attached::Adopted {
            // Packets still inside the old program would be counted after
            // its counters were carried over: wait for them to leave.
            wait_for_running_programs();
        }
        let previous = counters::carried_over(dir);
        self.pin_rule_stats(dir)?;
        let bases = counters::publish_rule_table(rules, &previous, dir)?;
        Ok(Installed {
            attached,
            bases,
            generation: layout::stamp(dir)?,
        })
    }

    /// Pins this instance's per-rule counters in `dir`, replacing what is
    /// there, one rename per map.
    fn pin_rule_stats(&self, dir: &Path) -> Result<(), LoadError> {
        for name in [names::RULE_STATS, names::RULE_OVER_LIMIT] {
            let map = self.ebpf.map(name).ok_or_else(|| missing_map(name))?;
            pins::replace(&dir.join(name), |staged| map.pin(staged))?;
        }
        Ok(())
    }

    fn attach_xdp(&mut self, iface: &str, mode: AttachMode) -> Result<&'static str, LoadError> {
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
            AttachMode::Native => try_mode(program, XdpMode::Driver, "native"),
            AttachMode::Skb => try_mode(program, XdpMode::Skb, "skb"),
            AttachMode::Auto => try_mode(program, XdpMode::Driver, "native").or_else(|err| {
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
            std::fs::remove_file(path).map_err(|source| pins::PinError::Io {
                path: path.to_owned(),
                source,
            })?;
            Ok(false)
        }
        Err(err) => Err(err),
    }
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), LoadError> {
    link.pin(path).map(drop).map_err(|source| {
        pins::PinError::Pin {
            path: path.to_owned(),
            source,
        }
        .into()
    })
}

/// Removes the filter pinned in `dir`: the guard's tc egress filter (before
/// TCX) and every pin, which detaches the links once no process holds
/// them.
pub fn detach(dir: &Path) {
    if let Err(err) = super::egress_tc::remove_egress_filter(dir) {
        tracing::warn!(%err, dir = %dir.display(), "cannot remove the guard's tc egress filter");
    }
    pins::remove(dir);
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

/// Waits until every program run that started before now has finished: an
/// RCU grace period (`membarrier(MEMBARRIER_CMD_GLOBAL)` waits for one, and
/// XDP and tc programs run inside RCU read-side sections). Without it
/// (kernels booted with `nohz_full`) a few packets of the old program may
/// go uncounted.
pub fn wait_for_running_programs() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    if unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0) } != 0 {
        tracing::debug!(err = %std::io::Error::last_os_error(), "membarrier: no grace period to wait for");
    }
}
