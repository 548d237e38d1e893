//! The guard's egress program before TCX (Linux 6.6): a tc filter on a
//! clsact qdisc, which cannot be pinned, so a pinned one-entry map
//! ([`pins::EGRESS_TC`]) records which filter is the agent's.

use std::path::Path;

use aya::{
    Pod,
    maps::{Array, MapData},
    programs::{
        ProgramError, TcAttachType,
        links::Link as _,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
};

use super::{Filter, LoadError, egress_mut, if_index, tc_netlink};
use crate::kernel::pins;

/// Where the tc fallback filter sits on the clsact egress hook: fixed, so
/// that a restart finds it and replaces its program in place, and before
/// the filters `tc` adds without a pref (49152 and down), because the
/// program only counts and lets the next filter decide.
const TC_PRIORITY: u16 = 4001;
const TC_HANDLE: TcHandle = TcHandle::new(0, 0xfa17);
/// The record behind [`pins::EGRESS_TC`].
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

impl Filter {
    /// The guard's egress program before TCX: a tc filter at
    /// [`TC_PRIORITY`] on the clsact egress hook, recorded in
    /// [`pins::EGRESS_TC`]. A restart replaces the program of the recorded
    /// filter in place (no gap); otherwise the filter is added, after the
    /// record, so that a failure from here on can be undone.
    pub(super) fn attach_egress_filter(
        &mut self,
        iface: &str,
        dir: &Path,
    ) -> Result<(), LoadError> {
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
    let map = pins::open_map(dir, pins::EGRESS_TC).ok()?;
    Array::<_, TcRecord>::try_from(map).ok()?.get(&0, 0).ok()
}

fn write_tc_record(dir: &Path, record: TcRecord) -> Result<(), LoadError> {
    let fill = |source| LoadError::Fill {
        map: pins::EGRESS_TC.to_owned(),
        source,
    };
    let mut array = Array::<MapData, TcRecord>::create(1, 0).map_err(fill)?;
    array.set(0, record, 0).map_err(fill)?;
    Ok(pins::replace(&dir.join(pins::EGRESS_TC), |staged| {
        array.pin(staged)
    })?)
}

/// Removes the tc egress filter recorded in `dir` (if its interface still
/// exists: a deleted interface took its filters along), and the clsact
/// qdisc when the agent added it and nothing else is left in it.
pub(super) fn remove_egress_filter(dir: &Path) -> Result<(), LoadError> {
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
            && tc_netlink::clsact_is_empty(record.ifindex).map_err(LoadError::Qdisc)?
        {
            tc_netlink::delete_clsact(record.ifindex).map_err(LoadError::Qdisc)?;
        }
    }
    Ok(pins::unpin(dir, pins::EGRESS_TC)?)
}
