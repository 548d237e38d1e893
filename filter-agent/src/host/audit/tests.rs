use super::{findings::conntrack_finding, parse::*, *};

const RULESET: &str = r#"table ip nat {
	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "eth0" counter packets 0 bytes 0 masquerade
		ip saddr 10.1.0.0/16 meta l4proto tcp counter packets 0 bytes 0 masquerade to :32768-60999
		ip saddr 10.2.0.0/16 meta l4proto udp snat to 192.0.2.1:1024-65535
	}
}
"#;

/// What `nft list ruleset` shows of dockerd's NAT (through
/// iptables-nft), once with the audit's fix inserted ahead of it.
const DOCKER: &str = r#"table ip nat {
	chain DOCKER {
		iifname "docker0" counter packets 0 bytes 0 return
	}

	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		oifname != "docker0" ip saddr 10.213.0.0/24 counter packets 0 bytes 0 masquerade
	}
}
"#;
const DOCKER_PINNED: &str = r#"table ip nat {
	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		oifname != "docker0" meta l4proto udp ip saddr 10.213.0.0/24 counter packets 0 bytes 0 masquerade to :49152-65535
		oifname != "docker0" meta l4proto tcp ip saddr 10.213.0.0/24 counter packets 0 bytes 0 masquerade to :49152-65535
		oifname != "docker0" ip saddr 10.213.0.0/24 counter packets 0 bytes 0 masquerade
	}
}
"#;

fn judged(namespaces: &mut [Namespace], range: (u16, u16)) -> Vec<Vec<Finding>> {
    judge(namespaces, range);
    namespaces.iter().map(|ns| ns.findings.clone()).collect()
}

#[test]
fn finds_nat_rules_and_their_port_ranges() {
    let rules = nat_rules(RULESET);
    let ports: Vec<_> = rules.iter().map(|rule| rule.ports).collect();
    assert_eq!(ports, vec![None, Some((32768, 60999)), Some((1024, 65535))]);
    assert!(rules[0].rule.starts_with("oifname \"eth0\""));
    assert_eq!(rules[1].chain, "ip nat POSTROUTING");
    assert_eq!(rules[2].protocol.as_deref(), Some("udp"));
    assert!(rules.iter().all(|rule| rule.docker_bridge.is_none()));
    assert!(nat_rules("table inet filter {\n}\n").is_empty());

    let docker = nat_rules(DOCKER);
    assert_eq!(docker.len(), 1);
    assert_eq!(docker[0].docker_bridge.as_deref(), Some("docker0"));
    assert_eq!(docker[0].source, Some("10.213.0.0/24".parse().unwrap()));
}

#[test]
fn flags_ranges_and_nat_outside_the_guard() {
    let mut namespaces = [Namespace {
        inode: 7,
        names: vec!["blue".into()],
        port_range: Some((1024, 65000)),
        nat: nat_rules(RULESET),
        ..Namespace::default()
    }];
    let found = &judged(&mut namespaces, (32768, 60999))[0];
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(found[0].problem.contains("1024-65000"));
    assert_eq!(
        found[0].fix,
        "ip netns exec blue sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\""
    );
    assert!(found[1].problem.contains("without a port range"));
    assert!(found[2].problem.contains("1024-65535"));

    let ns = &mut namespaces[0];
    ns.port_range = Some((32768, 60999));
    ns.nat.clear();
    assert!(judged(&mut namespaces, (32768, 60999))[0].is_empty());
    namespaces[0].port_range = Some((40000, 50000));
    assert!(judged(&mut namespaces, (32768, 60999))[0].is_empty());
}

fn docker_container(pid: u32, range: (u16, u16)) -> Namespace {
    let id = "4f8e2c0a".repeat(8);
    let mut container = containers::from_cgroup(&format!("0::/docker/{id}\n")).unwrap();
    container.name = Some("web".into());
    container.addresses = vec!["10.213.0.2".parse().unwrap()];
    Namespace {
        pid: Some(pid),
        container: Some(container),
        port_range: Some(range),
        ..Namespace::default()
    }
}

#[test]
fn docker_findings_speak_dockers_language() {
    let dockerd = Namespace {
        names: vec!["engine".into()],
        port_range: Some((49152, 65535)),
        nat: nat_rules(DOCKER),
        ..Namespace::default()
    };
    let mut namespaces = [dockerd, docker_container(4242, (32768, 60999))];
    let found = judged(&mut namespaces, (49152, 65535));

    let nat = &found[0][0];
    assert!(
        nat.problem.starts_with(
            "Docker's MASQUERADE for docker0 (10.213.0.0/24; docker web (4f8e2c0a4f8e))"
        ),
        "{}",
        nat.problem
    );
    assert!(nat.problem.contains("from 1024 up"));
    let pin = "ip netns exec engine iptables -t nat -I POSTROUTING -s 10.213.0.0/24 ! -o docker0 \
               -p tcp -j MASQUERADE --to-ports 49152-65535 && ip netns exec engine iptables -t nat \
               -I POSTROUTING -s 10.213.0.0/24 ! -o docker0 -p udp -j MASQUERADE --to-ports 49152-65535";
    assert_eq!(nat.fix, pin);

    let range = &found[1][0];
    assert_eq!(
        range.fix,
        "nsenter --target 4242 --net sysctl -w net.ipv4.ip_local_port_range=\"49152 65535\""
    );
    assert_eq!(
        range.keep.as_deref(),
        Some(
            "start the container with docker run --sysctl net.ipv4.ip_local_port_range=\"49152 65535\" ..."
        )
    );
    assert!(
        range
            .alternative
            .as_deref()
            .unwrap_or_default()
            .ends_with(pin)
    );
    assert!(
        namespaces[1]
            .label()
            .contains("container docker web (4f8e2c0a4f8e)")
    );

    // Docker's rule behind the pinned ones takes no TCP or UDP.
    namespaces[0].nat = nat_rules(DOCKER_PINNED);
    let pinned = judged(&mut namespaces, (49152, 65535));
    assert!(pinned[0].is_empty(), "{:#?}", pinned[0]);
    // Not pinned into a narrower range: the range, both rules, Docker's.
    assert_eq!(judged(&mut namespaces, (50000, 65535))[0].len(), 4);
}

#[test]
fn keeps_are_in_each_runtimes_form() {
    let keep = |cgroup: &str| {
        let mut namespaces = [Namespace {
            pid: Some(1),
            container: containers::from_cgroup(cgroup),
            port_range: Some((1024, 65535)),
            ..Namespace::default()
        }];
        judged(&mut namespaces, (49152, 65535))[0][0]
            .keep
            .clone()
            .unwrap_or_default()
    };
    assert!(keep("0::/lxc.payload.db/init.scope").starts_with(
        "incus config set db linux.sysctl.net.ipv4.ip_local_port_range=\"49152 65535\""
    ));
    assert!(
        keep("0::/machine.slice/systemd-nspawn@web.service")
            .starts_with("inside the machine: net.ipv4.ip_local_port_range = 49152 65535")
    );
    assert!(
        keep(&format!("0::/kubepods/pod1/{}", "a".repeat(64))).contains("securityContext.sysctls")
    );
    let host = Namespace {
        host: true,
        port_range: Some((1024, 65535)),
        ..Namespace::default()
    };
    let found = &judged(&mut [host], (49152, 65535))[0][0];
    assert!(found.fix.starts_with("sysctl -w"));
    assert!(
        found
            .keep
            .as_deref()
            .unwrap_or_default()
            .contains("/etc/sysctl.d/")
    );
}

#[test]
fn conntrack_full_or_dropping_is_flagged() {
    let stat = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
0000000f  00000000 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000001 0000001a 00000000 00000000  00000000 00000000 00000000 00000000
0000000f  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000006 00000003 00000000  00000000 00000000 00000000 00000000
";
    let counted = conntrack_stat(stat);
    assert_eq!(
        (counted.drop, counted.early_drop, counted.insert_failed),
        (32, 3, 1)
    );
    let calm = Conntrack {
        entries: 100,
        max: 512,
        ..Conntrack::default()
    };
    assert_eq!(conntrack_finding(calm), None);
    let full = conntrack_finding(Conntrack {
        entries: 500,
        ..calm
    })
    .unwrap();
    assert!(
        full.problem
            .starts_with("the conntrack table is 97% full (500 of 512 entries)")
    );
    assert_eq!(full.fix, "sysctl -w net.netfilter.nf_conntrack_max=65536");
    let dropping = conntrack_finding(Conntrack { ..counted }).unwrap();
    assert!(
        dropping
            .problem
            .contains("drop 32, early_drop 3, insert_failed 1"),
        "{}",
        dropping.problem
    );
}
