//! Which container a network namespace belongs to: the runtime and id
//! from a process's cgroup path (every runtime names its cgroups its own
//! way), the name and addresses from Docker's API when its socket answers.

use std::{
    io::{self, Read as _, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Where Docker's CLI looks when `DOCKER_HOST` is not set.
const DEFAULT_DOCKER_SOCKET: &str = "/run/docker.sock";
/// How long the API may take to answer; the audit does not wait on it.
const API_TIMEOUT: Duration = Duration::from_secs(2);
/// More than the container list of any host; a larger answer is refused.
const API_MAX_BYTES: u64 = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    Docker,
    Podman,
    /// A pod's container (containerd or CRI-O under kubelet).
    Kubernetes,
    SystemdNspawn,
    /// Incus, LXD or LXC.
    Incus,
    /// A 64-hex-digit cgroup id no other case claimed (containerd, runc).
    Oci,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
            Self::Kubernetes => "kubernetes",
            Self::SystemdNspawn => "systemd-nspawn",
            Self::Incus => "incus",
            Self::Oci => "oci",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Container {
    pub runtime: Runtime,
    /// The short id (12 hex digits) of OCI containers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The name the runtime knows it by: the machine or instance name
    /// from the cgroup path, a Docker container's from the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its IPv4 addresses, from Docker's API.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Ipv4Addr>,
}

impl Container {
    fn new(runtime: Runtime, id: Option<&str>, name: Option<String>) -> Self {
        Self {
            runtime,
            id: id.map(|id| id[..12].to_owned()),
            name,
            addresses: Vec::new(),
        }
    }

    /// "docker web (0123456789ab)", "systemd-nspawn build".
    pub fn label(&self) -> String {
        let runtime = self.runtime.name();
        match (&self.name, &self.id) {
            (Some(name), Some(id)) => format!("{runtime} {name} ({id})"),
            (Some(one), None) | (None, Some(one)) => format!("{runtime} {one}"),
            (None, None) => runtime.to_owned(),
        }
    }
}

/// The container whose cgroup path is in `cgroup` (a `/proc/PID/cgroup`
/// file), if any.
pub fn from_cgroup(cgroup: &str) -> Option<Container> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        let segments: Vec<&str> = path.split('/').collect();
        let id = segments.iter().find_map(|segment| hex_id(segment));
        let kubernetes = segments.iter().any(|s| s.starts_with("kubepods"));
        segments.iter().enumerate().find_map(|(at, segment)| {
            let parent = at.checked_sub(1).map(|parent| segments[parent]);
            let unit =
                |prefix: &str, suffix: &str| segment.strip_prefix(prefix)?.strip_suffix(suffix);
            if kubernetes {
                return id.map(|id| Container::new(Runtime::Kubernetes, Some(id), None));
            }
            if let Some(name) = unit("systemd-nspawn@", ".service").or(unit("machine-", ".scope")) {
                return Some(Container::new(
                    Runtime::SystemdNspawn,
                    None,
                    Some(unescape(name)),
                ));
            }
            if let Some(name) = segment.strip_prefix("lxc.payload.") {
                return Some(Container::new(Runtime::Incus, None, Some(name.to_owned())));
            }
            let id = hex_id(segment)?;
            let runtime = match (segment.split_once('-').map(|(kind, _)| kind), parent) {
                (Some("docker"), _) | (None, Some("docker")) => Runtime::Docker,
                (Some("libpod"), _) | (None, Some("libpod_parent")) => Runtime::Podman,
                _ => Runtime::Oci,
            };
            Some(Container::new(runtime, Some(id), None))
        })
    })
}

/// The 64-hex-digit id in `docker-ID.scope`, `libpod-ID.scope` or `ID`.
fn hex_id(segment: &str) -> Option<&str> {
    let stem = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = stem.rsplit('-').next()?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// systemd escapes `-` in unit names as `\x2d`.
fn unescape(name: &str) -> String {
    name.replace("\\x2d", "-")
}

/// The socket `DOCKER_HOST` names (`unix://PATH`), as for Docker's CLI,
/// or the default one.
pub fn docker_socket() -> Option<String> {
    match std::env::var("DOCKER_HOST") {
        Ok(host) => host.strip_prefix("unix://").map(str::to_owned),
        Err(_) => Some(DEFAULT_DOCKER_SOCKET.to_owned()),
    }
}

/// One entry of `GET /containers/json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DockerContainer {
    pub id: String,
    pub names: Vec<String>,
    #[serde(default)]
    network_settings: Option<NetworkSettings>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NetworkSettings {
    #[serde(default)]
    networks: std::collections::BTreeMap<String, Endpoint>,
}

#[derive(Debug, Deserialize)]
struct Endpoint {
    #[serde(rename = "IPAddress", default)]
    ip_address: String,
}

impl DockerContainer {
    /// Whether this entry is `container` (a Docker container whose short
    /// id starts this one's).
    pub fn is(&self, container: &Container) -> bool {
        container.runtime == Runtime::Docker
            && container
                .id
                .as_ref()
                .is_some_and(|id| self.id.starts_with(id.as_str()))
    }

    /// Fills in what the API knows of `container`.
    pub fn describe(&self, container: &mut Container) {
        container.name = self
            .names
            .first()
            .map(|name| name.trim_start_matches('/').to_owned());
        container.addresses = self
            .network_settings
            .iter()
            .flat_map(|settings| settings.networks.values())
            .filter_map(|endpoint| endpoint.ip_address.parse().ok())
            .collect();
    }
}

/// The running containers, from Docker's API on `socket`: one HTTP/1.0
/// request (the server closes the connection after its answer, so there is
/// no chunking or keep-alive to handle), bounded in time and size.
pub fn docker_containers(socket: &Path) -> io::Result<Vec<DockerContainer>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(API_TIMEOUT))?;
    stream.set_write_timeout(Some(API_TIMEOUT))?;
    stream.write_all(b"GET /containers/json HTTP/1.0\r\nHost: docker\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.take(API_MAX_BYTES).read_to_end(&mut answer)?;
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let split = answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| invalid("no HTTP header in the answer"))?;
    let status = String::from_utf8_lossy(&answer[..split]);
    let status = status.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(invalid(&format!("answered {status:?}")));
    }
    serde_json::from_slice(&answer[split + 4..]).map_err(|err| invalid(&err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtimes_from_cgroup_paths() {
        let id = "4f8e2c0a".repeat(8);
        let cases = [
            (
                format!("0::/system.slice/docker-{id}.scope\n"),
                "docker 4f8e2c0a4f8e",
            ),
            (
                format!("12:pids:/docker/{id}\n0::/docker/{id}\n"),
                "docker 4f8e2c0a4f8e",
            ),
            (
                format!("0::/machine.slice/libpod-{id}.scope/container\n"),
                "podman 4f8e2c0a4f8e",
            ),
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/pod1/cri-containerd-{id}.scope\n"
                ),
                "kubernetes 4f8e2c0a4f8e",
            ),
            (
                format!("0::/kubepods/burstable/pod1/docker-{id}.scope\n"),
                "kubernetes 4f8e2c0a4f8e",
            ),
            (
                "0::/machine.slice/systemd-nspawn@web\\x2d1.service/payload\n".to_owned(),
                "systemd-nspawn web-1",
            ),
            (
                "0::/machine.slice/machine-build.scope/payload\n".to_owned(),
                "systemd-nspawn build",
            ),
            ("0::/lxc.payload.db/init.scope\n".to_owned(), "incus db"),
            (
                format!("0::/system.slice/containerd.service/default/{id}\n"),
                "oci 4f8e2c0a4f8e",
            ),
        ];
        for (cgroup, label) in cases {
            let container = from_cgroup(&cgroup).unwrap_or_else(|| panic!("nothing in {cgroup}"));
            assert_eq!(container.label(), label, "{cgroup}");
        }
        assert_eq!(from_cgroup("0::/user.slice/session-1.scope\n"), None);
        assert_eq!(from_cgroup("0::/\n"), None);
    }

    #[test]
    fn the_api_names_docker_containers_by_their_id() {
        let id = "4f8e2c0a".repeat(8);
        let answer = format!(
            r#"[{{"Id":"{id}","Names":["/web"],"State":"running",
               "NetworkSettings":{{"Networks":{{"bridge":{{"IPAddress":"10.213.0.2"}}}}}}}},
               {{"Id":"{}","Names":["/other"]}}]"#,
            "0".repeat(64)
        );
        let listed: Vec<DockerContainer> = serde_json::from_str(&answer).unwrap();
        let mut container = from_cgroup(&format!("0::/docker/{id}\n")).unwrap();
        assert!(!listed[1].is(&container));
        assert!(listed[0].is(&container));
        listed[0].describe(&mut container);
        assert_eq!(container.label(), "docker web (4f8e2c0a4f8e)");
        assert_eq!(container.addresses, [Ipv4Addr::new(10, 213, 0, 2)]);
    }

    /// One answer from a socket that plays Docker's API.
    fn ask(answer: &'static [u8]) -> io::Result<Vec<DockerContainer>> {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("docker.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 256];
            let _ = stream.read(&mut request);
            stream.write_all(answer).unwrap();
        });
        let listed = docker_containers(&socket);
        server.join().unwrap();
        listed
    }

    #[test]
    fn a_bad_api_answer_is_an_error_not_a_guess() {
        let ok = ask(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n[]");
        assert!(ok.unwrap().is_empty());
        let refused = ask(b"HTTP/1.0 403 Forbidden\r\n\r\n{}").unwrap_err();
        assert!(refused.to_string().contains("403"), "{refused}");
        let garbage = ask(b"HTTP/1.0 200 OK\r\n\r\n{\"Id\": 7}").unwrap_err();
        assert_eq!(garbage.kind(), io::ErrorKind::InvalidData);
        assert!(ask(b"no header at all").is_err());
    }
}
