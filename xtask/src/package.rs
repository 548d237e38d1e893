//! `cargo xtask package`: static `filter-agent` binaries for x86-64 and
//! arm64 (musl: no shared library, so one build runs on every Debian and
//! most other distributions), and from them the Debian packages
//! `target/debian/filter-agent_VERSION_{amd64,arm64}.deb` and the tarballs
//! `target/dist/filter-agent-VERSION-{x86_64,aarch64}-linux.tar.gz`, each
//! directory with its `SHA256SUMS`.
//!
//! The packages are built with dpkg-deb from a staged tree rather than with
//! cargo-deb: dpkg-deb is on every Debian system, while cargo-deb would be
//! one more tool to build, and the package is small enough that its control
//! file reads best written out here.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

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

/// One architecture the project ships for.
#[derive(Clone, Copy, Debug)]
pub struct Arch {
    /// Debian's name: `amd64`.
    pub debian: &'static str,
    /// The kernel's (`uname -m`): `x86_64`.
    uname: &'static str,
    /// Rust's target.
    triple: &'static str,
    /// The linker for the target, where the host's `cc` cannot link it.
    linker: Option<&'static str>,
    /// binutils' strip for the target's ELF files.
    strip: &'static str,
}

pub const AMD64: Arch = Arch {
    debian: "amd64",
    uname: "x86_64",
    triple: "x86_64-unknown-linux-musl",
    linker: None,
    strip: "strip",
};

pub const ARM64: Arch = Arch {
    debian: "arm64",
    uname: "aarch64",
    triple: "aarch64-unknown-linux-musl",
    linker: Some("aarch64-linux-gnu-gcc"),
    strip: "aarch64-linux-gnu-strip",
};

pub const ARCHES: [Arch; 2] = [AMD64, ARM64];

/// What [`build`] made.
pub struct Artifacts {
    /// One package per architecture, in [`ARCHES`] order.
    pub debs: Vec<PathBuf>,
    pub tarballs: Vec<PathBuf>,
}

/// Builds every package and tarball of this version.
pub fn run() -> anyhow::Result<Artifacts> {
    build(VERSION)
}

/// Builds every package and tarball with `version` (a later one tests
/// upgrades).
pub fn build(version: &str) -> anyhow::Result<Artifacts> {
    let root = workspace_root();
    let binaries = binaries()?;
    let generated = root.join("target/debian/generated");
    let out = generated.to_str().context("a non-UTF-8 target directory")?;
    // Debug: the docs do not depend on the profile, and the other steps
    // of `cargo xtask test` share this build.
    util::run(
        Command::new(util::dev_example("package_docs")?)
            .arg(out)
            .current_dir(&root),
    )?;
    let mut artifacts = Artifacts {
        debs: Vec::new(),
        tarballs: Vec::new(),
    };
    for (arch, binary) in ARCHES.iter().zip(&binaries) {
        let inputs = Inputs {
            root: &root,
            arch: *arch,
            binary,
            generated: &generated,
            version,
        };
        artifacts.debs.push(deb(&inputs)?);
        artifacts.tarballs.push(tarball(&inputs)?);
    }
    checksums(&artifacts.debs)?;
    checksums(&artifacts.tarballs)?;
    for file in artifacts.debs.iter().chain(&artifacts.tarballs) {
        println!("package: {}", file.display());
    }
    Ok(artifacts)
}

/// The static binary of each of [`ARCHES`], stripped, under
/// `target/dist/bin/ARCH/`. The eBPF object is built once, with the
/// first, and embedded as it is in the others.
pub fn binaries() -> anyhow::Result<Vec<PathBuf>> {
    let root = workspace_root();
    let mut object: Option<PathBuf> = None;
    let mut built = Vec::new();
    for arch in ARCHES {
        let mut build = Command::new(util::cargo_program());
        build
            .args(["build", "--release", "-p", "filter-agent", "--bin"])
            .args(["filter-agent", "--target", arch.triple])
            .current_dir(&root);
        if let Some(linker) = arch.linker {
            let variable = format!(
                "CARGO_TARGET_{}_LINKER",
                arch.triple.to_uppercase().replace('-', "_")
            );
            build.env(variable, linker);
        }
        if let Some(object) = &object {
            build.env("FILTER_AGENT_EBPF_OBJECT", object);
        }
        util::run(&mut build).with_context(|| format!("building for {}", arch.triple))?;
        let release = root.join("target").join(arch.triple).join("release");
        if object.is_none() {
            object = Some(embedded_object(&release.join("build"))?);
        }
        let binary = root
            .join("target/dist/bin")
            .join(arch.debian)
            .join("filter-agent");
        install(&release.join("filter-agent"), &binary, 0o755)?;
        util::run(
            Command::new(arch.strip)
                .arg("--strip-unneeded")
                .arg(&binary),
        )?;
        ensure_static(&binary)?;
        built.push(binary);
    }
    let object = fs::read(object.context("no architecture built")?)?;
    for binary in &built {
        ensure!(
            fs::read(binary)?
                .windows(object.len())
                .any(|window| window == object),
            "{} does not embed the eBPF object built first",
            binary.display()
        );
    }
    Ok(built)
}

/// The static binary of this machine's architecture, as the packages ship
/// it.
pub fn host_binary() -> anyhow::Result<PathBuf> {
    let index = ARCHES
        .iter()
        .position(|arch| arch.uname == std::env::consts::ARCH)
        .with_context(|| format!("no package for {}", std::env::consts::ARCH))?;
    Ok(binaries()?.swap_remove(index))
}

/// `filter-agent-*/out/filter` under `build`: the object build.rs embedded last.
pub fn embedded_object(build: &Path) -> anyhow::Result<PathBuf> {
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

/// Fails unless `binary` asks for no interpreter and no shared library.
fn ensure_static(binary: &Path) -> anyhow::Result<()> {
    let readelf = |flag: &str| {
        util::output(Command::new("readelf").arg(flag).arg(binary))
            .with_context(|| format!("readelf {flag} {}", binary.display()))
    };
    let headers = readelf("-lW")?;
    let dynamic = readelf("-dW")?;
    ensure!(
        !headers.contains("INTERP") && !dynamic.contains("(NEEDED)"),
        "{} is not static:\n{}",
        binary.display(),
        dynamic.trim()
    );
    Ok(())
}

/// What one architecture's package and tarball are made of.
struct Inputs<'a> {
    root: &'a Path,
    arch: Arch,
    /// The static binary.
    binary: &'a Path,
    /// Man pages and completions (`package_docs`).
    generated: &'a Path,
    version: &'a str,
}

/// Builds `target/debian/filter-agent_VERSION_ARCH.deb`.
fn deb(inputs: &Inputs) -> anyhow::Result<PathBuf> {
    let (root, arch, generated, version) =
        (inputs.root, inputs.arch, inputs.generated, inputs.version);
    let name = format!("filter-agent_{version}_{}", arch.debian);
    let stage = root.join("target/debian").join(&name);
    let _ = fs::remove_dir_all(&stage);
    install(inputs.binary, &stage.join("usr/sbin/filter-agent"), 0o755)?;
    for (from, to) in shipped_files(root, generated) {
        install(&from, &stage.join(to), 0o644)?;
    }
    for page in man_pages(generated)? {
        // The section is the page's extension: 8 for commands, 5 for the
        // rules file.
        let section = page.extension().and_then(|e| e.to_str()).unwrap_or("8");
        let to = stage
            .join(format!("usr/share/man/man{section}"))
            .join(page.file_name().context("a man page without a name")?);
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
    let debian = root.join("packaging/debian");
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &debian.join(script),
            &stage.join("DEBIAN").join(script),
            0o755,
        )?;
    }
    write_control(&stage, arch, version)?;
    let deb = root.join("target/debian").join(format!("{name}.deb"));
    util::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// Everything but the binary, the man pages and the control files: (from,
/// path in the package).
fn shipped_files(root: &Path, generated: &Path) -> Vec<(PathBuf, &'static str)> {
    let packaging = root.join("packaging");
    let debian = packaging.join("debian");
    vec![
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
            debian.join("lintian-overrides"),
            "usr/share/lintian/overrides/filter-agent",
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
    ]
}

fn man_pages(generated: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut pages: Vec<PathBuf> = fs::read_dir(generated.join("man"))?
        .map(|page| Ok(page?.path()))
        .collect::<std::io::Result<_>>()?;
    pages.sort();
    Ok(pages)
}

/// `DEBIAN/control` and `conffiles`. The binary is static: the package
/// needs only what every Debian has, and init-system-helpers for its
/// maintainer scripts.
fn write_control(stage: &Path, arch: Arch, version: &str) -> anyhow::Result<()> {
    let installed_kib = du_kib(stage)?;
    let control = format!(
        "Package: filter-agent\nVersion: {version}\nArchitecture: {}\nMaintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\nDepends: init-system-helpers (>= 1.54~)\nRecommends: nftables\n\
         Section: net\nPriority: optional\nHomepage: https://example.invalid/filter-agent\n\
         Description: {DESCRIPTION}\n",
        arch.debian
    );
    fs::write(stage.join("DEBIAN/control"), control)?;
    fs::write(
        stage.join("DEBIAN/conffiles"),
        "/etc/default/filter-agent\n/etc/filter-agent/rules.toml\n",
    )?;
    Ok(())
}

/// `target/dist/filter-agent-VERSION-ARCH-linux.tar.gz`: one directory
/// with the binary, the unit and its defaults, the man pages, completions,
/// the example rules (monitor mode) and the docs, for hosts without apt.
fn tarball(inputs: &Inputs) -> anyhow::Result<PathBuf> {
    let (root, arch, generated, version) =
        (inputs.root, inputs.arch, inputs.generated, inputs.version);
    let name = format!("filter-agent-{version}-{}-linux", arch.uname);
    let dist = root.join("target/dist");
    let stage = dist.join(&name);
    let _ = fs::remove_dir_all(&stage);
    install(inputs.binary, &stage.join("filter-agent"), 0o755)?;
    for (from, to) in shipped_files(root, generated) {
        // The package's paths, flattened to where an unpacked tarball's
        // reader looks: `filter-agent.service`, `rules.toml`, `man/` ...
        let file = Path::new(to).file_name().context("a file without a name")?;
        let to = match to {
            t if t.contains("completions") => Path::new("completions").join(
                Path::new(&from)
                    .file_name()
                    .context("a file without a name")?,
            ),
            "etc/default/filter-agent" => PathBuf::from("default/filter-agent"),
            t if t.contains("lintian") => continue,
            _ => PathBuf::from(file),
        };
        install(&from, &stage.join(to), 0o644)?;
    }
    for page in man_pages(generated)? {
        let file = page.file_name().context("a man page without a name")?;
        install(&page, &stage.join("man").join(file), 0o644)?;
    }
    let tarball = dist.join(format!("{name}.tar.gz"));
    util::run(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .args(["--mtime=@0", "--use-compress-program=gzip -9n", "-cf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&dist)
            .arg(&name),
    )?;
    fs::remove_dir_all(&stage)?;
    Ok(tarball)
}

/// `SHA256SUMS` beside `files` (all in one directory), as `sha256sum -c`
/// reads it.
fn checksums(files: &[PathBuf]) -> anyhow::Result<()> {
    let dir = files
        .first()
        .and_then(|file| file.parent())
        .context("nothing to sum")?;
    let names: Vec<&std::ffi::OsStr> = files.iter().filter_map(|file| file.file_name()).collect();
    let sums = Command::new("sha256sum")
        .args(&names)
        .current_dir(dir)
        .output()
        .context("cannot run sha256sum")?;
    if !sums.status.success() {
        bail!(
            "sha256sum failed: {}",
            String::from_utf8_lossy(&sums.stderr)
        );
    }
    fs::write(dir.join("SHA256SUMS"), sums.stdout)?;
    Ok(())
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

/// Copies `from` to `to` with `mode`, replacing `to` in one rename: a
/// reader (vm-test reads the binaries while its other lane packages)
/// sees the old file or the new one, never half of one.
fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    fs::create_dir_all(to.parent().context("a path without a parent")?)?;
    let partial = to.with_extension("partial");
    fs::copy(from, &partial).with_context(|| format!("copying {}", from.display()))?;
    fs::set_permissions(&partial, fs::Permissions::from_mode(mode))?;
    fs::rename(&partial, to)?;
    Ok(())
}
