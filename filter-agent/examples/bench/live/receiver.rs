//! What sits on the receiving veth: filter-agent, or a do-nothing XDP
//! program and a competitor in the stack; and how many packets each has
//! counted.

use aya::programs::{Xdp, xdp::XdpMode};
use filter_agent::{
    kernel::loader::{AttachMode, Filter},
    rules::compile::compile,
};
use testbed::{Netns, Pair};

use super::{
    rulesets::{
        ipset, iptables_ipset, iptables_notrack, iptables_restore, nft, nft_linear, nft_set,
    },
    *,
};

/// What sits on the receiving veth.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Receiver {
    /// No filter: what receiving and dropping in the stack costs anyway.
    NoFilter,
    FilterAgent,
    /// filter-agent with a flood workload's per-source limited rule.
    FilterAgentLimited,
    /// One nftables rule per rule, netdev ingress hook.
    NftLinear,
    /// One nftables interval set (address lists only).
    NftSet,
    /// One iptables rule per rule, raw PREROUTING, accepted traffic NOTRACK.
    IptablesNotrack,
    /// One ipset hash:net behind one iptables raw rule (address lists only).
    Ipset,
}

impl Receiver {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::NoFilter => "no filter",
            Self::FilterAgent => "filter-agent",
            Self::FilterAgentLimited => "+ limit per source",
            Self::NftLinear => "nftables",
            Self::NftSet => "nftables set",
            Self::IptablesNotrack => "iptables NOTRACK",
            Self::Ipset => "ipset",
        }
    }
}

/// A receiver configuration in place on the receiving veth; removed on drop
/// (the namespace's deletion would remove it too, even after a panic).
pub(super) struct Installed<'a> {
    receiver: Receiver,
    netns: &'a Netns,
    iface: &'a str,
    filter: Option<Filter>,
    /// The XDP_PASS program that veth needs to accept XDP_TX frames, for
    /// every receiver except filter-agent (which is an XDP program itself).
    empty_link: Option<aya::programs::xdp::XdpLinkId>,
    empty: &'a mut Xdp,
}

impl<'a> Installed<'a> {
    pub(super) fn new(
        pair: &'a Pair,
        empty: &'a mut Xdp,
        workload: &Workload,
        receiver: Receiver,
    ) -> anyhow::Result<Self> {
        let (netns, iface) = (&pair.server, pair.server_if.as_str());
        let mut installed = Self {
            receiver,
            netns,
            iface,
            filter: None,
            empty_link: None,
            empty,
        };
        let config = match receiver {
            Receiver::FilterAgent => Some(&workload.config),
            Receiver::FilterAgentLimited => workload.limited.as_ref(),
            _ => None,
        };
        if let Some(config) = config {
            let mut filter = crate::load(&compile(config)?)?;
            netns.run(|| filter.attach(iface, AttachMode::Native))??;
            installed.filter = Some(filter);
            return Ok(installed);
        }
        let program = &mut *installed.empty;
        installed.empty_link = Some(netns.run(|| program.attach(iface, XdpMode::Driver))??);
        match receiver {
            Receiver::NoFilter | Receiver::FilterAgent | Receiver::FilterAgentLimited => {}
            Receiver::NftLinear => nft(netns, &nft_linear(&workload.config, iface)?)?,
            Receiver::NftSet => nft(netns, &nft_set(prefixes(workload)?, iface))?,
            Receiver::IptablesNotrack => {
                iptables_restore(netns, &iptables_notrack(&workload.config)?)?
            }
            Receiver::Ipset => {
                let script = ipset(prefixes(workload)?);
                netns.exec_with_input("ipset", &["-exist", "restore"], &script)?;
                iptables_restore(netns, &iptables_ipset())?;
            }
        }
        Ok(installed)
    }

    /// Packets this configuration has counted so far.
    pub(super) fn classified(&self) -> anyhow::Result<u64> {
        match self.receiver {
            Receiver::FilterAgent | Receiver::FilterAgentLimited => {
                // Every packet is counted once: by its rule, by the rule's
                // rate limit, or by a reason.
                let filter = self.filter.as_ref().context("filter not loaded")?;
                let (reasons, rules) = (filter.counters()?, filter.rule_counters()?);
                let counted: u64 = reasons.iter().chain(&rules).map(|c| c.packets).sum();
                Ok(counted + self.over_limit()?)
            }
            Receiver::NoFilter => rx_packets(self.netns, self.iface),
            Receiver::NftLinear | Receiver::NftSet => {
                let listing = self
                    .netns
                    .exec("nft", &["list", "table", "netdev", NFT_TABLE])?;
                Ok(sum_after(
                    &String::from_utf8_lossy(&listing.stdout),
                    "packets ",
                ))
            }
            Receiver::IptablesNotrack | Receiver::Ipset => {
                let saved = self
                    .netns
                    .exec("iptables-legacy-save", &["-c", "-t", "raw"])?;
                Ok(prerouting_packets(&String::from_utf8_lossy(&saved.stdout)))
            }
        }
    }

    /// Packets the rules' rate limits have dropped so far (0 for receivers
    /// other than filter-agent).
    pub(super) fn over_limit(&self) -> anyhow::Result<u64> {
        Ok(match &self.filter {
            Some(filter) => filter
                .over_limit_counters()?
                .iter()
                .map(|c| c.packets)
                .sum(),
            None => 0,
        })
    }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        if let Some(link) = self.empty_link.take() {
            let _ = self.empty.detach(link);
        }
        // Dropping the filter detaches it.
        self.filter = None;
        let _ = match self.receiver {
            Receiver::NftLinear | Receiver::NftSet => self
                .netns
                .exec("nft", &["delete", "table", "netdev", NFT_TABLE])
                .map(drop),
            Receiver::IptablesNotrack | Receiver::Ipset => {
                let _ = self.netns.exec("iptables-legacy", &["-t", "raw", "-F"]);
                let _ = self.netns.exec("iptables-legacy", &["-t", "raw", "-X"]);
                self.netns
                    .exec("ipset", &["-exist", "destroy", IPSET_NAME])
                    .map(drop)
            }
            Receiver::NoFilter | Receiver::FilterAgent | Receiver::FilterAgentLimited => Ok(()),
        };
    }
}

fn prefixes(workload: &Workload) -> anyhow::Result<&[IpNet]> {
    workload
        .prefixes
        .as_deref()
        .context("sets hold address lists only")
}

/// Packets received by `iface` (the kernel's interface statistics).
fn rx_packets(netns: &Netns, iface: &str) -> anyhow::Result<u64> {
    let output = netns.ip(&["-s", "-j", "link", "show", "dev", iface])?;
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    stats[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx packet count in `ip -s -j link`")
}

/// The sum of the numbers that follow each `marker` in `text`.
fn sum_after(text: &str, marker: &str) -> u64 {
    text.split(marker)
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Packets counted by raw PREROUTING's rules and policy, from
/// `iptables-save -c`: `[packets:bytes]` on every rule and the policy line.
fn prerouting_packets(saved: &str) -> u64 {
    saved
        .lines()
        .filter(|line| line.contains("PREROUTING"))
        .filter_map(|line| {
            let counters = line.split('[').nth(1)?.split(':').next()?;
            counters.parse::<u64>().ok()
        })
        .sum()
}
