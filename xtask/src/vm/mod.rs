//! `cargo xtask vm-test`: boots Debian's stock kernels (11, 12 and 13) in
//! qemu and runs the agent inside each, as a user would, on a virtio NIC
//! and on veth in namespaces. One line per check and kernel, then
//! `N passed, N failed`.

mod checks;
mod image;
mod kernels;
mod qemu;

use std::{fs, path::Path, time::Instant};

use anyhow::Context as _;

use crate::util::{cargo, workspace_root};

pub use kernels::SUITES;

/// Runs the checks on every kernel of `suites`; returns how many passed
/// and failed.
pub fn run(suites: &[&str]) -> anyhow::Result<(u32, u32)> {
    let started = Instant::now();
    let target = workspace_root().join("target/vm");
    fs::create_dir_all(&target)?;
    cargo(&["build", "--quiet", "--package", "filter-agent"])?;
    let agent = workspace_root().join("target/debug/filter-agent");
    let refused = refused_object()?;
    let userland = image::userland(&agent, &refused, &target)?;
    let mut report = Report::default();
    for suite in SUITES.iter().filter(|suite| suites.contains(&suite.name)) {
        let kernel = kernels::fetch(*suite, &target)?;
        report.kernel = format!("{} {}", suite.debian, kernel.release);
        let work = target.join(suite.name);
        fs::create_dir_all(&work)?;
        let initrd = work.join("initrd.cpio");
        let mut bytes = userland.clone();
        bytes.extend(image::modules(&kernel));
        fs::write(&initrd, bytes)?;
        // An emulated boot now and then dies in the guest's clock code:
        // one retry before calling it a failure.
        let booted = qemu::Vm::boot(&kernel.vmlinuz, &initrd, &work)
            .or_else(|_| qemu::Vm::boot(&kernel.vmlinuz, &initrd, &work));
        let mut vm = match booted {
            Ok(vm) => vm,
            Err(err) => {
                report.record("boot", Err(err));
                continue;
            }
        };
        let uname = vm.ok("uname -r").map(|release| {
            format!(
                "`uname -r` {} in {:.1} s (TCG)",
                release.trim(),
                vm.boot_seconds
            )
        });
        report.record("boot", uname);
        checks::run(&mut vm, &mut report);
    }
    println!(
        "vm-test: {} kernels in {:.0} s: {} passed, {} failed",
        suites.len(),
        started.elapsed().as_secs_f64(),
        report.passed,
        report.failed
    );
    Ok((report.passed, report.failed))
}

/// One line per check, printed as it completes.
#[derive(Default)]
pub struct Report {
    kernel: String,
    passed: u32,
    failed: u32,
}

impl Report {
    /// Prints the check's line; true when it passed.
    pub fn record(&mut self, check: &str, result: anyhow::Result<String>) -> bool {
        match result {
            Ok(detail) => {
                self.passed += 1;
                println!("ok    {:<28} {check}: {detail}", self.kernel);
                true
            }
            Err(err) => {
                self.failed += 1;
                println!("FAIL  {:<28} {check}: {err:#}", self.kernel);
                false
            }
        }
    }
}

/// The agent's eBPF object, made one that every verifier refuses.
fn refused_object() -> anyhow::Result<Vec<u8>> {
    let built = newest_object(&workspace_root().join("target/debug/build"))?;
    Ok(testbed::refused_object(&fs::read(&built)?)?)
}

/// `filter-agent-*/out/filter`, the object build.rs embedded last.
fn newest_object(build: &Path) -> anyhow::Result<std::path::PathBuf> {
    fs::read_dir(build)?
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("filter-agent-")
        })
        .map(|entry| entry.path().join("out/filter"))
        .filter(|path| path.exists())
        .max_by_key(|path| fs::metadata(path).and_then(|meta| meta.modified()).ok())
        .with_context(|| format!("no filter-agent-*/out/filter under {}", build.display()))
}
