use std::{
    fs::File,
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TestbedError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("cannot enter network namespace {name}: {source}")]
    Enter { name: String, source: io::Error },
    #[error("socket error in network namespace {name}: {source}")]
    Socket { name: String, source: io::Error },
    #[error("not an eBPF object the tests can alter: {0}")]
    Object(String),
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self, TestbedError> {
        ip(&["netns", "add", name])?;
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Names the network namespace of process `pid` (a container's) so
    /// that it is entered like the others; dropping it removes the name
    /// only, the namespace lives as long as its processes.
    pub fn attach(name: &str, pid: &str) -> Result<Self, TestbedError> {
        ip(&["netns", "attach", name, pid])?;
        Ok(Self {
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` inside this namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output, TestbedError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside this namespace. `nsenter`
    /// rather than `ip netns exec`, which remounts /sys and so hides bpffs.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{}", self.name));
        command.arg(program);
        command
    }

    /// Runs `program ARGS` inside this namespace; fails unless it succeeds.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, TestbedError> {
        let mut command = self.command(program);
        command.args(args);
        checked(
            command,
            format!("{program} {} (in {})", args.join(" "), self.name),
        )
    }

    /// Runs `program ARGS` inside this namespace with `input` on its
    /// standard input (`nft -f -`, `iptables-restore`, ...); fails unless
    /// it succeeds.
    pub fn exec_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: &str,
    ) -> Result<Output, TestbedError> {
        let description = format!("{program} {} (in {})", args.join(" "), self.name);
        let spawn_error = |source| TestbedError::Spawn {
            command: description.clone(),
            source,
        };
        let mut child = self
            .command(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).map_err(spawn_error)?;
        }
        let output = child.wait_with_output().map_err(spawn_error)?;
        if !output.status.success() {
            return Err(TestbedError::Command {
                command: description,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(output)
    }

    /// Sets a sysctl of this namespace (`net.*` keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), TestbedError> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a thread that has entered this namespace, so sockets it
    /// opens live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, TestbedError> {
        let path = format!("/run/netns/{}", self.name);
        let enter_error = |source| TestbedError::Enter {
            name: self.name.clone(),
            source,
        };
        let file = File::open(&path).map_err(enter_error)?;
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns on this thread only; the fd is open.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(enter_error(io::Error::last_os_error()));
                    }
                    Ok(f())
                })
                .join()
                .expect("testbed thread panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth end inside it.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Two namespaces, `client` and `server`, joined by one veth pair with
/// IPv4 and IPv6 addresses on both ends.
#[derive(Debug)]
pub struct Pair {
    pub client: Netns,
    pub server: Netns,
    /// The veth end inside `client` / `server`.
    pub client_if: String,
    pub server_if: String,
}

impl Pair {
    pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
    pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
    pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xfa, 0, 0, 0, 0, 0, 1);
    pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xfa, 0, 0, 0, 0, 0, 2);

    /// Creates a pair whose names contain `tag` (a few letters), the process
    /// id and a per-process sequence number.
    pub fn create(tag: &str) -> Result<Self, TestbedError> {
        let id = unique_id();
        let client = Netns::create(&format!("fa-{tag}-{id}-c"))?;
        let server = Netns::create(&format!("fa-{tag}-{id}-s"))?;
        // Interface names are limited to 15 bytes; the id keeps them unique.
        let client_if = format!("fac{id}");
        let server_if = format!("fas{id}");
        let pair = Self {
            client,
            server,
            client_if,
            server_if,
        };
        pair.add_link()?;
        pair.wait_until_ready()?;
        Ok(pair)
    }

    /// Deletes the veth pair (both ends).
    pub fn delete_link(&self) -> Result<(), TestbedError> {
        self.server.ip(&["link", "del", &self.server_if]).map(drop)
    }

    /// Creates the veth pair with its names and addresses, as the first
    /// time or again after [`Pair::delete_link`] (as an operator or a
    /// container runtime would: new devices with new indexes).
    pub fn add_link(&self) -> Result<(), TestbedError> {
        ip(&[
            "link",
            "add",
            &self.client_if,
            "netns",
            self.client.name(),
            "type",
            "veth",
            "peer",
            "name",
            &self.server_if,
            "netns",
            self.server.name(),
        ])?;
        for (ns, dev, v4, v6) in [
            (
                &self.client,
                &self.client_if,
                Self::CLIENT_V4,
                Self::CLIENT_V6,
            ),
            (
                &self.server,
                &self.server_if,
                Self::SERVER_V4,
                Self::SERVER_V6,
            ),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        Ok(())
    }
}

impl Pair {
    /// Right after link-up, IPv6 loses packets for up to a second; wait
    /// until both families answer an echo so tests start from a working link.
    pub fn wait_until_ready(&self) -> Result<(), TestbedError> {
        const ATTEMPTS: usize = 40;
        for server in [IpAddr::from(Self::SERVER_V4), IpAddr::from(Self::SERVER_V6)] {
            let mut answered = false;
            for _ in 0..ATTEMPTS {
                if crate::traffic::icmp_echo(&self.client, server)? {
                    answered = true;
                    break;
                }
            }
            if !answered {
                return Err(TestbedError::Command {
                    command: format!("echo {server} from {}", self.client.name()),
                    stderr: "the new veth pair does not carry traffic".into(),
                });
            }
        }
        Ok(())
    }
}

/// The process id and a per-process sequence number: part of every name.
pub(crate) fn unique_id() -> String {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

pub(crate) fn ip(args: &[&str]) -> Result<Output, TestbedError> {
    let mut command = Command::new("ip");
    command.args(args);
    checked(command, format!("ip {}", args.join(" ")))
}

/// Runs `command` (described as `description`); fails unless it succeeds.
pub(crate) fn checked(mut command: Command, description: String) -> Result<Output, TestbedError> {
    let output = command.output().map_err(|source| TestbedError::Spawn {
        command: description.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(TestbedError::Command {
            command: description,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}
