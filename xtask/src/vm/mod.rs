//! `cargo xtask vm-test`: boots Debian's stock kernels (11, 12 and 13) in
//! qemu and runs the agent inside each, as a user would, on a virtio NIC
//! and on veth in namespaces; then a whole Debian 12 with systemd as PID 1
//! that installs the Debian package. One line per check and guest, then
//! `N passed, N failed`.

mod checks;
mod debian;
mod image;
mod kernels;
mod qemu;
mod systemd;

use std::{fs, path::Path, time::Instant};

use anyhow::Context as _;

use crate::{
    package,
    util::{cargo, workspace_root},
};

pub use kernels::SUITES;

/// The guest with systemd as PID 1 (next to the kernels' [`SUITES`]).
pub const SYSTEMD: &str = "systemd";

/// Runs the checks in every guest of `guests` (kernel suites and
/// [`SYSTEMD`]); returns how many passed and failed.
pub fn run(guests: &[&str]) -> anyhow::Result<(u32, u32)> {
    let started = Instant::now();
    let target = workspace_root().join("target/vm");
    fs::create_dir_all(&target)?;
    cargo(&["build", "--quiet", "--package", "filter-agent"])?;
    let agent = workspace_root().join("target/debug/filter-agent");
    let refused = refused_object()?;
    let userland = image::userland(&agent, &refused, &target)?;
    let mut report = Report::default();
    for suite in SUITES.iter().filter(|suite| guests.contains(&suite.name)) {
        let kernel = kernels::fetch(*suite, &target)?;
        report.kernel = format!("{} {}", suite.debian, kernel.release);
        let work = target.join(suite.name);
        fs::create_dir_all(&work)?;
        let initrd = work.join("initrd.cpio");
        let mut bytes = userland.clone();
        bytes.extend(image::modules(&kernel.modules(kernels::MODULES)?));
        fs::write(&initrd, bytes)?;
        let machine = qemu::Machine {
            vmlinuz: &kernel.vmlinuz,
            initrd: &initrd,
            disk: None,
            reboot: false,
        };
        let booted = qemu::Vm::boot_with_retry(&machine, &work);
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
    if guests.contains(&SYSTEMD) {
        report.kernel = "Debian 12, systemd".into();
        systemd_guest(&target, &refused, &mut report);
    }
    println!(
        "vm-test: {} guests in {:.0} s: {} passed, {} failed",
        guests.len(),
        started.elapsed().as_secs_f64(),
        report.passed,
        report.failed
    );
    Ok((report.passed, report.failed))
}

/// Debian 12 from its packages, booted from a disk with systemd as PID 1,
/// installing this build's Debian package (and a later version of it).
fn systemd_guest(target: &Path, refused: &[u8], report: &mut Report) {
    let work = target.join("debian12");
    let booted = (|| {
        let current = package::run()?;
        let upgrade = package::build(&format!("{}+upgrade", package::VERSION))?;
        let kernel = kernels::fetch(kernels::BOOKWORM, target)?;
        cargo(&[
            "build",
            "--release",
            "-p",
            "scenarios",
            "--bin",
            "fa-scenario",
        ])?;
        let staged = debian::Staged {
            debs: &[current.clone(), upgrade.clone()],
            refused,
            scenario: &workspace_root().join("target/release/fa-scenario"),
        };
        let system = debian::prepare(&kernel, &staged, &work)?;
        let machine = qemu::Machine {
            vmlinuz: &kernel.vmlinuz,
            initrd: &system.initrd,
            disk: Some(&system.disk),
            reboot: true,
        };
        let vm = qemu::Vm::boot_with_retry(&machine, &work)?;
        let name = |deb: &Path| {
            deb.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        };
        let packages = systemd::Packages {
            current: name(&current).unwrap_or_default(),
            upgrade: name(&upgrade).unwrap_or_default(),
        };
        anyhow::Ok((vm, packages))
    })();
    match booted {
        Ok((mut vm, packages)) => systemd::run(&mut vm, &packages, report),
        Err(err) => {
            report.record("build, install and boot the image", Err(err));
        }
    }
    // The disk is this run's copy of the cached image.
    let _ = fs::remove_file(work.join("disk.img"));
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
