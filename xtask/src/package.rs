//! `cargo xtask package`: the Debian package, `target/debian/
//! filter-agent_VERSION_amd64.deb`. Built with dpkg-deb from a staged tree
//! rather than with cargo-deb: dpkg-deb is on every Debian system, while
//! cargo-deb would be one more tool to build, and the package is small
//! enough that its control file reads best written out here.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::util::{self, workspace_root};

/// The package's version: the workspace's.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
const MAINTAINER: &str = "filter-agent developers <filter-agent@example.invalid>";
const DESCRIPTION: &str = "stateless XDP packet filter and ephemeral-port guard
 filter-agent enforces an ordered allow/deny list in XDP, before conntrack,
 on a host's network interfaces, and counts return traffic that lands
 outside the configured ephemeral port range (what a stateless cloud ACL
 would drop). Rules are reloaded atomically; the filter stays in place
 while the agent restarts. Counters are served to Prometheus.";

/// Builds the package; returns its path.
pub fn run() -> anyhow::Result<PathBuf> {
    build(VERSION)
}

/// Builds the package with `version` (a later one to test upgrades).
pub fn build(version: &str) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    util::cargo(&[
        "build",
        "--release",
        "-p",
        "filter-agent",
        "--bin",
        "filter-agent",
    ])?;
    let generated = root.join("target/debian/generated");
    let out = generated.to_str().context("a non-UTF-8 target directory")?;
    util::cargo(&[
        "run",
        "--release",
        "-p",
        "filter-agent",
        "--example",
        "package_docs",
        "--",
        out,
    ])?;
    let stage = root.join(format!("target/debian/filter-agent_{version}_amd64"));
    let _ = fs::remove_dir_all(&stage);
    let binary = stage.join("usr/sbin/filter-agent");
    install(&root.join("target/release/filter-agent"), &binary, 0o755)?;
    util::run(Command::new("strip").arg("--strip-unneeded").arg(&binary))?;
    stage_files(&root, &stage, &generated, version)?;
    write_control(&stage, &binary, version)?;
    let deb = root.join(format!("target/debian/filter-agent_{version}_amd64.deb"));
    util::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("package: {}", deb.display());
    Ok(deb)
}

/// Runs lintian on `deb`, showing what it reports; fails on an error.
pub fn lint(deb: &Path) -> anyhow::Result<()> {
    util::run(
        Command::new("lintian")
            .args(["--fail-on", "error", "--info"])
            .arg(deb),
    )
}

/// Checks the DaemonSet manifest against Kubernetes' own schemas (strict:
/// an unknown field fails), for an older and the newest supported release.
pub fn validate_manifest() -> anyhow::Result<()> {
    let manifest = workspace_root().join("packaging/kubernetes/filter-agent.yaml");
    for version in ["1.28.0", "1.37.0"] {
        util::run(
            Command::new(crate::setup::kubernetes_validate().join("bin/kubernetes-validate"))
                .args(["--strict", "--kubernetes-version", version])
                .arg(&manifest),
        )
        .with_context(|| format!("the DaemonSet manifest against Kubernetes {version}"))?;
    }
    Ok(())
}

/// Everything but the binary and the control files.
fn stage_files(root: &Path, stage: &Path, generated: &Path, version: &str) -> anyhow::Result<()> {
    let packaging = root.join("packaging");
    let debian = packaging.join("debian");
    let files = [
        (
            packaging.join("filter-agent.service"),
            "lib/systemd/system/filter-agent.service",
        ),
        (debian.join("rules.toml"), "etc/filter-agent/rules.toml"),
        (debian.join("default"), "etc/default/filter-agent"),
        (
            debian.join("copyright"),
            "usr/share/doc/filter-agent/copyright",
        ),
        (
            root.join("README.md"),
            "usr/share/doc/filter-agent/README.md",
        ),
        (
            root.join("docs/rules.md"),
            "usr/share/doc/filter-agent/rules.md",
        ),
        (
            generated.join("completions/filter-agent.bash"),
            "usr/share/bash-completion/completions/filter-agent",
        ),
        (
            generated.join("completions/_filter-agent"),
            "usr/share/zsh/vendor-completions/_filter-agent",
        ),
        (
            generated.join("completions/filter-agent.fish"),
            "usr/share/fish/vendor_completions.d/filter-agent.fish",
        ),
    ];
    for (from, to) in files {
        install(&from, &stage.join(to), 0o644)?;
    }
    for page in fs::read_dir(generated.join("man"))? {
        let page = page?.path();
        let name = page.file_name().context("a man page without a name")?;
        let to = stage.join("usr/share/man/man8").join(name);
        install(&page, &to, 0o644)?;
        util::run(Command::new("gzip").args(["-9n"]).arg(&to))?;
    }
    // A native package: changelog, not changelog.Debian.
    let changelog = stage.join("usr/share/doc/filter-agent/changelog");
    fs::write(
        &changelog,
        format!(
            "filter-agent ({version}) unstable; urgency=medium\n\n  * Built by cargo xtask package.\n\n -- {MAINTAINER}  Wed, 02 Dec 2026 00:00:00 +0000\n"
        ),
    )?;
    util::run(Command::new("gzip").args(["-9n"]).arg(&changelog))?;
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &debian.join(script),
            &stage.join("DEBIAN").join(script),
            0o755,
        )?;
    }
    Ok(())
}

/// `DEBIAN/control` (with the libc the binary needs) and `conffiles`.
fn write_control(stage: &Path, binary: &Path, version: &str) -> anyhow::Result<()> {
    let installed_kib = du_kib(stage)?;
    let glibc = glibc_needed(binary)?;
    let control = format!(
        "Package: filter-agent\nVersion: {version}\nArchitecture: amd64\nMaintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\nDepends: libc6 (>= {glibc}), libgcc-s1, init-system-helpers (>= 1.54~)\nRecommends: nftables\n\
         Section: net\nPriority: optional\nHomepage: https://example.invalid/filter-agent\n\
         Description: {DESCRIPTION}\n"
    );
    fs::write(stage.join("DEBIAN/control"), control)?;
    fs::write(
        stage.join("DEBIAN/conffiles"),
        "/etc/default/filter-agent\n/etc/filter-agent/rules.toml\n",
    )?;
    Ok(())
}

/// The newest `GLIBC_x.y` symbol version the binary uses.
fn glibc_needed(binary: &Path) -> anyhow::Result<String> {
    let output = Command::new("objdump").arg("-T").arg(binary).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = |text: &str| -> Option<Vec<u32>> {
        text.split('.').map(|part| part.parse().ok()).collect()
    };
    text.split_whitespace()
        .filter_map(|word| word.trim_matches(['(', ')']).strip_prefix("GLIBC_"))
        .filter_map(|v| version(v).map(|parsed| (parsed, v.to_owned())))
        .max()
        .map(|(_, text)| text)
        .context("no GLIBC version in the binary's dynamic symbols")
}

/// The staged tree's size in KiB, as `Installed-Size` wants it.
fn du_kib(stage: &Path) -> anyhow::Result<u64> {
    let mut bytes = 0;
    let mut dirs = vec![stage.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let metadata = entry.metadata()?;
            if metadata.is_dir() && entry.file_name() != "DEBIAN" {
                dirs.push(entry.path());
            } else if metadata.is_file() {
                bytes += metadata.len();
            }
        }
    }
    Ok(bytes.div_ceil(1024))
}

fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    fs::create_dir_all(to.parent().context("a path without a parent")?)?;
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}
