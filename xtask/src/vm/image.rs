//! The guest's initramfs: static busybox, the agent, iproute2, bpftool and
//! nft with their shared libraries (the host's own, or for another
//! architecture those of Debian's packages), the guest scripts, and one
//! kernel's modules. Written as a cpio (newc) archive by hand: a few dozen
//! files need no tool.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

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
];

/// Where the guest's programs come from.
pub enum Programs<'a> {
    /// This host's, with their libraries (`ldd`).
    Host,
    /// A tree of unpacked Debian packages of the guest's architecture:
    /// busybox-static, iproute2, bpftool, nftables and their libraries.
    Unpacked(&'a Path),
}

/// Top directories of an unpacked tree that the guest needs (not
/// `usr/share`: documentation and locales).
const PROGRAM_DIRS: &[&str] = &["bin", "sbin", "lib", "usr/bin", "usr/sbin", "usr/lib"];

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

    fn symlink(&mut self, path: &str, target: &str) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, 0o120_777, (0, 0), target.as_bytes());
    }

    /// Adds every file and symbolic link below `root`'s `dir`, at its path
    /// relative to `root`.
    fn tree(&mut self, root: &Path, dir: &str) -> anyhow::Result<()> {
        let Ok(entries) = fs::read_dir(root.join(dir)) else {
            return Ok(());
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let path = format!("{dir}/{}", name.to_str().context("a non-UTF-8 file name")?);
            let metadata = entry.metadata()?;
            if metadata.is_symlink() {
                let target = fs::read_link(entry.path())?;
                self.symlink(&path, target.to_str().context("a non-UTF-8 link")?);
            } else if metadata.is_dir() {
                self.tree(root, &path)?;
            } else {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = metadata.permissions().mode() & 0o7777;
                self.file(&path, mode, &fs::read(entry.path())?);
            }
        }
        Ok(())
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

/// Everything but the kernel's modules: the same for every kernel of an
/// architecture. `agent` is a static (packaged) binary.
pub fn userland(agent: &[u8], refused: &[u8], programs: &Programs) -> anyhow::Result<Vec<u8>> {
    let mut archive = match programs {
        Programs::Host => host_programs()?,
        Programs::Unpacked(root) => unpacked_programs(root)?,
    };
    archive.file("usr/sbin/filter-agent", 0o755, agent);
    for (path, text, mode) in GUEST_FILES.iter().chain(super::RULE_FILES) {
        archive.file(path, *mode, text.as_bytes());
    }
    archive.file("vm/refused.o", 0o644, refused);
    archive.file("www/index.html", 0o644, b"hello from the guest\n");
    Ok(archive.finish())
}

/// Busybox and [`HOST_PROGRAMS`] of this host, with their libraries.
fn host_programs() -> anyhow::Result<Archive> {
    let mut archive = Archive::with_busybox()?;
    let mut libraries = BTreeSet::new();
    for program in HOST_PROGRAMS {
        archive.file(
            program,
            0o755,
            &fs::read(program).with_context(|| format!("cannot read {program}"))?,
        );
        libraries.extend(shared_libraries(Path::new(program))?);
    }
    for library in libraries {
        let path = library.to_str().context("a non-UTF-8 library path")?;
        archive.file(path, 0o755, &fs::read(&library)?);
    }
    Ok(archive)
}

/// The programs of an unpacked tree, with [`HOST_PROGRAMS`] also at the
/// paths the guest's scripts name (Debian puts `ip` in /bin, `tc` in /sbin).
fn unpacked_programs(root: &Path) -> anyhow::Result<Archive> {
    let mut archive = Archive::default();
    archive.char_device("dev/console", 5, 1);
    for dir in PROGRAM_DIRS {
        archive.tree(root, dir)?;
    }
    for program in HOST_PROGRAMS {
        let name = Path::new(program)
            .file_name()
            .context("a program without a name")?;
        // Links are not followed: an absolute one points into this host.
        let regular = |path: &Path| fs::symlink_metadata(path).is_ok_and(|meta| meta.is_file());
        let found = ["bin", "sbin", "usr/bin", "usr/sbin"]
            .iter()
            .map(|dir| root.join(dir).join(name))
            .find(|path| regular(path))
            .with_context(|| format!("no {} in {}", name.to_string_lossy(), root.display()))?;
        if fs::symlink_metadata(root.join(program.trim_start_matches('/'))).is_err() {
            archive.file(program, 0o755, &fs::read(found)?);
        }
    }
    Ok(archive)
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
