//! The image under the real Docker engine, run as the DaemonSet in
//! packaging/kubernetes runs it: the options of `docker run` are read from
//! the manifest (host network and PID namespace, the capabilities added
//! and dropped, every volume mount, command and args with Kubernetes'
//! `$(VAR)` expansion), not written again here. The engine is testbed's,
//! in a namespace of its own, so the pod's "host network" is a throwaway
//! namespace joined by veth to a peer. Checked from outside: the filter
//! attaches, allowed traffic answers and denied does not, /metrics counts
//! it, a ConfigMap-style update of the mounted rules is reloaded, and once
//! the container stops the filter stays (fail-static), as the docs say.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use serde::Deserialize as _;
use serde_json::Value;
use testbed::{Chain, Netns, docker::Docker, traffic, within};

use crate::util::workspace_root;

const WAIT: Duration = Duration::from_secs(30);
const ALLOWED: u16 = 8080;
const OPENED_BY_RELOAD: u16 = 9000;
const DENIED: u16 = 7000;

/// Loads `image` and runs the checks; returns what was seen.
pub fn test(image: &Path) -> anyhow::Result<String> {
    let container = pod_container()?;
    let chain = Chain::create("img", &["node", "peer"])?;
    let (node, peer) = (chain.client(), chain.server());
    let iface = chain.left_if(0);
    let node_ip = chain.client_addr();
    let docker = Docker::start(node, "10.214.0.1/24")?;
    let loaded = docker.cli(&["load", "--input", &image.display().to_string()])?;
    let loaded = String::from_utf8_lossy(&loaded.stdout).into_owned();
    let wanted = container["image"].as_str().unwrap_or_default();
    ensure!(
        loaded.contains(&format!("Loaded image: {wanted}")),
        "`docker load` did not load the DaemonSet's image {wanted}: {loaded}"
    );
    let config = ConfigMap::new(&iface)?;
    let _responders = [ALLOWED, OPENED_BY_RELOAD, DENIED]
        .map(|port| traffic::Responder::start(node, port))
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    // Whatever happens below, the filter goes: it outlives the container.
    let _detach = Detach {
        node,
        iface: &iface,
    };
    let env = |name: &str| match name {
        "FILTER_AGENT_IFACES" => Some(iface.clone()),
        "NODE_IP" => Some(node_ip.to_string()),
        _ => None,
    };
    let mut args = vec!["run".to_owned(), "--detach".to_owned()];
    args.extend(run_options(&container, &config.dir, &env)?);
    let (id, unknown) = run_container(&docker, args)?;
    let seen = checks(&docker, &id, [node, peer], node_ip, &config).map(|seen| {
        if unknown.is_empty() {
            seen
        } else {
            format!(
                "{seen}; this Docker does not know {} (kubelet's containerd does): run without, \
                 CAP_SYS_ADMIN covers them",
                unknown.join(", ")
            )
        }
    });
    let logs = docker.cli(&["logs", &id]).map(|out| {
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    });
    seen.with_context(|| format!("the container's log:\n{}", logs.unwrap_or_default()))
}

/// `docker run` with `args`; returns the container's id and the
/// capabilities left out because the engine does not know them (Debian
/// 12's Docker 20.10 predates CAP_BPF and CAP_PERFMON, Linux 5.8's).
fn run_container(docker: &Docker, mut args: Vec<String>) -> anyhow::Result<(String, Vec<String>)> {
    let mut unknown = Vec::new();
    loop {
        match docker.cli(&args.iter().map(String::as_str).collect::<Vec<_>>()) {
            Ok(id) => {
                return Ok((
                    String::from_utf8_lossy(&id.stdout).trim().to_owned(),
                    unknown,
                ));
            }
            Err(err) => {
                let text = err.to_string();
                let cap = text
                    .split_once("unknown capability: \"")
                    .and_then(|(_, rest)| rest.split('"').next())
                    .map(str::to_owned);
                let at = cap.as_ref().and_then(|cap| {
                    let name = cap.trim_start_matches("CAP_");
                    args.windows(2)
                        .position(|pair| pair[0] == "--cap-add" && pair[1] == name)
                });
                let (Some(cap), Some(at)) = (cap, at) else {
                    return Err(err.into());
                };
                args.drain(at..at + 2);
                unknown.push(cap);
            }
        }
    }
}

/// The checks on the running container `id`.
fn checks(
    docker: &Docker,
    id: &str,
    [node, peer]: [&Netns; 2],
    node_ip: Ipv4Addr,
    config: &ConfigMap,
) -> anyhow::Result<String> {
    let to = |port| SocketAddr::from((node_ip, port));
    let metrics = format!("{node_ip}:9469");
    let mut page = String::new();
    let counted = within(WAIT, || {
        let _ = traffic::tcp_exchange(peer, to(ALLOWED), None);
        // From the node itself: the rules do not open 9469 to the peer.
        page = traffic::http_get(node, &metrics, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default();
        page.lines().any(|line| {
            line.starts_with("filter_agent_rule_packets_total{")
                && line.contains("rule=\"web\"")
                && !line.ends_with(" 0")
        })
    });
    ensure!(
        counted,
        "/metrics on {metrics} never counted the web rule:\n{page}"
    );
    ensure!(
        !traffic::tcp_exchange(peer, to(OPENED_BY_RELOAD), None)?,
        "port {OPENED_BY_RELOAD} answered before the reload opened it"
    );
    config.update(&rules(&format!("[{ALLOWED}, {OPENED_BY_RELOAD}]")))?;
    let reloaded = within(WAIT, || {
        traffic::tcp_exchange(peer, to(OPENED_BY_RELOAD), None).unwrap_or(false)
    });
    ensure!(
        reloaded,
        "the ConfigMap update never opened port {OPENED_BY_RELOAD}"
    );
    docker.cli(&["stop", id])?;
    let pins = Path::new("/sys/fs/bpf/filter-agent").join(&config.iface);
    ensure!(
        pins.join("xdp_link").exists(),
        "{} is gone after the stop",
        pins.display()
    );
    ensure!(
        !traffic::tcp_exchange(peer, to(DENIED), None)?,
        "with the container stopped, port {DENIED} answers"
    );
    ensure!(
        traffic::tcp_exchange(peer, to(OPENED_BY_RELOAD), None)?,
        "with the container stopped, the reloaded rules are not in force"
    );
    Ok(format!(
        "loaded, attached to {}, :{ALLOWED} answered and counted on /metrics, ConfigMap update \
         opened :{OPENED_BY_RELOAD}; stopped: pins and rules stay, :{DENIED} still denied",
        config.iface
    ))
}

/// The DaemonSet's one container, from the manifest.
fn pod_container() -> anyhow::Result<Value> {
    let path = workspace_root().join("packaging/kubernetes/filter-agent.yaml");
    let text = fs::read_to_string(&path)?;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let document = Value::deserialize(document)?;
        if document["kind"] == "DaemonSet" {
            let pod = &document["spec"]["template"]["spec"];
            let mut container = pod["containers"][0].clone();
            // The pod's own settings travel with the container here.
            container["hostNetwork"] = pod["hostNetwork"].clone();
            container["hostPID"] = pod["hostPID"].clone();
            container["volumes"] = pod["volumes"].clone();
            return Ok(container);
        }
    }
    bail!("no DaemonSet in {}", path.display())
}

/// `docker run` options for `container`: the ConfigMap volume is
/// `config_dir`, hostPath volumes are the host's paths, `env` gives the
/// values Kubernetes would put in the container's environment.
fn run_options(
    container: &Value,
    config_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Vec<String>> {
    let mut options = Vec::new();
    let mut push = |option: &str, value: String| {
        options.push(option.to_owned());
        options.push(value);
    };
    if container["hostNetwork"] == true {
        push("--network", "host".into());
    }
    if container["hostPID"] == true {
        push("--pid", "host".into());
    }
    let security = &container["securityContext"];
    ensure!(
        security["privileged"] != true,
        "the DaemonSet asks for a privileged container"
    );
    // Kubernetes runs containers without a seccomp profile unless asked to.
    push("--security-opt", "seccomp=unconfined".into());
    for cap in list(&security["capabilities"]["drop"]) {
        push("--cap-drop", cap);
    }
    for cap in list(&security["capabilities"]["add"]) {
        push("--cap-add", cap);
    }
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = mount["name"].as_str().unwrap_or_default();
        let volume = container["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|volume| volume["name"] == name)
            .with_context(|| format!("no volume {name}"))?;
        let source = match volume["hostPath"]["path"].as_str() {
            Some(path) => {
                fs::create_dir_all(path)?;
                PathBuf::from(path)
            }
            None => config_dir.to_owned(),
        };
        let read_only = if mount["readOnly"] == true { ":ro" } else { "" };
        let target = mount["mountPath"].as_str().unwrap_or_default();
        push(
            "--volume",
            format!("{}:{target}{read_only}", source.display()),
        );
    }
    for command in list(&container["command"]) {
        push("--entrypoint", command);
    }
    options.push(container["image"].as_str().context("no image")?.to_owned());
    for arg in list(&container["args"]) {
        options.push(expand(&arg, env)?);
    }
    Ok(options)
}

fn list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.as_str().map(str::to_owned))
        .collect()
}

/// Kubernetes' `$(NAME)` expansion in args.
fn expand(arg: &str, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find(')').context("an unclosed $(")? + start;
        let name = &rest[start + 2..end];
        out.push_str(&env(name).with_context(|| format!("no value for $({name})"))?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The rules as a ConfigMap volume: `rules.toml -> ..data/rules.toml`,
/// `..data -> ..VERSION`, and an update swaps `..data` atomically.
struct ConfigMap {
    dir: PathBuf,
    iface: String,
    version: std::cell::Cell<u32>,
}

/// Rules that allow TCP to `ports` (a TOML value) and deny the rest.
fn rules(ports: &str) -> String {
    format!(
        "[filter]\ndefault = \"deny\"\n\n[[rule]]\nname = \"web\"\naction = \"allow\"\n\
         proto = \"tcp\"\ndport = {ports}\n"
    )
}

impl ConfigMap {
    fn new(iface: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("fa-configmap-{iface}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let config = Self {
            dir,
            iface: iface.to_owned(),
            version: std::cell::Cell::new(0),
        };
        config.update(&rules(&ALLOWED.to_string()))?;
        symlink("..data/rules.toml", config.dir.join("rules.toml"))?;
        Ok(config)
    }

    /// Writes `rules` as kubelet does: a new directory, then `..data`
    /// renamed onto a link to it.
    fn update(&self, rules: &str) -> anyhow::Result<()> {
        let version = self.version.get() + 1;
        self.version.set(version);
        let name = format!("..{version}");
        fs::create_dir(self.dir.join(&name))?;
        fs::write(self.dir.join(&name).join("rules.toml"), rules)?;
        let link = self.dir.join("..data_tmp");
        symlink(&name, &link)?;
        fs::rename(&link, self.dir.join("..data"))?;
        Ok(())
    }
}

impl Drop for ConfigMap {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Detaches the filter from the node's interface when dropped.
struct Detach<'a> {
    node: &'a Netns,
    iface: &'a str,
}

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        let agent = workspace_root().join("target/dist/bin/amd64/filter-agent");
        let _ = self.node.exec(
            &agent.display().to_string(),
            &["detach", "--iface", self.iface],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_kubernetes_variables_in_args() {
        let env = |name: &str| (name == "NODE_IP").then(|| "10.0.0.1".to_owned());
        assert_eq!(
            expand("--metrics=$(NODE_IP):9469", &env).unwrap(),
            "--metrics=10.0.0.1:9469"
        );
        assert!(expand("--iface=$(MISSING)", &env).is_err());
        assert_eq!(expand("--rules=/etc/x", &env).unwrap(), "--rules=/etc/x");
    }
}
