//! testbed's Docker engine (Debian's docker.io; needs root): a namespace,
//! bridge, MASQUERADE and directory of its own; a container of the local
//! busybox image reaches a server only through Docker's NAT; nothing of
//! the engine is left once it is dropped.

use std::{net::TcpListener, process::Command, time::Duration};

use testbed::{Chain, docker::Docker, within};

#[test]
fn an_engine_of_its_own_masquerades_its_container_and_leaves_nothing() {
    let chain = Chain::create("dk", &["host", "srv"]).unwrap();
    let (host, server) = (chain.client(), chain.server());
    let docker = Docker::start(host, "10.213.0.1/24").unwrap();
    let nat = host
        .exec("iptables", &["-t", "nat", "-S", "POSTROUTING"])
        .unwrap();
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(
        nat.contains("-A POSTROUTING -s 10.213.0.0/24 ! -o docker0 -j MASQUERADE"),
        "not Docker's own MASQUERADE in the engine's namespace:\n{nat}"
    );
    let container = docker.run("ctr", &[]).unwrap();
    let address = container
        .netns
        .ip(&["-4", "-o", "addr", "show", "eth0"])
        .unwrap();
    let address = String::from_utf8_lossy(&address.stdout);
    assert!(address.contains("inet 10.213.0."), "{address}");

    let server_addr = chain.server_addr();
    let listener = server
        .run(|| TcpListener::bind((server_addr, 9100)))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    // Detached: busybox's nc waits for the server to close.
    let connect = format!("echo hello | nc {server_addr} 9100");
    let said = docker.cli(&["exec", "--detach", &container.id, "sh", "-c", &connect]);
    let mut accepted = None;
    let arrived = within(Duration::from_secs(10), || {
        accepted = listener.accept().ok();
        accepted.is_some()
    });
    assert!(
        arrived,
        "the container's connection never reached the server: {said:?}"
    );
    let (_, peer) = accepted.unwrap();
    assert_eq!(
        peer.ip(),
        chain.client_addr(),
        "the container's connection was not masqueraded to the host's address"
    );

    let dir = docker.dir().to_owned();
    drop(container);
    drop(docker);
    assert!(!dir.exists(), "{} is left", dir.display());
    let left = Command::new("pgrep")
        .args(["-f", &dir.to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        !left.status.success(),
        "processes of the engine are left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}
