//! xdp-filter (Debian's xdp-tools), the peer timed on the same frames.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use aya::programs::Xdp;
use filter_agent::{oracle::packet, rules::config::Config};

/// xdp-filter loaded on a throwaway veth with exact-match entries taken
/// from `config` (its lookups are exact-match only), pinned so that it can
/// be test-run like our program.
pub(crate) struct XdpFilter {
    pub(crate) netns: testbed::Netns,
    pub(crate) pin: PathBuf,
    /// libxdp creates this on bpffs; removed again if it was not there.
    pub(crate) libxdp_dir_existed: bool,
}

pub(crate) const LIBXDP_DIR: &str = "/sys/fs/bpf/xdp";

impl XdpFilter {
    pub(crate) fn load(config: &Config) -> anyhow::Result<(Self, Xdp)> {
        let libxdp_dir_existed = std::path::Path::new(LIBXDP_DIR).exists();
        let netns = testbed::Netns::create(&format!("fa-bench-{}", std::process::id()))?;
        netns.ip(&["link", "add", "xf0", "type", "veth", "peer", "name", "xf1"])?;
        netns.ip(&["link", "set", "xf0", "up"])?;
        let run = |args: &[&str]| -> anyhow::Result<String> {
            // nsenter keeps our mount namespace (and so bpffs, which xdp-filter
            // needs); `ip netns exec` would remount /sys without it.
            let output = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", netns.name()))
                .arg("xdp-filter")
                .args(args)
                .output()
                .context("running xdp-filter (xdp-tools)")?;
            if !output.status.success() {
                bail!(
                    "xdp-filter {args:?}: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        };
        run(&["load", "xf0", "--mode", "skb", "--policy", "deny"])?;
        for rule in &config.rules {
            if let Some(ranges) = &rule.dport {
                let proto = if rule.proto == Some(packet::IPPROTO_UDP) {
                    "udp"
                } else {
                    "tcp"
                };
                run(&["port", &ranges[0].0.to_string(), "--proto", proto])?;
            }
            if let Some(list) = &rule.src {
                run(&["ip", &list.nets[0].addr().to_string(), "--mode", "src"])?;
            }
        }
        let id = netns
            .ip(&["-d", "link", "show", "xf0"])
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())?
            .split_whitespace()
            .skip_while(|word| *word != "id")
            .nth(1)
            .context("no XDP program id on the xdp-filter interface")?
            .to_owned();
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/fa-bench-xdp-filter-{}",
            std::process::id()
        ));
        let status = Command::new("bpftool")
            .args(["prog", "pin", "id", &id])
            .arg(&pin)
            .status()?;
        if !status.success() {
            bail!("bpftool prog pin id {id} failed");
        }
        let program = Xdp::from_pin(&pin, aya_obj::programs::XdpAttachType::Interface)?;
        Ok((
            Self {
                netns,
                pin,
                libxdp_dir_existed,
            },
            program,
        ))
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns.name()))
            .args(["xdp-filter", "unload", "--all"])
            .output();
        if !self.libxdp_dir_existed {
            // Only succeeds when empty: never removes anything else's pins.
            let _ = std::fs::remove_dir(LIBXDP_DIR);
        }
    }
}
