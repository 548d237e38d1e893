//! The guest's initramfs: static busybox, the agent, iproute2, bpftool and
//! nft with the host's shared libraries, the guest scripts, and one
//! kernel's modules. Written as a cpio (newc) archive by hand: a few dozen
//! files need no tool.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util::output;

/// Host programs the checks run in the guest (with their libraries).
const HOST_PROGRAMS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/tc",
    "/usr/sbin/bpftool",
    "/usr/sbin/nft",
];
const BUSYBOX: &str = "/bin/busybox";

/// Files of the guest under `/vm` and `/init`.
const GUEST_FILES: &[(&str, &str, u32)] = &[
    ("init", include_str!("guest/init"), 0o755),
    ("vm/serve.sh", include_str!("guest/serve.sh"), 0o755),
    ("vm/prelude.sh", include_str!("guest/prelude.sh"), 0o644),
    ("vm/setup.sh", include_str!("guest/setup.sh"), 0o755),
    ("vm/snapshot.sh", include_str!("guest/snapshot.sh"), 0o755),
    ("vm/nat.nft", include_str!("guest/nat.nft"), 0o644),
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

/// A cpio archive being written.
#[derive(Default)]
pub struct Archive {
    bytes: Vec<u8>,
    inode: u32,
    dirs: BTreeSet<String>,
}

impl Archive {
    /// An archive with the console device and static busybox, the base of
    /// every initramfs here.
    pub fn with_busybox() -> anyhow::Result<Self> {
        let mut archive = Self::default();
        archive.char_device("dev/console", 5, 1);
        archive.file(
            BUSYBOX,
            0o755,
            &fs::read(BUSYBOX).context("busybox-static is not installed")?,
        );
        Ok(archive)
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let name_size = path.len() + 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name_size as u32,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(path.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    /// Adds `path`'s parent directories that are not there yet.
    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let dir = prefix.clone();
                self.entry(&dir, 0o040_755, (0, 0), &[]);
            }
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, 0o100_000 | mode, (0, 0), data);
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.parents(path);
        self.entry(path, 0o020_600, (major, minor), &[]);
    }

    /// The archive, closed with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // The kernel reads archives in 512-byte blocks.
        while !self.bytes.len().is_multiple_of(512) {
            self.bytes.push(0);
        }
        self.bytes
    }
}

/// Everything but the kernel's modules: the same for every kernel.
pub fn userland(agent: &Path, refused: &[u8], work: &Path) -> anyhow::Result<Vec<u8>> {
    let mut archive = Archive::with_busybox()?;
    let stripped = work.join("filter-agent");
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&stripped)
        .arg(agent)
        .status()
        .context("cannot run strip")?;
    if !status.success() {
        bail!("strip {} failed", agent.display());
    }
    archive.file("usr/sbin/filter-agent", 0o755, &fs::read(&stripped)?);
    let mut libraries = BTreeSet::new();
    for program in HOST_PROGRAMS {
        archive.file(
            program,
            0o755,
            &fs::read(program).with_context(|| format!("cannot read {program}"))?,
        );
        libraries.extend(shared_libraries(Path::new(program))?);
    }
    libraries.extend(shared_libraries(agent)?);
    for library in libraries {
        let path = library.to_str().context("a non-UTF-8 library path")?;
        archive.file(path, 0o755, &fs::read(&library)?);
    }
    for (path, text, mode) in GUEST_FILES {
        archive.file(path, *mode, text.as_bytes());
    }
    archive.file("vm/refused.o", 0o644, refused);
    archive.file("www/index.html", 0o644, b"hello from the guest\n");
    Ok(archive.finish())
}

/// Kernel modules and their load order, as a second archive (the kernel
/// unpacks concatenated archives one after the other).
pub fn modules(modules: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut archive = Archive::default();
    let mut order = String::new();
    for (name, bytes) in modules {
        archive.file(&format!("lib/modules/{name}"), 0o644, bytes);
        order.push_str(name);
        order.push('\n');
    }
    archive.file("lib/modules/load.list", 0o644, order.as_bytes());
    archive.finish()
}

/// `ldd`'s answer: the libraries and the dynamic loader `program` needs.
fn shared_libraries(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let listing = output(Command::new("ldd").arg(program))
        .with_context(|| format!("ldd {} failed", program.display()))?;
    Ok(listing
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once(" => ") {
                Some((_, rest)) => rest.split(' ').next()?,
                None => line.split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_entries_are_aligned_newc_records() {
        let mut archive = Archive::default();
        archive.file("/a/b.txt", 0o644, b"abc");
        let bytes = archive.finish();
        assert!(bytes.starts_with(b"070701"));
        // The parent directory comes first, then the file.
        let text = String::from_utf8_lossy(&bytes);
        let dir = text.find("a\0").unwrap();
        let file = text.find("a/b.txt\0").unwrap();
        assert!(dir < file);
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(bytes.len() % 512, 0);
    }
}
