//! Namespaces in a row, each joined to the next by a veth pair, with IPv4
//! routing through the inner ones: client, host (router), [middle], server.

use std::net::{IpAddr, Ipv4Addr};

use crate::{
    Netns, TestbedError,
    netns::{ip, unique_id},
    traffic,
};

/// The bridge [`Chain::bridge`] makes.
const BRIDGE: &str = "fabr";

/// `namespaces[0]` is the client, the last one the server; the ones
/// between forward. Link `i` joins namespace `i` (`left_if(i)`, address
/// `10.210.i.1`) and `i + 1` (`right_if(i)`, `10.210.i.2`).
#[derive(Debug)]
pub struct Chain {
    pub namespaces: Vec<Netns>,
    id: String,
}

impl Chain {
    /// `roles` name the namespaces (a few letters each), at least two.
    pub fn create(tag: &str, roles: &[&str]) -> Result<Self, TestbedError> {
        let id = unique_id();
        let namespaces = roles
            .iter()
            .map(|role| Netns::create(&format!("fa-{tag}-{id}-{role}")))
            .collect::<Result<Vec<_>, _>>()?;
        let chain = Self { namespaces, id };
        let links = chain.namespaces.len() - 1;
        for link in 0..links {
            let (left, right) = (&chain.namespaces[link], &chain.namespaces[link + 1]);
            let (left_if, right_if) = (chain.left_if(link), chain.right_if(link));
            ip(&[
                "link",
                "add",
                &left_if,
                "netns",
                left.name(),
                "type",
                "veth",
                "peer",
                "name",
                &right_if,
                "netns",
                right.name(),
            ])?;
            for (ns, dev, host) in [(left, &left_if, 1), (right, &right_if, 2)] {
                ns.ip(&[
                    "addr",
                    "add",
                    &format!("{}/24", Self::address(link, host)),
                    "dev",
                    dev,
                ])?;
                ns.ip(&["link", "set", dev, "up"])?;
            }
        }
        for (index, ns) in chain.namespaces.iter().enumerate() {
            if index > 0 && index < links {
                ns.sysctl("net.ipv4.ip_forward", "1")?;
            }
            // Every subnet not attached here is reached through the
            // neighbour on its side.
            for link in 0..links {
                let via = if link + 1 < index {
                    Self::address(index - 1, 1)
                } else if link > index {
                    Self::address(index, 2)
                } else {
                    continue;
                };
                let subnet = format!("10.210.{link}.0/24");
                ns.ip(&["route", "add", &subnet, "via", &via.to_string()])?;
            }
        }
        chain.wait_until_ready()?;
        Ok(chain)
    }

    /// The address of `host` (1 = left end, 2 = right end) on link `link`.
    pub fn address(link: usize, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 210, link as u8, host)
    }

    /// The client's and the server's addresses.
    pub fn client_addr(&self) -> Ipv4Addr {
        Self::address(0, 1)
    }
    pub fn server_addr(&self) -> Ipv4Addr {
        Self::address(self.namespaces.len() - 2, 2)
    }

    pub fn client(&self) -> &Netns {
        &self.namespaces[0]
    }
    pub fn server(&self) -> &Netns {
        self.namespaces
            .last()
            .expect("a chain has two namespaces or more")
    }

    /// Makes link `link`'s subnet a bridge in its left namespace: the left
    /// end's address moves to the bridge, the link becomes a port of it,
    /// and [`Chain::join`] adds more namespaces to the subnet.
    pub fn bridge(&self, link: usize) -> Result<(), TestbedError> {
        let (ns, port) = (&self.namespaces[link], self.left_if(link));
        let address = format!("{}/24", Self::address(link, 1));
        ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ns.ip(&["addr", "del", &address, "dev", &port])?;
        ns.ip(&["link", "set", &port, "master", BRIDGE])?;
        ns.ip(&["addr", "add", &address, "dev", BRIDGE])?;
        ns.ip(&["link", "set", BRIDGE, "up"]).map(drop)
    }

    /// Joins `ns` to the bridge of link `link` ([`Chain::bridge`]) with a
    /// veth pair whose end in `ns` is `iface`, up and without address.
    pub fn join(&self, link: usize, ns: &Netns, iface: &str) -> Result<(), TestbedError> {
        let bridged = &self.namespaces[link];
        let port = format!("{iface}p");
        bridged.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            iface,
            "netns",
            ns.name(),
        ])?;
        bridged.ip(&["link", "set", &port, "master", BRIDGE, "up"])?;
        ns.ip(&["link", "set", iface, "up"]).map(drop)
    }

    /// The interface of link `link` in its left / right namespace.
    pub fn left_if(&self, link: usize) -> String {
        format!("fl{}{link}", self.id)
    }
    pub fn right_if(&self, link: usize) -> String {
        format!("fr{}{link}", self.id)
    }

    fn wait_until_ready(&self) -> Result<(), TestbedError> {
        const ATTEMPTS: usize = 40;
        let server = IpAddr::V4(self.server_addr());
        for _ in 0..ATTEMPTS {
            if traffic::icmp_echo(self.client(), server)? {
                return Ok(());
            }
        }
        Err(TestbedError::Command {
            command: format!("echo {server} from {}", self.client().name()),
            stderr: "the chain does not carry traffic".into(),
        })
    }
}
