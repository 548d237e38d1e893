//! Debian's stock kernels, fetched with the xtask's own apt (`apt.rs`)
//! and cached under `target/vm/kernels`.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::apt::{self, Apt};

/// A Debian release and architecture whose stock kernel a VM boots.
#[derive(Clone, Copy, Debug)]
pub struct Suite {
    /// The guest's name (`--guest`), and the kernel's cache directory.
    pub name: &'static str,
    /// The release's code name.
    pub codename: &'static str,
    pub debian: &'static str,
    /// Debian's name of the architecture (`linux-image-ARCH`).
    pub arch: &'static str,
}

/// Debian 12, whose kernel the systemd guest boots.
pub const BOOKWORM: Suite = Suite {
    name: "bookworm",
    codename: "bookworm",
    debian: "Debian 12",
    arch: "amd64",
};

pub const BULLSEYE: Suite = Suite {
    name: "bullseye",
    codename: "bullseye",
    debian: "Debian 11",
    arch: "amd64",
};

pub const TRIXIE: Suite = Suite {
    name: "trixie",
    codename: "trixie",
    debian: "Debian 13",
    arch: "amd64",
};

/// Debian 12's arm64 kernel, under qemu-system-aarch64.
pub const BOOKWORM_ARM64: Suite = Suite {
    name: "bookworm-arm64",
    codename: "bookworm",
    debian: "Debian 12 arm64",
    arch: "arm64",
};

/// The kernels the busybox guests boot, one guest each.
pub const SUITES: [Suite; 4] = [BULLSEYE, BOOKWORM, TRIXIE, BOOKWORM_ARM64];

/// Modules the checks need (their dependencies are found by themselves):
/// the NIC, veth and dummy links, clsact and the tc filters of the tests,
/// and nftables NAT for the egress guard's post-NAT check.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "veth",
    "dummy",
    "sch_ingress",
    "cls_bpf",
    "cls_matchall",
    "act_gact",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
];

/// An unpacked kernel package.
pub struct Kernel {
    /// `uname -r` inside the VM, e.g. `6.1.0-50-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `.../modules/RELEASE` in the unpacked package.
    pub modules_dir: PathBuf,
}

impl Kernel {
    /// The modules `names` and their dependencies, dependencies first,
    /// uncompressed (busybox's insmod reads plain ELF).
    pub fn modules(&self, names: &[&str]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        resolve_modules(&self.modules_dir, names)
            .with_context(|| format!("modules of {}", self.release))
    }
}

pub fn fetch(suite: Suite, target: &Path) -> anyhow::Result<Kernel> {
    let root = target.join("kernels").join(suite.name);
    let done = root.join("release");
    if !done.exists() {
        download(suite, target, &root)?;
    }
    let release = fs::read_to_string(&done)?.trim().to_owned();
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    let modules_dir = modules_dir(&root, &release)?;
    Ok(Kernel {
        release,
        vmlinuz,
        modules_dir,
    })
}

fn download(suite: Suite, target: &Path, root: &Path) -> anyhow::Result<()> {
    println!("vm-test: fetching the {} kernel", suite.debian);
    let apt = Apt::new(target, suite.codename, suite.arch)?;
    let image = format!("linux-image-{}", suite.arch);
    let package = apt
        .depends(&image)?
        .into_iter()
        .find(|name| name.starts_with("linux-image-"))
        .with_context(|| format!("{image} depends on no linux-image package"))?;
    let debs = apt.download(std::slice::from_ref(&package))?;
    apt::unpack(&debs, root)?;
    let release = package.trim_start_matches("linux-image-");
    fs::write(root.join("release"), release)?;
    // The .deb is unpacked: keep the cache small.
    fs::remove_file(&debs[0])?;
    Ok(())
}

/// Debian 13 moved modules from /lib to /usr/lib.
fn modules_dir(root: &Path, release: &str) -> anyhow::Result<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| root.join(dir).join(release))
        .find(|dir| dir.is_dir())
        .with_context(|| format!("no modules directory for {release} in {}", root.display()))
}

/// Finds `names` and everything they depend on (their `depends=`
/// modinfo), in load order. A name that is built into the kernel needs no
/// file.
fn resolve_modules(dir: &Path, names: &[&str]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = HashMap::new();
    index(&dir.join("kernel"), &mut files)?;
    let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .map(|file| module_name(file).to_owned())
        .collect();
    let mut ordered = Vec::new();
    let mut seen = BTreeSet::new();
    for name in names {
        visit(name, &files, &builtin, &mut seen, &mut ordered)?;
    }
    Ok(ordered)
}

fn visit(
    name: &str,
    files: &HashMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    ordered: &mut Vec<(String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    let Some(path) = files.get(&name) else {
        if builtin.contains(&name) {
            return Ok(());
        }
        bail!("no module {name}, and it is not built in");
    };
    let bytes = read_module(path)?;
    // Soft dependencies name crypto algorithms (`crc32c`, or by alias
    // `crypto-crc32c`), which the `_generic` modules implement; one that is
    // not found stays soft.
    for soft in soft_pre_dependencies(&bytes) {
        let soft = soft
            .strip_prefix("crypto-")
            .unwrap_or(&soft)
            .replace('-', "_");
        let generic = format!("{soft}_generic");
        if let Some(name) = [soft.as_str(), generic.as_str()]
            .into_iter()
            .find(|name| files.contains_key(*name))
        {
            visit(name, files, builtin, seen, ordered)?;
        }
    }
    for dependency in depends(&bytes) {
        visit(&dependency, files, builtin, seen, ordered)?;
    }
    ordered.push((format!("{name}.ko"), bytes));
    Ok(())
}

fn index(dir: &Path, files: &mut HashMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index(&path, files)?;
        } else if let Some(file) = path.file_name().and_then(|name| name.to_str()) {
            files.insert(module_name(file).to_owned(), path.clone());
        }
    }
    Ok(())
}

/// `nf_nat.ko.xz` -> `nf_nat` (and `-` read as `_`, as the kernel does).
fn module_name(file: &str) -> String {
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.extension().is_some_and(|ext| ext == "xz") {
        let output = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .context("cannot run xz")?;
        if !output.status.success() {
            bail!("xz -dc {} failed", path.display());
        }
        return Ok(output.stdout);
    }
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The module's `depends=a,b` modinfo string.
fn depends(module: &[u8]) -> Vec<String> {
    modinfo(module, "depends")
        .split(',')
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The `pre:` names of the module's `softdep=pre: a b post: c`.
fn soft_pre_dependencies(module: &[u8]) -> Vec<String> {
    let softdep = modinfo(module, "softdep");
    softdep
        .split_whitespace()
        .skip_while(|word| *word != "pre:")
        .skip(1)
        .take_while(|word| !word.ends_with(':'))
        .map(str::to_owned)
        .collect()
}

/// The value of `key=` in the module's NUL-separated modinfo strings.
fn modinfo(module: &[u8], key: &str) -> String {
    let key = format!("\0{key}=");
    let Some(start) = module
        .windows(key.len())
        .position(|window| window == key.as_bytes())
        .map(|at| at + key.len())
    else {
        return String::new();
    };
    let end = module[start..]
        .iter()
        .position(|&byte| byte == 0)
        .map_or(module.len(), |len| start + len);
    String::from_utf8_lossy(&module[start..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dependencies_from_modinfo() {
        let module = b"\x7fELF...\0license=GPL\0depends=nf_nat,nf_tables\0intree=Y\0";
        assert_eq!(depends(module), ["nf_nat", "nf_tables"]);
        assert!(depends(b"\0depends=\0").is_empty());
        assert!(depends(b"no modinfo").is_empty());
    }

    #[test]
    fn reads_soft_pre_dependencies() {
        assert_eq!(
            soft_pre_dependencies(b"\0softdep=pre: crc32c\0"),
            ["crc32c"]
        );
        assert_eq!(
            soft_pre_dependencies(b"\0softdep=pre: a b post: c\0"),
            ["a", "b"]
        );
        assert!(soft_pre_dependencies(b"\0softdep=post: c\0").is_empty());
    }

    #[test]
    fn module_names_ignore_compression_and_dashes() {
        assert_eq!(module_name("nf_nat.ko.xz"), "nf_nat");
        assert_eq!(module_name("virtio-net.ko"), "virtio_net");
    }
}
