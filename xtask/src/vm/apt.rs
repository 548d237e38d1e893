//! apt with a configuration private to the xtask: its own sources list
//! (the archive this host's apt uses, [`archive::debian_archive`]), lists
//! and cache under `target/vm/apt/SUITE-ARCH`, for any Debian release and
//! architecture; the host's sources and package state stay untouched.

use std::{
    collections::{BTreeSet, VecDeque},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use super::archive;
use crate::util::{output, run};

pub struct Apt {
    dir: PathBuf,
    arch: &'static str,
}

impl Apt {
    /// apt for `suite`'s `arch` packages, its lists updated.
    pub fn new(target: &Path, suite: &str, arch: &'static str) -> anyhow::Result<Self> {
        let dir = target.join("apt").join(format!("{suite}-{arch}"));
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        fs::write(
            dir.join("sources.list"),
            format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} {suite} main\n",
                archive::debian_archive()?
            ),
        )?;
        let apt = Self { dir, arch };
        run(apt.command("apt-get").arg("update")).with_context(|| {
            format!("apt-get update for {suite} {arch} with the xtask's own sources")
        })?;
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .arg("-q")
            .arg(format!(
                "-oDir::Etc::SourceList={}",
                self.dir.join("sources.list").display()
            ))
            .arg("-oDir::Etc::SourceParts=/dev/null")
            .arg(format!(
                "-oDir::State::Lists={}",
                self.dir.join("lists").display()
            ))
            .arg(format!("-oDir::Cache={}", self.dir.join("cache").display()))
            .arg(format!("-oAPT::Architecture={}", self.arch))
            .arg(format!("-oAPT::Architectures={}", self.arch));
        command
    }

    /// The packages `package` depends on (real ones: no virtual names).
    pub fn depends(&self, package: &str) -> anyhow::Result<Vec<String>> {
        let listing = output(self.command("apt-cache").args(["depends", package]))
            .with_context(|| format!("apt-cache depends {package}"))?;
        Ok(listing
            .lines()
            .filter_map(|line| {
                let line = line.trim();
                line.strip_prefix("Depends: ")
                    .or_else(|| line.strip_prefix("PreDepends: "))
            })
            .filter(|name| !name.starts_with('<'))
            .map(|name| name.split(':').next().unwrap_or(name).to_owned())
            .collect())
    }

    /// `packages` and, transitively, the libraries they depend on (names
    /// that `follow` accepts), each once.
    pub fn closure(
        &self,
        packages: &[&str],
        follow: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Vec<String>> {
        let mut seen: BTreeSet<String> = packages.iter().map(|name| (*name).to_owned()).collect();
        let mut queue: VecDeque<String> = seen.iter().cloned().collect();
        while let Some(package) = queue.pop_front() {
            for dependency in self.depends(&package)? {
                if follow(&dependency) && seen.insert(dependency.clone()) {
                    queue.push_back(dependency);
                }
            }
        }
        Ok(seen.into_iter().collect())
    }

    /// Downloads `packages` into this apt's `debs/`; returns their files.
    pub fn download(&self, packages: &[String]) -> anyhow::Result<Vec<PathBuf>> {
        let debs = self.dir.join("debs");
        let _ = fs::remove_dir_all(&debs);
        fs::create_dir_all(&debs)?;
        run(self
            .command("apt-get")
            .arg("download")
            .args(packages)
            .current_dir(&debs))?;
        let mut files: Vec<PathBuf> = fs::read_dir(&debs)?
            .filter_map(|entry| Some(entry.ok()?.path()))
            .collect();
        files.sort();
        anyhow::ensure!(
            files.len() == packages.len(),
            "apt-get download left {} files for {} packages",
            files.len(),
            packages.len()
        );
        Ok(files)
    }
}

/// Unpacks each of `debs` into `root` (no maintainer script runs).
pub fn unpack(debs: &[PathBuf], root: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(root);
    fs::create_dir_all(root)?;
    for deb in debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))?;
    }
    Ok(())
}
