//! Upgrades across releases in the systemd guest: the previous release's
//! package, built from its own commit with its own `cargo xtask package`,
//! installed over this one (a downgrade), then this one's next version
//! installed over it, each under traffic: no denied connection answered,
//! no allowed echo lost, counters carried.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

use super::{
    observe::{json_document, rule_packets},
    qemu::Vm,
    systemd::{apt, show_one},
    unit::without_gap,
};
use crate::util::{cargo_program, run, workspace_root};

/// The last commit of release 0.1.0, and the last before a layout change:
/// its pins have no layout record (layout 1), the next commit added it.
/// Upgrading from it crosses that change; the maps both pin have the same
/// shapes, which the host test (tests/upgrade.rs) varies instead.
const PREVIOUS_COMMIT: &str = "25d5991c50056b9f06bb9920b0fa65e52a94a338";
const PREVIOUS_VERSION: &str = "0.1.0";

/// Where each architecture's build puts its outputs, in this workspace's
/// target directory.
const BUILDS: [&str; 4] = [
    "debug",
    "release",
    "x86_64-unknown-linux-musl/release",
    "aarch64-unknown-linux-musl/release",
];

/// The previous release's amd64 package, built once per commit into
/// `target/previous/` and kept in the machine's cache too (a commit's
/// package never changes), so a fresh clone on the same machine reuses it.
/// The build shares this workspace's target directory (so only the
/// workspace's own crates compile again); what it leaves there that this
/// build would take for its own goes afterwards.
pub fn previous_deb() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let target = root.join("target");
    let out = target.join("previous");
    let name = format!(
        "filter-agent_{PREVIOUS_VERSION}_{}_amd64.deb",
        &PREVIOUS_COMMIT[..12]
    );
    let deb = out.join(&name);
    if deb.exists() {
        return Ok(deb);
    }
    let cached = machine_cache().map(|dir| dir.join(&name));
    if let Some(cached) = cached.as_ref().filter(|cached| cached.exists()) {
        fs::create_dir_all(&out)?;
        fs::copy(cached, &deb)?;
        return Ok(deb);
    }
    let partial = deb.with_extension("partial");
    build_previous(&root, &out, &partial)?;
    // Only a build that cleaned up after itself is reused.
    fs::rename(partial, &deb)?;
    if let Some(cached) = cached {
        // Best effort: without it, the next clone builds it again.
        let copied = cached.parent().map(fs::create_dir_all).transpose();
        if let Err(err) = copied.and_then(|_| fs::copy(&deb, &cached)) {
            println!("vm-test: not cached in {}: {err}", cached.display());
        }
    }
    Ok(deb)
}

/// Builds the previous release's package into `partial`, from a `git
/// archive` of its commit under `out`, in this workspace's target directory.
fn build_previous(root: &Path, out: &Path, partial: &Path) -> anyhow::Result<()> {
    let target = root.join("target");
    println!("vm-test: building release {PREVIOUS_VERSION} ({PREVIOUS_COMMIT}) to upgrade from");
    let src = out.join("src");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src)?;
    let archive = Command::new("git")
        .args(["archive", "--format=tar", PREVIOUS_COMMIT])
        .current_dir(root)
        .output()
        .context("running git archive")?;
    ensure!(
        archive.status.success(),
        "git archive {PREVIOUS_COMMIT} (a clone with its history is needed): {}",
        String::from_utf8_lossy(&archive.stderr).trim()
    );
    let tar = src.join("source.tar");
    fs::write(&tar, &archive.stdout)?;
    run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&src))?;
    std::os::unix::fs::symlink(&target, src.join("target"))?;
    // Its packaging embeds the newest eBPF object it finds among the build
    // scripts' outputs: only its own are there while it builds.
    let hidden = hide_build_scripts(&target, &out.join("hidden"))?;
    let built = run(Command::new(cargo_program())
        .args(["xtask", "package"])
        .current_dir(&src))
    .context("building the previous release's package")
    .and_then(|()| {
        let built = target.join(format!("debian/filter-agent_{PREVIOUS_VERSION}_amd64.deb"));
        fs::copy(built, partial).map_err(anyhow::Error::from)
    });
    let forgotten = forget_previous_build(&target);
    for (at, kept) in hidden {
        fs::rename(kept, at)?;
    }
    fs::remove_dir_all(out.join("hidden"))?;
    built.and(forgotten)?;
    fs::remove_dir_all(&src)?;
    Ok(())
}

/// `$XDG_CACHE_HOME/filter-agent/previous` (`~/.cache` by default).
fn machine_cache() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("filter-agent").join("previous"))
}

/// The build-script directories of filter-agent, one per build.
fn build_scripts(target: &Path) -> Vec<PathBuf> {
    BUILDS
        .iter()
        .filter_map(|build| fs::read_dir(target.join(build).join("build")).ok())
        .flat_map(|entries| entries.flatten().map(|entry| entry.path()))
        .filter(|path| path.to_string_lossy().contains("/filter-agent-"))
        .collect()
}

/// Moves this build's build-script directories under `store`; returns
/// where each was and is.
fn hide_build_scripts(target: &Path, store: &Path) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let _ = fs::remove_dir_all(store);
    fs::create_dir_all(store)?;
    let mut hidden = Vec::new();
    for (index, script) in build_scripts(target).into_iter().enumerate() {
        let kept = store.join(index.to_string());
        fs::rename(&script, &kept)?;
        hidden.push((script, kept));
    }
    Ok(hidden)
}

/// Removes what the previous release's build left where this one's looks:
/// its packages and tarballs, the binaries cargo copied out of `deps`
/// (cargo copies this build's again when they are missing, not when they
/// are there), and its build scripts' output.
fn forget_previous_build(target: &Path) -> anyhow::Result<()> {
    for dir in ["debian", "dist"] {
        for entry in fs::read_dir(target.join(dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(&format!("-{PREVIOUS_VERSION}-"))
                || name.contains(&format!("_{PREVIOUS_VERSION}_"))
            {
                let path = entry.path();
                if path.is_dir() {
                    fs::remove_dir_all(path)?;
                } else {
                    fs::remove_file(path)?;
                }
            }
        }
    }
    for build in BUILDS {
        for copied in ["xtask", "filter-agent", "examples/package_docs"] {
            let _ = fs::remove_file(target.join(build).join(copied));
        }
    }
    for script in build_scripts(target) {
        fs::remove_dir_all(&script)?;
    }
    Ok(())
}

/// Echoes from the peer namespace to fa0 (allowed by the rules' `ping`
/// rule), one every 50 ms, for as long as a step runs.
struct Echoes;

impl Echoes {
    const OUT: &str = "/run/echoes.out";
    const PID: &str = "/run/echoes.pid";

    fn start(vm: &mut Vm) -> anyhow::Result<Self> {
        let (out, pid) = (Self::OUT, Self::PID);
        vm.ok(&format!(
            "ip netns exec peer busybox ping -i 0.05 10.9.0.1 < /dev/null > {out} 2>&1 & echo $! > {pid}; \
             timeout 10 sh -c 'until grep -q seq= {out}; do :; done'"
        ))?;
        Ok(Self)
    }

    /// Stops the echoes; returns how many were answered, once every one
    /// but the last (in flight when ping was stopped) was.
    fn stop(self, vm: &mut Vm) -> anyhow::Result<u64> {
        let (out, pid) = (Self::OUT, Self::PID);
        vm.ok(&format!(
            "kill -INT $(cat {pid}) && timeout 5 sh -c 'while kill -0 $(cat {pid}) 2>/dev/null; do :; done'"
        ))?;
        answered_in_order(&vm.ok(&format!("cat {out}"))?)
    }
}

/// From busybox ping's output: the answers, when every echo before the
/// last was answered.
fn answered_in_order(out: &str) -> anyhow::Result<u64> {
    let sent: u64 = out
        .lines()
        .find_map(|line| {
            line.split(" packets transmitted")
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no statistics from ping:\n{out}"))?;
    let mut answered: Vec<u64> = out
        .lines()
        .filter_map(|line| {
            line.split("seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    answered.sort_unstable();
    answered.dedup();
    let lost: Vec<u64> = (0..sent.saturating_sub(1))
        .filter(|seq| answered.binary_search(seq).is_err())
        .collect();
    ensure!(
        lost.is_empty(),
        "{} of {sent} allowed echoes lost (seq {lost:?})",
        lost.len()
    );
    Ok(answered.len() as u64)
}

/// `filter-agent stats --json`: packets of `rule` on fa0, and the rules'
/// generation there.
fn counted(vm: &mut Vm, rule: &str) -> anyhow::Result<(u64, u64)> {
    let text = vm.ok("filter-agent stats --json --iface fa0")?;
    let document = json_document(&text)?;
    let packets =
        rule_packets(&document, rule).with_context(|| format!("no rule {rule} in {text}"))?;
    Ok((packets, document["generation"].as_u64().unwrap_or(0)))
}

/// Installs `package` under traffic; returns the installed version, the
/// denied connections tried and the allowed echoes answered.
fn install_under_traffic(vm: &mut Vm, package: &str) -> anyhow::Result<(String, u32, u64)> {
    let echoes = Echoes::start(vm)?;
    let (attempts, ()) = without_gap(vm, |vm| {
        apt(
            vm,
            &format!("install --allow-downgrades /root/debs/{package}"),
        )
        .map(drop)
    })?;
    let answered = echoes.stop(vm)?;
    let version = vm.ok("dpkg-query -W -f '${Version}' filter-agent")?;
    ensure!(
        package.contains(version.trim()),
        "installed {} instead of {package}",
        version.trim()
    );
    ensure!(
        show_one(vm, "ActiveState")? == "active",
        "the unit is not active after installing {package}"
    );
    Ok((version.trim().to_owned(), attempts, answered))
}

/// This release to the previous one: documented to work (the previous
/// release knows no layout record and takes over the maps it knows).
pub(super) fn downgrade(vm: &mut Vm, package: &str) -> anyhow::Result<String> {
    let (version, attempts, answered) = install_under_traffic(vm, package)?;
    ensure!(
        version == PREVIOUS_VERSION,
        "{version} installed, not {PREVIOUS_VERSION}"
    );
    Ok(format!(
        "{version} running (pin layout 1); {attempts} connections to :9000 meanwhile, 0 answered; \
         {answered} echoes to fa0 answered, none lost; both pins taken over"
    ))
}

/// The previous release to this one's next version: the new agent takes
/// over the older layout and carries the counters.
pub(super) fn upgrade(vm: &mut Vm, package: &str) -> anyhow::Result<String> {
    let (before, _) = counted(vm, "ping")?;
    let (version, attempts, answered) = install_under_traffic(vm, package)?;
    let (after, generation) = counted(vm, "ping")?;
    ensure!(
        after >= before + answered,
        "the ping rule counted {before} before and {after} after {answered} more echoes: counts not carried"
    );
    let pid = show_one(vm, "MainPID")?;
    let said = vm.ok(&format!(
        "journalctl _PID={pid} -o cat | grep 'taking over the pins of an older release'"
    ))?;
    ensure!(
        said.lines().count() == 2 && said.lines().all(|line| line.contains("from=1")),
        "the new agent did not take over layout 1 on both interfaces:\n{said}"
    );
    let line = said.lines().next().unwrap_or_default();
    let reset = line.split("reset=").nth(1).unwrap_or("?");
    Ok(format!(
        "{version} running; {attempts} connections to :9000 during it, 0 answered; {answered} echoes to fa0 answered, none lost; \
         ping counted {before} -> {after} (carried); generation {generation}; reset: {reset}"
    ))
}

#[cfg(test)]
mod tests {
    use super::answered_in_order;

    const OUT: &str = "PING 10.9.0.1 (10.9.0.1): 56 data bytes\n\
        64 bytes from 10.9.0.1: seq=0 ttl=64 time=0.1 ms\n\
        64 bytes from 10.9.0.1: seq=1 ttl=64 time=0.1 ms\n\
        64 bytes from 10.9.0.1: seq=2 ttl=64 time=0.1 ms\n\n\
        --- 10.9.0.1 ping statistics ---\n\
        4 packets transmitted, 3 packets received, 25% packet loss\n";

    #[test]
    fn only_the_echo_in_flight_may_lack_its_answer() {
        assert_eq!(answered_in_order(OUT).unwrap(), 3);
        let lost = OUT.replace("seq=1 ", "seq=9 ");
        let error = answered_in_order(&lost).unwrap_err().to_string();
        assert!(error.contains("seq [1]"), "{error}");
    }
}
