//! The Debian systems (11, 12, 13) of `vm-test`'s systemd checks: minbase
//! plus systemd, udev, kmod, iproute2, busybox, bpftool, nftables, and
//! iptables, ipvsadm and procps for the LVS director, from Debian's
//! packages (mmdebstrap, from the archive this host's apt uses), cached
//! under `target/vm/debianN/rootfs`. Each
//! run stages the guest's files and the packages to install in it, writes
//! the tree to an ext4 disk image (`mke2fs -d`: no loop device, no mount)
//! and boots the stock kernel with a small busybox initramfs that mounts
//! the disk and hands over to systemd.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use super::{
    apt::Apt,
    archive, image,
    kernels::{Kernel, Suite},
};
use crate::util::run;

/// How the image is made (before the suite and the archive); changing it
/// (or [`MASKED`]) makes a new one.
const MMDEBSTRAP: &[&str] = &[
    "--quiet",
    "--variant=minbase",
    "--mode=root",
    "--format=directory",
    "--include=systemd,systemd-sysv,udev,kmod,iproute2,busybox,bpftool,iptables,ipvsadm,procps,nftables",
    // The Ansible rollout's way in: SSH, and Python with apt's bindings.
    "--include=openssh-server,python3-apt",
];
/// Packages that exist in some releases only (Debian 13 split
/// systemd-networkd out of systemd): included where the archive has them.
const WHERE_PACKAGED: &[&str] = &["systemd-networkd"];
/// Units of the image that only cost boot time in a throwaway VM.
const MASKED: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "e2scrub_reap.service",
];
/// The units the checks need, enabled in the image.
const ENABLED: &[&str] = &[
    "systemd-networkd.service",
    "vm-control.service",
    "vm-www@8080.service",
    "vm-www@9000.service",
];
/// The modules the initramfs loads to mount the disk; the rest come from
/// the disk, loaded by udev and the kernel as Debian loads them.
const BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];
/// What the real LVS director of `lvs-dr` needs beyond the checks'
/// modules: IPVS, conntrack and what UFW-style iptables-nft rules use,
/// and a bridge.
const LVS_MODULES: &[&str] = &[
    "ip_vs",
    "ip_vs_rr",
    "nf_conntrack",
    "nft_ct",
    "nft_compat",
    "xt_conntrack",
    "xt_tcpudp",
    "ip_tables",
    "bridge",
];
/// The disk's size: sparse, a few hundred MiB of it used.
const DISK_BYTES: u64 = 2 << 30;

/// The guest's files: (path in the image, contents, mode).
const GUEST_FILES: &[(&str, &str, u32)] = &[
    (
        "vm/control.sh",
        include_str!("guest/systemd/control.sh"),
        0o755,
    ),
    ("vm/serve.sh", include_str!("guest/serve.sh"), 0o755),
    (
        "vm/prelude.sh",
        include_str!("guest/systemd/prelude.sh"),
        0o644,
    ),
    ("vm/veth.sh", include_str!("guest/systemd/veth.sh"), 0o755),
    (
        "etc/systemd/system/vm-control.service",
        include_str!("guest/systemd/vm-control.service"),
        0o644,
    ),
    (
        "etc/systemd/system/vm-www@.service",
        include_str!("guest/systemd/vm-www@.service"),
        0o644,
    ),
    (
        "etc/systemd/network/10-nic.network",
        include_str!("guest/systemd/10-nic.network"),
        0o644,
    ),
    ("www/index.html", "hello from the guest\n", 0o644),
    ("etc/hostname", "vm\n", 0o644),
];

/// A bootable system: the kernel, its initramfs and the disk.
pub struct System {
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

/// What a run puts on the disk besides the guest's own files.
pub struct Staged<'a> {
    /// Packages, under `/root/debs`.
    pub debs: &'a [PathBuf],
    /// An eBPF object every verifier refuses, as `/vm/refused.o`.
    pub refused: &'a [u8],
    /// The scenario runner, as `/vm/fa-scenario` (Debian 12's guest).
    pub scenario: Option<&'a Path>,
    /// A public key root's SSH logins are made with (the Ansible rollout).
    pub authorized_key: Option<&'a str>,
}

/// Builds (or reuses) the image of `suite` and writes this run's disk with
/// `staged`.
pub fn prepare(
    suite: Suite,
    kernel: &Kernel,
    staged: &Staged,
    work: &Path,
) -> anyhow::Result<System> {
    let rootfs = work.join("rootfs");
    let vm_target = work.parent().context("a work directory without a parent")?;
    let apt = Apt::new(vm_target, suite.codename, suite.arch)?;
    let mut include = Vec::new();
    for package in WHERE_PACKAGED {
        if apt.depends(package).is_ok() {
            include.push(format!("--include={package}"));
        }
    }
    let archive = archive::debian_archive()?;
    let recipe = format!(
        "{MMDEBSTRAP:?} {include:?} {} {archive}\n{MASKED:?}\n",
        suite.codename
    );
    let stamp = rootfs.join(".xtask-recipe");
    if fs::read_to_string(&stamp).ok().as_deref() != Some(recipe.as_str()) {
        bootstrap(suite, &include, &archive, &rootfs)?;
        fs::write(&stamp, &recipe)?;
    }
    stage(&rootfs, kernel, staged)?;
    let disk = work.join("disk.img");
    let _ = fs::remove_file(&disk);
    fs::File::create(&disk)?.set_len(DISK_BYTES)?;
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", "root", "-d"])
        .arg(&rootfs)
        .arg(&disk))
    .context("writing the image to an ext4 disk")?;
    let initrd = work.join("initrd.cpio");
    fs::write(&initrd, initramfs(kernel)?)?;
    Ok(System { initrd, disk })
}

/// mmdebstrap into a fresh directory, then in place of the old image.
fn bootstrap(suite: Suite, include: &[String], archive: &str, rootfs: &Path) -> anyhow::Result<()> {
    println!(
        "vm-test: building the {} image (mmdebstrap, about a minute)",
        suite.debian
    );
    let fresh = rootfs.with_file_name("rootfs-new");
    let _ = fs::remove_dir_all(&fresh);
    fs::create_dir_all(&fresh)?;
    run(Command::new("mmdebstrap")
        .args(MMDEBSTRAP)
        .args(include)
        .arg(suite.codename)
        .arg(&fresh)
        .arg(archive))
    .with_context(|| format!("mmdebstrap of {} ({})", suite.debian, suite.codename))?;
    let _ = fs::remove_dir_all(rootfs);
    fs::rename(&fresh, rootfs)?;
    chroot(rootfs, &[&["systemctl", "mask"], MASKED].concat())?;
    Ok(())
}

/// This run's files: the guest's, the packages, the kernel's modules.
fn stage(rootfs: &Path, kernel: &Kernel, staged: &Staged) -> anyhow::Result<()> {
    for (path, text, mode) in GUEST_FILES.iter().chain(super::RULE_FILES) {
        write(&rootfs.join(path), text.as_bytes(), *mode)?;
    }
    write(&rootfs.join("vm/refused.o"), staged.refused, 0o644)?;
    if let Some(scenario) = staged.scenario {
        write(&rootfs.join("vm/fa-scenario"), &fs::read(scenario)?, 0o755)?;
    }
    let keys = rootfs.join("root/.ssh/authorized_keys");
    match staged.authorized_key {
        Some(key) => write(&keys, key.as_bytes(), 0o600)?,
        None => {
            let _ = fs::remove_file(&keys);
        }
    }
    let debs = rootfs.join("root/debs");
    let _ = fs::remove_dir_all(&debs);
    for deb in staged.debs {
        let name = deb.file_name().context("a package without a file name")?;
        write(&debs.join(name), &fs::read(deb)?, 0o644)?;
    }
    // The modules the checks need, where modprobe finds them (depmod's
    // index), with the kernel's list of what is built in. `lib/` is
    // `usr/lib/` where /usr is merged, and where it is not, still what
    // modprobe reads.
    let modules = rootfs.join("lib/modules").join(&kernel.release);
    let _ = fs::remove_dir_all(&modules);
    let mut wanted = BOOT_MODULES.to_vec();
    wanted.extend_from_slice(super::kernels::MODULES);
    wanted.extend_from_slice(LVS_MODULES);
    for (name, bytes) in kernel.modules(&wanted)? {
        write(&modules.join("kernel").join(name), &bytes, 0o644)?;
    }
    for index in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        let from = kernel.modules_dir.join(index);
        if from.exists() {
            fs::copy(&from, modules.join(index))?;
        }
    }
    chroot(rootfs, &["depmod", &kernel.release])?;
    chroot(
        rootfs,
        &[&["systemctl", "enable", "--quiet"], ENABLED].concat(),
    )
}

/// Busybox, the disk's modules and an init that switches to the disk.
fn initramfs(kernel: &Kernel) -> anyhow::Result<Vec<u8>> {
    let mut archive = image::Archive::with_busybox()?;
    archive.file("init", 0o755, include_bytes!("guest/systemd/init"));
    let mut bytes = archive.finish();
    bytes.extend(image::modules(&kernel.modules(BOOT_MODULES)?));
    Ok(bytes)
}

fn chroot(rootfs: &Path, command: &[&str]) -> anyhow::Result<()> {
    run(Command::new("chroot").arg(rootfs).args(command))
        .with_context(|| format!("`{}` in the image", command.join(" ")))
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    fs::create_dir_all(path.parent().context("a path without a parent")?)?;
    fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}
