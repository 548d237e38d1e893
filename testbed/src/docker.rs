//! A Docker engine of its own (Debian's `docker.io`), for the incidents
//! that Docker's NAT causes: dockerd runs in a network namespace of the
//! caller's, so its bridge, its iptables rules and its MASQUERADE live
//! there and nowhere else; its data root, exec root and socket are in a
//! directory of its own. No registry is reachable: containers run an image
//! imported from a tar of static busybox. Dropping it removes the
//! containers, stops the engine (and the containerd it started) and
//! deletes the directory, also when a test fails.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::{
    Daemon, Netns, TestbedError,
    netns::{checked, unique_id},
    within,
};

/// The engine's CLI from the same package (another `docker` may come
/// first on PATH).
const CLI: &str = "/usr/bin/docker";
/// The image [`Docker::start`] imports: static busybox and nothing else.
pub const BUSYBOX_IMAGE: &str = "filter-agent-busybox:1";
const BUSYBOX: &str = "/bin/busybox";
/// How long dockerd may take to answer on its socket.
const START_DEADLINE: Duration = Duration::from_secs(60);

pub struct Docker {
    dir: PathBuf,
    socket: String,
    daemon: Option<Daemon>,
}

/// A running container and its network namespace, named for testbed.
pub struct Container {
    pub id: String,
    /// The container's own namespace (`ip netns attach`): dropping it
    /// removes only the name.
    pub netns: Netns,
}

impl Docker {
    /// Starts dockerd in `netns` with its default bridge on `bridge_cidr`
    /// (for example `10.213.0.1/24`), and imports [`BUSYBOX_IMAGE`].
    pub fn start(netns: &Netns, bridge_cidr: &str) -> Result<Self, TestbedError> {
        let dir = std::env::temp_dir().join(format!("fa-docker-{}", unique_id()));
        let io_error = |source| TestbedError::Spawn {
            command: format!("mkdir {}", dir.display()),
            source,
        };
        fs::create_dir_all(&dir).map_err(io_error)?;
        let socket = format!("unix://{}", dir.join("docker.sock").display());
        let mut dockerd = netns.command("dockerd");
        dockerd
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args(["--host", &socket, "--bip", bridge_cidr]);
        let mut docker = Self {
            daemon: Some(Daemon::start(dockerd, None)?),
            dir,
            socket,
        };
        if !within(START_DEADLINE, || docker.cli(&["info"]).is_ok()) {
            let log = docker.daemon.take().map(Daemon::stop).unwrap_or_default().1;
            return Err(TestbedError::Command {
                command: format!("dockerd in {}", netns.name()),
                stderr: format!(
                    "never answered on its socket within {START_DEADLINE:?}: {}",
                    log.last().cloned().unwrap_or_default()
                ),
            });
        }
        docker.import_busybox()?;
        Ok(docker)
    }

    /// Runs `docker ARGS` against this engine; fails unless it succeeds.
    pub fn cli(&self, args: &[&str]) -> Result<Output, TestbedError> {
        let mut command = Command::new(CLI);
        command.args(["--host", &self.socket]).args(args);
        checked(command, format!("docker {}", args.join(" ")))
    }

    /// The engine's address, as `DOCKER_HOST` takes it (`unix://PATH`).
    pub fn host(&self) -> &str {
        &self.socket
    }

    /// The engine's directory (data, exec root, socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `docker run -d OPTIONS IMAGE sleep`: a container that stays up,
    /// named `fa-ROLE-ID` like testbed's namespaces, and so is its
    /// namespace.
    pub fn run(&self, role: &str, options: &[&str]) -> Result<Container, TestbedError> {
        let name = format!("fa-{role}-{}", unique_id());
        let mut args = vec!["run", "--detach", "--name", &name];
        args.extend_from_slice(options);
        args.extend_from_slice(&[BUSYBOX_IMAGE, "sleep", "86400"]);
        let id = text(&self.cli(&args)?);
        let pid = text(&self.cli(&["inspect", "--format", "{{.State.Pid}}", &id])?);
        let netns = Netns::attach(&name, &pid)?;
        Ok(Container { id, netns })
    }

    /// A root filesystem of static busybox and its applets, imported.
    fn import_busybox(&self) -> Result<(), TestbedError> {
        let root = self.dir.join("busybox-root");
        let io_error = |source| TestbedError::Spawn {
            command: format!("staging {}", root.display()),
            source,
        };
        fs::create_dir_all(root.join("bin")).map_err(io_error)?;
        fs::copy(BUSYBOX, root.join("bin/busybox")).map_err(io_error)?;
        for applet in ["sh", "sleep", "nc", "cat", "sysctl", "ip"] {
            symlink("busybox", root.join("bin").join(applet)).map_err(io_error)?;
        }
        let spawn_error = |command: &str| {
            let command = command.to_owned();
            move |source| TestbedError::Spawn { command, source }
        };
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(spawn_error("tar"))?;
        let mut import = Command::new(CLI);
        import
            .args(["--host", &self.socket, "import", "-", BUSYBOX_IMAGE])
            .stdin(tar.stdout.take().expect("tar's stdout is piped"));
        let imported = checked(import, format!("docker import - {BUSYBOX_IMAGE}"));
        let _ = tar.wait();
        imported.map(drop)
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if let Ok(output) = self.cli(&["ps", "--all", "--quiet"]) {
            let ids = text(&output);
            let mut args = vec!["rm", "--force"];
            args.extend(ids.lines());
            if args.len() > 2 {
                let _ = self.cli(&args);
            }
        }
        // dockerd stops its containerd and unmounts its layers on SIGINT.
        if let Some(daemon) = self.daemon.take() {
            daemon.stop();
        }
        // What it leaves mounted anyway (the namespace file it binds for
        // host-network containers), innermost first, so the directory goes.
        for mount in mounts_below(&self.dir).iter().rev() {
            let _ = Command::new("umount").arg("--lazy").arg(mount).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Mount points at or below `dir`, in the order they were mounted.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|mount| mount.starts_with(dir))
        .collect()
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
