//! Which kernels the program runs on, and what to say when one refuses it.

use std::path::Path;

use aya::{
    programs::{ProgramError, ProgramInfo},
    util::KernelVersion,
};

use super::LoadError;

/// The oldest kernel filter-agent runs on (Debian 11's, tested in a VM):
/// it needs XDP links (5.9) and BPF ring buffers (5.8).
pub const MIN_KERNEL: (u8, u8) = (5, 10);
/// TCX, and with it pinnable tc links, arrived in Linux 6.6.
const TCX_KERNEL: (u8, u8) = (6, 6);
/// Where a refused program's verifier log is written: the agent's runtime
/// directory.
pub const VERIFIER_LOG_DIR: &str = crate::kernel::events::SOCKET_DIR;

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

/// How much work the verifier did on a program (kernels from 5.16 say),
/// at debug level: the figure that grows towards the verifier's limits.
pub(super) fn log_verified(program: &str, info: Result<ProgramInfo, ProgramError>) {
    if let Ok(info) = info {
        tracing::debug!(
            program,
            verified_insns = info.verified_instruction_count().unwrap_or(0),
            xlated_bytes = info.size_translated().unwrap_or(0),
            "program verified"
        );
    }
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
pub(super) fn refused(program: &'static str, err: ProgramError) -> LoadError {
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
    let written = crate::kernel::pins::private_dir(Path::new(VERIFIER_LOG_DIR)).is_ok()
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
