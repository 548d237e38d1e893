//! `cargo xtask setup`: idempotent bootstrap of everything the build and the
//! tests need. Each step checks first and does nothing when already done.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util::{output, run as run_command};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests, demo and benchmarks use.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "xdp-tools",
    "iptables",
    "nftables",
    // ipset (with iptables) is a competitor in `cargo xtask bench --live`.
    "ipset",
    "hping3",
    "tcpdump",
    // systemd-analyze, for verifying the unit file.
    "systemd",
    // promtool, which checks the /metrics page in the faults test.
    "prometheus",
    // `cargo xtask vm-test`: the emulators and the guest's userland.
    "qemu-system-x86",
    "qemu-system-arm",
    "busybox-static",
    // ... and the Debian 12 system of its systemd guest (mke2fs is in
    // e2fsprogs, part of every Debian).
    "mmdebstrap",
    // The DaemonSet's schema check runs in a venv (setup installs it).
    "python3-venv",
    // Docker's own NAT for the docker-nacl incident: testbed runs an engine
    // of its own in a namespace (no service of the host is started).
    "docker.io",
    // The IP-to-country files behind `@country:XX` sets (tests and bench).
    "geoip-database",
    // vm-test's Ansible rollout over SSH to two guests.
    "ansible-core",
    "openssh-client",
];
/// What `cargo xtask package` needs, and nothing of the test stack: the
/// linkers of the static builds (the host's gcc for x86-64, a cross gcc
/// for arm64), strip and readelf for both, the package's checker.
const PACKAGING_PACKAGES: &[&str] = &[
    "gcc",
    "binutils",
    "gcc-aarch64-linux-gnu",
    "binutils-aarch64-linux-gnu",
    "lintian",
];
/// Rust's targets of the static builds (their musl comes with them).
const RUST_TARGETS: &[&str] = &["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_FS: &str = "/sys/fs/bpf";
/// The locks apt and dpkg take: held by unattended-upgrades for minutes
/// on a freshly booted host.
const PACKAGE_LOCKS: [&str; 3] = [
    "/var/lib/dpkg/lock-frontend",
    "/var/lib/dpkg/lock",
    "/var/lib/apt/lists/lock",
];
/// How long setup waits for another package manager to finish.
const PACKAGE_LOCK_WAIT: Duration = Duration::from_secs(600);

/// Everything: packaging, then what the tests, the demo and the
/// benchmarks need.
pub fn run() -> anyhow::Result<()> {
    packaging()?;
    ensure_bpffs()?;
    ensure_packages(DEBIAN_PACKAGES)?;
    ensure_kubernetes_validate()?;
    Ok(())
}

/// What building the binaries and packages needs, and no more.
pub fn packaging() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    ensure_bpf_linker(&sysroot)?;
    ensure_rust_targets()?;
    ensure_packages(PACKAGING_PACKAGES)
}

fn ensure_rust_targets() -> anyhow::Result<()> {
    let root = crate::util::workspace_root();
    let installed = output(
        Command::new("rustup")
            .args(["target", "list", "--installed"])
            .current_dir(&root),
    )
    .unwrap_or_default();
    let missing: Vec<&str> = RUST_TARGETS
        .iter()
        .copied()
        .filter(|target| !installed.lines().any(|line| line.trim() == *target))
        .collect();
    if missing.is_empty() {
        println!("setup: Rust targets ok ({})", RUST_TARGETS.join(", "));
        return Ok(());
    }
    println!("setup: adding the Rust targets {}", missing.join(", "));
    run_command(
        Command::new("rustup")
            .args(["target", "add"])
            .args(&missing)
            .current_dir(&root),
    )
    .context("rustup target add")
}

/// The DaemonSet's schema check (Kubernetes' own JSON schemas, bundled):
/// no Debian package has them, PyPI does.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Where [`KUBERNETES_VALIDATE`] is installed: its own venv under target/.
pub fn kubernetes_validate() -> PathBuf {
    crate::util::workspace_root().join("target/tools/kubernetes-validate-1.37.0")
}

fn ensure_kubernetes_validate() -> anyhow::Result<()> {
    let venv = kubernetes_validate();
    if venv.join("bin/kubernetes-validate").exists() {
        println!("setup: {KUBERNETES_VALIDATE} ok");
        return Ok(());
    }
    println!(
        "setup: installing {KUBERNETES_VALIDATE} (PyPI) in {}",
        venv.display()
    );
    let _ = fs::remove_dir_all(&venv);
    // Debian's python3 (python3-venv), whatever else is first on PATH.
    run_command(
        Command::new("/usr/bin/python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv),
    )?;
    run_command(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(KUBERNETES_VALIDATE),
    )
    .context("installing kubernetes-validate from PyPI")
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let print_sysroot =
        || output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]));
    let sysroot = match print_sysroot() {
        Some(sysroot) => sysroot,
        None => {
            println!("setup: installing the nightly toolchain");
            run_command(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))
            .context("the eBPF program needs a nightly toolchain")?;
            print_sysroot().context("nightly rustc does not run after installing it")?
        }
    };
    Ok(PathBuf::from(sysroot.trim()))
}

fn ensure_rust_src(sysroot: &Path) -> anyhow::Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        println!("setup: rust-src (nightly) ok");
        return Ok(());
    }
    println!("setup: installing rust-src for nightly");
    run_command(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// bpf-linker must use the same LLVM as the nightly rustc that emits the
/// bitcode, so it is built against that toolchain's own libLLVM.
fn ensure_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let libdir = sysroot.join("lib");
    let llvm_lib = fs::read_dir(&libdir)
        .with_context(|| format!("cannot list {}", libdir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    // "libLLVM.so.22.1-rust-1.97.0-nightly" -> "22"
    let major = llvm_lib["libLLVM.so.".len()..]
        .split('.')
        .next()
        .filter(|major| major.parse::<u32>().is_ok())
        .with_context(|| format!("cannot read the LLVM version from {llvm_lib}"))?;

    if bpf_linker_uses(&llvm_lib) {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} (LLVM {major}) ok");
        return Ok(());
    }

    // A durable prefix whose lib/ holds the names the build looks for; the
    // linker's rpath points here, so it must outlive this run.
    let prefix = cargo_home()
        .join("filter-agent")
        .join(format!("llvm-{llvm_lib}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", llvm_lib.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(libdir.join(&llvm_lib), &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} (about a minute)"
    );
    run_command(
        Command::new(crate::util::cargo_program())
            .args(["install", "--force", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .env("LLVM_PREFIX", &prefix)
            .current_dir(env::temp_dir()),
    )
    .context("building bpf-linker")?;
    if !bpf_linker_uses(&llvm_lib) {
        bail!("bpf-linker was built but does not run with {llvm_lib}; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

/// True when `bpf-linker` on PATH is our version, runs, and loads `llvm_lib`.
fn bpf_linker_uses(llvm_lib: &str) -> bool {
    let version_ok = output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|version| version.contains(BPF_LINKER_VERSION));
    let Some(path) = output(Command::new("sh").args(["-c", "command -v bpf-linker"])) else {
        return false;
    };
    let linked = output(Command::new("ldd").arg(path.trim())).is_some_and(|ldd| {
        ldd.lines()
            .any(|line| line.contains(llvm_lib) && !line.contains("not found"))
    });
    version_ok && linked
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

fn ensure_bpffs() -> anyhow::Result<()> {
    if is_bpffs(BPF_FS) {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(BPF_FS).map_or(0, |meta| meta.permissions().mode() & 0o7777);
        if mode & 0o022 != 0 {
            // Not ours to change; the agent's own tree is root's either way.
            println!(
                "setup: bpffs at {BPF_FS} ok, but any user may write to it (mode {mode:04o}); \
                 systemd mounts it 0700 (`mount -o remount,mode=0700 {BPF_FS}`)"
            );
        } else {
            println!("setup: bpffs at {BPF_FS} ok");
        }
        return Ok(());
    }
    println!("setup: mounting bpffs at {BPF_FS} (mode 0700, as systemd does)");
    run_command(Command::new("mount").args(["-t", "bpf", "-o", "mode=0700", "bpf", BPF_FS]))
        .context("pinning needs bpffs; mounting it needs root")
}

fn is_bpffs(path: &str) -> bool {
    let Ok(path) = std::ffi::CString::new(path) else {
        return false;
    };
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid C string and a buffer of the right type.
    let ok = unsafe { libc::statfs(path.as_ptr(), stat.as_mut_ptr()) } == 0;
    // SAFETY: statfs filled the buffer when it returned 0.
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's type differs between architectures"
    )]
    let is_bpf = ok && unsafe { stat.assume_init() }.f_type as i64 == BPF_FS_MAGIC;
    is_bpf
}

fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .is_none_or(|status| !status.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("setup: Debian packages ok ({})", packages.join(", "));
        return Ok(());
    }
    println!("setup: installing {}", missing.join(", "));
    wait_for_locks(&PACKAGE_LOCKS, PACKAGE_LOCK_WAIT)?;
    let lock_timeout = format!("DPkg::Lock::Timeout={}", PACKAGE_LOCK_WAIT.as_secs());
    run_command(Command::new("apt-get").args(["-o", &lock_timeout, "update", "-q"]))
        .context("apt-get update (needs root)")?;
    run_command(
        Command::new("apt-get")
            .args([
                "-o",
                &lock_timeout,
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
            ])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing Debian packages")
}

/// Waits until no other process holds one of the `fcntl` locks at `paths`
/// (as apt and dpkg take them), at most `limit` in all: a thread blocks in
/// `F_SETLKW` until the lock is free (and lets go of it at once), and the
/// caller waits for that thread with the deadline.
fn wait_for_locks(paths: &[&str], limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    for path in paths {
        let Some(pid) = lock_holder(path) else {
            continue;
        };
        let name = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        println!(
            "setup: waiting for {path}, held by pid {pid} {} (at most {} s)",
            name.trim(),
            limit.as_secs()
        );
        let file = lock_file(path).with_context(|| format!("cannot open {path}"))?;
        let (sender, freed) = std::sync::mpsc::channel();
        // Left blocked if the deadline passes; setup fails then anyway.
        std::thread::spawn(move || sender.send(lock_blocking(&file)));
        match freed.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(())) => {}
            Ok(Err(err)) => bail!("cannot wait for {path}: {err}"),
            Err(_) => bail!(
                "{path} is still held by pid {pid} after {} s; try again once it is done",
                limit.as_secs()
            ),
        }
    }
    Ok(())
}

fn lock_file(path: &str) -> std::io::Result<fs::File> {
    fs::OpenOptions::new().read(true).write(true).open(path)
}

/// A write lock on the whole file, waited for; released when `file` closes.
fn lock_blocking(file: &fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut lock = whole_file_write_lock();
    // SAFETY: F_SETLKW on a descriptor we own, with a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLKW, &mut lock) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn whole_file_write_lock() -> libc::flock {
    // SAFETY: a zeroed flock is a valid value of the type.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

/// The pid of a process holding a write lock on `path`, if any.
fn lock_holder(path: &str) -> Option<libc::pid_t> {
    use std::os::fd::AsRawFd as _;
    let file = lock_file(path).ok()?;
    let mut lock = whole_file_write_lock();
    // SAFETY: F_GETLK on a descriptor we own, into a valid flock.
    let asked = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) };
    (asked == 0 && lock.l_type != libc::F_UNLCK as libc::c_short).then_some(lock.l_pid)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn a_held_package_lock_is_waited_for_and_named() {
        let file = std::env::temp_dir().join(format!("xtask-lock-{}", std::process::id()));
        fs::write(&file, "").unwrap();
        let path = file.to_str().unwrap();
        // Another process holds the lock as apt does (fcntl), until its
        // standard input closes.
        let hold = || {
            let mut holder = Command::new("python3")
                .args(["-c", "import fcntl, sys; f = open(sys.argv[1], 'w'); fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()"])
                .arg(path)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(holder.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line, "locked\n");
            holder
        };
        let release = |mut holder: std::process::Child| {
            drop(holder.stdin.take());
            holder.wait().unwrap();
        };

        // Still held at the deadline: the error names the holder.
        let holder = hold();
        let err = wait_for_locks(&[path], Duration::from_millis(300)).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("held by pid {} after 0 s", holder.id())),
            "{err}"
        );
        release(holder);

        // Released while waited for: the wait ends then, not at the deadline.
        let holder = hold();
        let limit = Duration::from_secs(30);
        let started = Instant::now();
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| wait_for_locks(&[path], limit));
            release(holder);
            waiter.join().unwrap().unwrap();
        });
        assert!(started.elapsed() < limit / 2, "{:?}", started.elapsed());
        let _ = fs::remove_file(&file);
    }
}
