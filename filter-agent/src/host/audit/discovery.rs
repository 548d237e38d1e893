//! Finding every network namespace (/proc, `ip netns`, Docker) and
//! reading inside each: the port sysctls, the NAT rules and conntrack.
//! All the audit's I/O but the notrack check's is here.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread,
};

use super::{
    Conntrack, Namespace, Runtime, containers,
    parse::{conntrack_stat, nat_rules, parse_range},
};

/// Directories where tools keep named network namespaces.
const NAMED_NETNS_DIRS: [&str; 3] = ["/run/netns", "/var/run/netns", "/run/docker/netns"];

/// Every network namespace on the host, found through /proc/*/ns/net and
/// the directories where `ip netns` and Docker keep named ones.
pub fn discover() -> Vec<Namespace> {
    let own = fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let mut found: BTreeMap<u64, Namespace> = BTreeMap::new();
    for dir in NAMED_NETNS_DIRS {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = fs::metadata(entry.path()) else {
                continue;
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            let name = if dir.contains("docker") {
                format!("docker:{name}")
            } else {
                name
            };
            let ns = entry_for(&mut found, own, meta.ino());
            if !ns.names.contains(&name) {
                ns.names.push(name);
            }
        }
    }
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let Ok(meta) = fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        let ns = entry_for(&mut found, own, meta.ino());
        if ns.pid.is_none() {
            ns.pid = Some(pid);
            ns.process = fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|comm| comm.trim().to_owned());
        }
        if ns.container.is_none() {
            ns.container = fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .ok()
                .and_then(|cgroup| containers::from_cgroup(&cgroup));
        }
    }
    let mut namespaces: Vec<Namespace> = found.into_values().collect();
    name_docker_containers(&mut namespaces);
    namespaces
}

/// Names Docker's containers and learns their addresses from its API.
/// Without an API socket they keep the id from their cgroup; a socket that
/// does not answer is noted on each.
fn name_docker_containers(namespaces: &mut [Namespace]) {
    let docker: Vec<&mut Namespace> = namespaces
        .iter_mut()
        .filter(|ns| {
            ns.container
                .as_ref()
                .is_some_and(|container| container.runtime == Runtime::Docker)
        })
        .collect();
    let Some(socket) = containers::docker_socket().filter(|_| !docker.is_empty()) else {
        return;
    };
    if !Path::new(&socket).exists() {
        return;
    }
    match containers::docker_containers(Path::new(&socket)) {
        Ok(listed) => {
            for container in docker.into_iter().filter_map(|ns| ns.container.as_mut()) {
                if let Some(entry) = listed.iter().find(|entry| entry.is(container)) {
                    entry.describe(container);
                }
            }
        }
        Err(err) => {
            let note = format!("Docker's API on {socket}: {err}; named by cgroup id only");
            for ns in docker {
                ns.error = Some(note.clone());
            }
        }
    }
}

/// The entry for namespace `inode`, created on first sight; `own` is the
/// agent's namespace.
fn entry_for(found: &mut BTreeMap<u64, Namespace>, own: Option<u64>, inode: u64) -> &mut Namespace {
    found.entry(inode).or_insert_with(|| Namespace {
        inode,
        host: Some(inode) == own,
        ..Namespace::default()
    })
}

/// Reads the port sysctls and NAT rules inside `ns` (from a thread that
/// enters it, so the host's own namespace is never left).
pub fn inspect(ns: &mut Namespace) {
    let path = match (ns.names.first(), ns.pid) {
        (Some(name), _) => named_path(name),
        (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        (None, None) => return,
    };
    let result = File::open(&path).and_then(|file| {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on this short-lived thread only.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let sysctl = |name: &str| {
                        fs::read_to_string(Path::new("/proc/sys/net/ipv4").join(name))
                            .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
                    };
                    let range = sysctl("ip_local_port_range")?;
                    let reserved = sysctl("ip_local_reserved_ports")?;
                    let conntrack = read_conntrack();
                    // Child processes start in this thread's namespace.
                    let ruleset = Command::new("nft")
                        .args(["list", "ruleset"])
                        .output()
                        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
                    Ok((range, reserved, ruleset, conntrack))
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("audit thread panicked")))
        })
    });
    match result {
        Ok((range, reserved, ruleset, conntrack)) => {
            ns.conntrack = conntrack;
            ns.port_range = parse_range(&range);
            ns.reserved_ports = Some(reserved).filter(|r| !r.is_empty());
            match ruleset {
                Ok(ruleset) => ns.nat = nat_rules(&ruleset),
                Err(err) => ns.error = Some(format!("cannot run nft: {err}")),
            }
        }
        Err(err) => ns.error = Some(format!("cannot enter {}: {err}", path.display())),
    }
}

/// The calling thread's namespace's conntrack table, if conntrack runs
/// there. The maximum is global; namespaces other than the first may show
/// it only under /proc/sys/net/nf_conntrack_max.
fn read_conntrack() -> Option<Conntrack> {
    let number = |path: &str| fs::read_to_string(path).ok()?.trim().parse::<u64>().ok();
    let entries = number("/proc/sys/net/netfilter/nf_conntrack_count")?;
    let max = number("/proc/sys/net/netfilter/nf_conntrack_max")
        .or_else(|| number("/proc/sys/net/nf_conntrack_max"))?;
    let stat = fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack").unwrap_or_default();
    Some(Conntrack {
        entries,
        max,
        ..conntrack_stat(&stat)
    })
}

fn named_path(name: &str) -> PathBuf {
    match name.strip_prefix("docker:") {
        Some(docker) => Path::new("/run/docker/netns").join(docker),
        None => Path::new("/run/netns").join(name),
    }
}
