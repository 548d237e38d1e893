//! `cargo xtask vm-test`: boots Debian's stock kernels (11, 12 and 13 on
//! x86-64, 12 on arm64) in qemu and runs the packaged static agent inside
//! each, as a user would, on a virtio NIC and on veth in namespaces; then
//! whole Debian 11, 12 and 13 systems with systemd as PID 1 that install
//! the Debian package. One line per check and guest, then
//! `N passed, N failed`.

mod ansible;
mod apt;
mod archive;
mod checks;
mod debian;
mod image;
mod installs;
mod kernels;
mod observe;
mod qemu;
mod systemd;
mod unit;
mod upgrade;

use std::{
    collections::VecDeque,
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Instant,
};

use anyhow::Context as _;
use installs::Installs;

use crate::{
    package,
    util::{dev_build, workspace_root},
};

/// The rules files every guest gets: examples/rules.toml, one opening :9000,
/// and one that fails `check`.
const RULE_FILES: &[(&str, &str, u32)] = &[
    (
        "vm/rules.toml",
        include_str!("../../../examples/rules.toml"),
        0o644,
    ),
    (
        "vm/rules-9000.toml",
        include_str!("guest/rules-9000.toml"),
        0o644,
    ),
    (
        "vm/rules-bad.toml",
        include_str!("guest/rules-bad.toml"),
        0o644,
    ),
];

pub use kernels::SUITES;
pub(crate) use observe::metric;

/// A Debian system with systemd as PID 1 that installs the package.
pub struct SystemdGuest {
    /// The guest's name (`--guest`).
    pub name: &'static str,
    suite: kernels::Suite,
    /// Every check (Debian 12), or the package's lifecycle (the others).
    full: bool,
}

pub const SYSTEMD_GUESTS: [SystemdGuest; 3] = [
    SystemdGuest {
        name: "systemd",
        suite: kernels::BOOKWORM,
        full: true,
    },
    SystemdGuest {
        name: "systemd-bullseye",
        suite: kernels::BULLSEYE,
        full: false,
    },
    SystemdGuest {
        name: "systemd-trixie",
        suite: kernels::TRIXIE,
        full: false,
    },
];

/// Modules the arm64 guest needs beyond [`kernels::MODULES`]: its
/// command channel is a virtio console.
const ARM64_MODULES: &[&str] = &["virtio_console"];
/// What the arm64 guest runs besides the agent, from Debian's packages.
const ARM64_PROGRAMS: &[&str] = &["busybox-static", "iproute2", "bpftool", "nftables"];

/// The Ansible rollout's two Debian 12 hosts.
pub const ANSIBLE: &str = "ansible";

/// Every guest's name, kernels first.
pub fn guest_names() -> Vec<&'static str> {
    SUITES
        .iter()
        .map(|suite| suite.name)
        .chain(SYSTEMD_GUESTS.iter().map(|guest| guest.name))
        .chain([ANSIBLE])
        .collect()
}

/// Runs the checks in every guest of `guests` (kernel suites and
/// [`SYSTEMD_GUESTS`]); returns how many passed and failed.
pub fn run(guests: &[&str]) -> anyhow::Result<(u32, u32)> {
    let started = Instant::now();
    let target = workspace_root().join("target/vm");
    fs::create_dir_all(&target)?;
    // Before this build's packages: the previous release's build shares
    // the target directory.
    let previous = SYSTEMD_GUESTS
        .iter()
        .any(|guest| guest.full && guests.contains(&guest.name))
        .then(upgrade::previous_deb)
        .transpose()?;
    // The refused object is made from the debug build's.
    dev_build()?;
    let refused = refused_object()?;
    let agents = package::binaries()?
        .iter()
        .map(fs::read)
        .collect::<std::io::Result<Vec<_>>>()?;
    let installs = Installs::build(guests, previous)?;
    fetch_kernels(guests, &target)?;
    // The systemd guests that install the package only; the first lane
    // to be free boots the next.
    let spare: Mutex<VecDeque<&SystemdGuest>> = Mutex::new(
        SYSTEMD_GUESTS
            .iter()
            .filter(|guest| !guest.full && guests.contains(&guest.name))
            .collect(),
    );
    let lane = Lane {
        target: &target,
        refused: &refused,
        installs: &installs,
        spare: &spare,
    };
    // Two lanes at once, the busybox guests and the systemd guests: most of
    // a guest's time is spent waiting (for a boot, a timeout, a reboot).
    let (kernel_report, systemd_report) = std::thread::scope(|scope| {
        let kernel_lane = scope.spawn(|| {
            let mut report = kernel_lane(guests, &agents, &lane);
            lane.spare_guests(&mut report);
            report
        });
        let report = systemd_lane(guests, &lane);
        (
            kernel_lane.join().expect("the kernel lane panicked"),
            report,
        )
    });
    let report = Report {
        kernel: String::new(),
        passed: kernel_report.passed + systemd_report.passed,
        failed: kernel_report.failed + systemd_report.failed,
    };
    println!(
        "vm-test: {} guests in {:.0} s: {} passed, {} failed",
        guests.len(),
        started.elapsed().as_secs_f64(),
        report.passed,
        report.failed
    );
    Ok((report.passed, report.failed))
}

/// Every guest's kernel, before the lanes start, so that two lanes never
/// fetch the same.
fn fetch_kernels(guests: &[&str], target: &Path) -> anyhow::Result<()> {
    let systemd_suites = SYSTEMD_GUESTS
        .iter()
        .filter(|guest| guests.contains(&guest.name))
        .map(|guest| guest.suite);
    let kernel_suites = SUITES.iter().filter(|suite| guests.contains(&suite.name));
    for suite in kernel_suites.copied().chain(systemd_suites) {
        kernels::fetch(suite, target)?;
    }
    Ok(())
}

/// What every lane shares.
struct Lane<'a> {
    target: &'a Path,
    refused: &'a [u8],
    installs: &'a Option<Installs>,
    /// The systemd guests no lane has taken yet.
    spare: &'a Mutex<VecDeque<&'static SystemdGuest>>,
}

impl Lane<'_> {
    /// Boots spare systemd guests until none is left.
    fn spare_guests(&self, report: &mut Report) {
        loop {
            let next = self.spare.lock().expect("a lane panicked").pop_front();
            let Some(guest) = next else { return };
            report.kernel = format!("{}, systemd", guest.suite.debian);
            systemd_guest(guest, self, report);
        }
    }
}

/// The busybox guests, one stock kernel each, in turn.
fn kernel_lane(guests: &[&str], agents: &[Vec<u8>], lane: &Lane<'_>) -> Report {
    let mut report = Report::default();
    for suite in SUITES.iter().filter(|suite| guests.contains(&suite.name)) {
        report.kernel = suite.debian.to_owned();
        let built = package::ARCHES
            .iter()
            .position(|arch| arch.debian == suite.arch)
            .map(|index| &agents[index][..]);
        let guest = built
            .with_context(|| format!("no {} build", suite.arch))
            .and_then(|agent| kernel_guest(*suite, agent, lane, &mut report));
        if let Err(err) = guest {
            report.record("build and boot the guest", Err(err));
        }
    }
    report
}

/// Debian 12's full guest, then the Ansible hosts, whose image it makes
/// (so neither is spare), then spare systemd guests.
fn systemd_lane(guests: &[&str], lane: &Lane<'_>) -> Report {
    let mut report = Report::default();
    let full = SYSTEMD_GUESTS
        .iter()
        .filter(|guest| guest.full && guests.contains(&guest.name));
    for guest in full {
        report.kernel = format!("{}, systemd", guest.suite.debian);
        systemd_guest(guest, lane, &mut report);
    }
    if guests.contains(&ANSIBLE) {
        ansible_guests(lane, &mut report);
    }
    lane.spare_guests(&mut report);
    report
}

/// A stock kernel with a busybox initramfs: the agent's checks.
fn kernel_guest(
    suite: kernels::Suite,
    agent: &[u8],
    lane: &Lane<'_>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (target, refused) = (lane.target, lane.refused);
    let kernel = kernels::fetch(suite, target)?;
    report.kernel = format!("{} {}", suite.debian, kernel.release);
    let work = target.join(suite.name);
    fs::create_dir_all(&work)?;
    // This host's programs serve its own architecture's guests.
    let foreign = suite.arch != package::AMD64.debian;
    let unpacked;
    let programs = if !foreign {
        image::Programs::Host
    } else {
        unpacked = foreign_programs(suite, target)?;
        image::Programs::Unpacked(&unpacked)
    };
    let mut bytes = image::userland(agent, refused, &programs)?;
    let mut modules = kernels::MODULES.to_vec();
    if suite.arch == package::ARM64.debian {
        modules.extend_from_slice(ARM64_MODULES);
    }
    bytes.extend(image::modules(&kernel.modules(&modules)?));
    let initrd = work.join("initrd.cpio");
    fs::write(&initrd, bytes)?;
    let machine = qemu::Machine {
        vmlinuz: kernel.vmlinuz.clone(),
        initrd,
        disk: None,
        reboot: false,
        arch: suite.arch,
        append: String::new(),
    };
    let mut vm = qemu::Vm::boot_with_retry(&machine, &work)?;
    let uname = vm.ok("uname -r; uname -m").map(|uname| {
        format!(
            "`uname -rm` {} in {:.1} s (TCG)",
            uname.split_whitespace().collect::<Vec<_>>().join(" "),
            vm.boot_seconds
        )
    });
    report.record("boot", uname);
    checks::run(&mut vm, report);
    Ok(())
}

/// [`ARM64_PROGRAMS`] of `suite`'s architecture and the libraries they
/// need, unpacked (and cached) under `target/vm/programs-SUITE`.
fn foreign_programs(suite: kernels::Suite, target: &Path) -> anyhow::Result<PathBuf> {
    let root = target.join(format!("programs-{}", suite.name));
    let stamp = root.join(".xtask-packages");
    let wanted = format!("{ARM64_PROGRAMS:?}");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(root);
    }
    println!(
        "vm-test: fetching {} programs for {}",
        suite.arch, suite.debian
    );
    let apt = apt::Apt::new(target, suite.codename, suite.arch)?;
    // Libraries only: the programs' other dependencies (debconf, for
    // one) are for installing them, not running them.
    let library = |name: &str| name.starts_with("lib") || name.starts_with("zlib");
    let packages = apt.closure(ARM64_PROGRAMS, library)?;
    let debs = apt.download(&packages)?;
    apt::unpack(&debs, &root)?;
    fs::write(&stamp, wanted)?;
    Ok(root)
}

/// A Debian system from its packages, booted from a disk with systemd as
/// PID 1, installing this build's Debian package (and on Debian 12, the
/// previous release's and a later version of this one).
fn systemd_guest(guest: &SystemdGuest, lane: &Lane<'_>, report: &mut Report) {
    let target = lane.target;
    let work = target.join(guest.suite.debian.to_lowercase().replace(' ', ""));
    let booted = (|| {
        let installs = lane.installs.as_ref().context("no package built")?;
        let current = installs.current.clone();
        let mut debs = vec![current.clone()];
        let mut upgrade = PathBuf::new();
        let scenario = workspace_root().join("target/release/fa-scenario");
        if guest.full {
            upgrade = installs.upgrade.clone().context("no later version built")?;
            debs.push(upgrade.clone());
            debs.extend(installs.previous.clone());
        }
        let kernel = kernels::fetch(guest.suite, target)?;
        let staged = debian::Staged {
            debs: &debs,
            refused: lane.refused,
            scenario: guest.full.then_some(scenario.as_path()),
            authorized_key: None,
        };
        let system = debian::prepare(guest.suite, &kernel, &staged, &work)?;
        let machine = qemu::Machine {
            vmlinuz: kernel.vmlinuz.clone(),
            initrd: system.initrd,
            disk: Some(system.disk),
            reboot: true,
            arch: guest.suite.arch,
            append: String::new(),
        };
        let vm = qemu::Vm::boot_with_retry(&machine, &work)?;
        let name = |deb: &Path| {
            deb.file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let packages = systemd::Packages {
            current: name(&current),
            upgrade: name(&upgrade),
            previous: installs.previous.as_deref().map(name).unwrap_or_default(),
        };
        anyhow::Ok((vm, packages))
    })();
    match booted {
        Ok((mut vm, packages)) if guest.full => systemd::run(&mut vm, &packages, report),
        Ok((mut vm, packages)) => systemd::lifecycle(&mut vm, &packages, report),
        Err(err) => {
            report.record("build, install and boot the image", Err(err));
        }
    }
    // The disk is this run's copy of the cached image.
    let _ = fs::remove_file(work.join("disk.img"));
}

/// Two Debian 12 hosts with sshd, booted at once, and the Ansible role
/// rolled out to them from this host.
fn ansible_guests(lane: &Lane<'_>, report: &mut Report) {
    report.kernel = "Debian 12 x2, Ansible".into();
    let target = lane.target;
    let booted = (|| {
        let controller = ansible::Controller::new(target)?;
        let installs = lane.installs.as_ref().context("no package built")?;
        let deb = installs.current.clone();
        let kernel = kernels::fetch(kernels::BOOKWORM, target)?;
        let staged = debian::Staged {
            debs: &[],
            refused: lane.refused,
            scenario: None,
            authorized_key: Some(&controller.public_key),
        };
        let system = debian::prepare(
            kernels::BOOKWORM,
            &kernel,
            &staged,
            &target.join("debian12"),
        )?;
        let mut hosts = Vec::new();
        for index in 1..=2 {
            let work = target.join(format!("debian12-ansible-{index}"));
            fs::create_dir_all(&work)?;
            let disk = work.join("disk.img");
            crate::util::run(
                std::process::Command::new("cp")
                    .arg("--sparse=always")
                    .arg(&system.disk)
                    .arg(&disk),
            )?;
            let machine = qemu::Machine {
                vmlinuz: kernel.vmlinuz.clone(),
                initrd: system.initrd.clone(),
                disk: Some(disk),
                reboot: true,
                arch: kernels::BOOKWORM.arch,
                append: String::new(),
            };
            hosts.push(qemu::Vm::boot_with_retry(&machine, &work)?);
        }
        for host in &mut hosts {
            host.run("systemctl is-system-running --wait")?;
        }
        let hosts: [qemu::Vm; 2] = hosts
            .try_into()
            .map_err(|_| anyhow::anyhow!("not two hosts"))?;
        anyhow::Ok((controller, hosts, deb))
    })();
    match booted {
        Ok((controller, mut hosts, deb)) => ansible::run(&controller, &mut hosts, &deb, report),
        Err(err) => {
            report.record("ansible: two Debian 12 hosts with sshd", Err(err));
        }
    }
    for index in 1..=2 {
        let _ = fs::remove_file(target.join(format!("debian12-ansible-{index}/disk.img")));
    }
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
    let built = package::embedded_object(&workspace_root().join("target/debug/build"))?;
    testbed::refused_object(&fs::read(&built)?).context("making the refused object")
}
