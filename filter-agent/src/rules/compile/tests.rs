use std::path::Path;

use super::*;
use crate::rules::config;
use filter_common::{CHILD, WIDE, proto_index};
use ipnet::{Ipv4Net, Ipv6Net};

fn compile_text(rules: &str) -> RuleSet {
    let text = format!("[filter]\ndefault = \"deny\"\n{rules}");
    compile(&config::parse(Path::new("r.toml"), &text).unwrap()).unwrap()
}

fn bits(dim_bitmaps: &[BitmapChunk], class: u32, chunks: u32) -> Vec<usize> {
    let chunks = &dim_bitmaps[(class * chunks) as usize..((class + 1) * chunks) as usize];
    let mut rules = Vec::new();
    for (c, chunk) in chunks.iter().enumerate() {
        for (w, word) in chunk.words.iter().enumerate() {
            assert_eq!(chunk.summary >> w & 1 == 1, *word != 0, "summary bit {w}");
            rules.extend(
                (0..64)
                    .filter(|b| word >> b & 1 == 1)
                    .map(|b| c * 4096 + w * 64 + b),
            );
        }
    }
    rules
}

#[test]
fn ports_get_classes_per_interval() {
    let set = compile_text(
        "[[rule]]\nname = \"ssh\"\naction = \"allow\"\nproto = \"tcp\"\ndport = 22\n\
         [[rule]]\nname = \"high\"\naction = \"allow\"\nproto = \"udp\"\ndport = \"1024-65535\"\n\
         [[rule]]\nname = \"all\"\naction = \"deny\"\n",
    );
    // The implicit ND rule comes first.
    let names: Vec<&str> = set.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, [config::IMPLICIT_ND_RULE, "ssh", "high", "all"]);
    let class = |port: usize| set.dport.table[port];
    assert_eq!(bits(&set.dport.bitmaps, class(22), 1), [0, 1, 3]);
    assert_eq!(bits(&set.dport.bitmaps, class(1024), 1), [0, 2, 3]);
    assert_eq!(bits(&set.dport.bitmaps, class(23), 1), [0, 3]);
    assert_eq!(class(23), class(0));
    // The most common class is 0, so most table entries need no write.
    assert_eq!(class(40000), 0);
}

#[test]
fn proto_classes_respect_l4_and_flags() {
    let set = compile_text(
        "[[rule]]\nname = \"syn\"\naction = \"deny\"\nproto = \"tcp\"\ntcp_flags = \"syn,!ack\"\n\
         [[rule]]\nname = \"tcp\"\naction = \"allow\"\nproto = \"tcp\"\n",
    );
    let lookup = |proto, l4, flags| {
        bits(
            &set.proto.bitmaps,
            set.proto.table[proto_index(proto, l4, flags) as usize],
            1,
        )
    };
    assert_eq!(lookup(6, true, 0x02), [1, 2]);
    assert_eq!(lookup(6, true, 0x12), [2]);
    // A non-first fragment: only rules without L4 conditions.
    assert_eq!(lookup(6, false, 0), [2]);
    assert_eq!(lookup(58, true, 0), [0]);
    assert_eq!(lookup(17, true, 0), Vec::<usize>::new());
}

#[test]
fn address_classes_follow_longest_prefix() {
    let set = compile_text(
        "[sets]\nnets = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n\
         [[rule]]\nname = \"host\"\naction = \"allow\"\nsrc = \"10.1.2.3\"\n\
         [[rule]]\nname = \"net\"\naction = \"deny\"\nsrc = \"@nets\"\n\
         [[rule]]\nname = \"v6\"\naction = \"deny\"\ndst = \"2001:db8::1\"\n",
    );
    // Classes as the program finds them: through the trie.
    let src = |text: &str| set.src.trie.lookup(text.parse().unwrap());
    // Rules 0 (ND) and 3 (no src) match every source.
    assert_eq!(bits(&set.src.bitmaps, src("10.1.2.3"), 1), [0, 1, 2, 3]);
    assert_eq!(bits(&set.src.bitmaps, src("10.200.0.1"), 1), [0, 2, 3]);
    assert_eq!(bits(&set.src.bitmaps, src("192.0.2.1"), 1), [0, 3]);
    assert_eq!(bits(&set.src.bitmaps, src("2001:db8:5::1"), 1), [0, 2, 3]);
    assert_eq!(bits(&set.src.bitmaps, src("2001:db9::1"), 1), [0, 3]);
    // dst: only rule 3 lists one, a v6 host; v4 destinations never match it.
    let dst = |text: &str| set.dst.trie.lookup(text.parse().unwrap());
    assert_eq!(bits(&set.dst.bitmaps, dst("10.1.2.3"), 1), [0, 1, 2]);
    assert_eq!(bits(&set.dst.bitmaps, dst("2001:db8::1"), 1), [0, 1, 2, 3]);
    assert_eq!(bits(&set.dst.bitmaps, dst("2001:db8::2"), 1), [0, 1, 2]);
}

#[test]
fn trie_agrees_with_longest_prefix_match() {
    let v4: Vec<(Ipv4Net, u32)> = [
        "0.0.0.0/0",
        "10.0.0.0/7",
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/23",
        "10.1.2.128/25",
        "10.1.2.3/32",
        "10.1.200.0/21",
        "192.168.0.0/30",
    ]
    .iter()
    .zip(1..)
    .map(|(text, class)| (text.parse().unwrap(), class))
    .collect();
    let v6: Vec<(Ipv6Net, u32)> = [
        "::/0",
        "2001:db8::/32",
        "2001:db8:0:1::/64",
        "2001:db8::1/128",
        "2001:db8::/33",
        "fe80::/10",
    ]
    .iter()
    .zip(100..)
    .map(|(text, class)| (text.parse().unwrap(), class))
    .collect();
    // Wide: none, IPv4's first level (2 nodes), that and IPv6's first,
    // both IPv4 levels (then none left for IPv6), all 18 (IPv6 has one
    // node per level from 2001::/16 to the /128).
    for (allowed, wide) in [(0, 0), (2, 2), (3, 3), (4, 4), (usize::MAX, 18)] {
        let trie = AddressTrie::build(&v4, &v6, allowed);
        let named = trie
            .entries
            .iter()
            .filter(|&&e| e & (CHILD | WIDE) == CHILD | WIDE);
        assert_eq!(named.count(), wide, "wide nodes allowed: {allowed}");
        agrees_with_longest_prefix_match(&trie, &v4, &v6);
    }
}

fn agrees_with_longest_prefix_match(
    trie: &AddressTrie,
    v4: &[(Ipv4Net, u32)],
    v6: &[(Ipv6Net, u32)],
) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..20_000 {
        // Addresses near the prefixes, and random ones.
        let (addr, expected): (std::net::IpAddr, u32) = if round % 2 == 0 {
            let base = v4[(next() % v4.len() as u64) as usize].0;
            let addr = std::net::Ipv4Addr::from(
                u32::from(base.network()) ^ (next() as u32 >> (next() % 33).min(31)),
            );
            let best = v4
                .iter()
                .filter(|(n, _)| n.contains(&addr))
                .max_by_key(|(n, _)| n.prefix_len())
                .unwrap();
            (addr.into(), best.1)
        } else {
            let base = v6[(next() % v6.len() as u64) as usize].0;
            let noise = (u128::from(next()) << 64 | u128::from(next())) >> (next() % 129).min(127);
            let addr = std::net::Ipv6Addr::from(u128::from(base.network()) ^ noise);
            let best = v6
                .iter()
                .filter(|(n, _)| n.contains(&addr))
                .max_by_key(|(n, _)| n.prefix_len())
                .unwrap();
            (addr.into(), best.1)
        };
        assert_eq!(trie.lookup(addr), expected, "{addr}");
    }
}

#[test]
fn many_rules_use_several_chunks() {
    let rules: String = (0..5000)
        .map(|i| {
            format!(
                "[[rule]]\nname = \"r{i}\"\naction = \"allow\"\nproto = \"tcp\"\ndport = {}\n",
                i % 60000
            )
        })
        .collect();
    let set = compile_text(&rules);
    assert_eq!(set.chunks, 2);
    let class = set.dport.table[4500];
    assert_eq!(bits(&set.dport.bitmaps, class, 2), [0, 4501]);
    assert!(set.map_bytes() < 64 << 20);
}

#[test]
fn wide_nodes_give_way_to_the_map_limit() {
    // 1,000 /32s in as many /16s: 2,000 nodes, 2,000 KiB wide beside the
    // two roots (512 KiB) of each address field, some 160 KiB compressed.
    let nets: Vec<String> = (0..1000u32)
        .map(|i| format!("\"{}.{}.1.1\"", 1 + i / 256, i % 256))
        .collect();
    let text = |limit_mib: u32| {
        format!(
            "[filter]\ndefault = \"allow\"\nmax_map_mib = {limit_mib}\n[sets]\nhosts = [{}]\n\
             [[rule]]\nname = \"block\"\naction = \"deny\"\nsrc = \"@hosts\"\n",
            nets.join(", ")
        )
    };
    let wide_nodes = |limit_mib: u32| {
        let config =
            crate::rules::config::parse(std::path::Path::new("r.toml"), &text(limit_mib)).unwrap();
        let set = compile(&config).unwrap();
        let trie = &set.src.trie;
        let wide = trie
            .entries
            .iter()
            .filter(|&&e| e & (CHILD | WIDE) == CHILD | WIDE);
        (wide.count(), trie.nodes.len())
    };
    assert_eq!(wide_nodes(4), (2000, 0));
    assert_eq!(wide_nodes(2), (0, 2000));
}

#[test]
fn sets_beyond_the_map_limit_are_named_with_their_estimate() {
    // 30,000 /32s in as many /16s: two nodes of three runs each (2 x 68
    // bytes, 6 entries: 160 bytes a prefix), beside the two roots (512 KiB).
    let nets: Vec<String> = (0..30_000u32)
        .map(|i| format!("\"{}.{}.1.1\"", 1 + i / 256, i % 256))
        .collect();
    let text = format!(
        "[filter]\ndefault = \"allow\"\nmax_map_mib = 1\n[sets]\nwide = [{}]\n\
         [[rule]]\nname = \"block\"\naction = \"deny\"\nsrc = \"@wide\"\n",
        nets.join(", ")
    );
    let config = crate::rules::config::parse(std::path::Path::new("r.toml"), &text).unwrap();
    let err = compile(&config).unwrap_err();
    assert!(
        matches!(&err, CompileError::MapMemory { field: "src", set: Some(set), estimate_mib: 5, limit_mib: 1 } if set == "wide"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("the src prefixes (set \"wide\" the largest) need about")
    );
    let roomy = text.replace("max_map_mib = 1", "max_map_mib = 8");
    let config = crate::rules::config::parse(std::path::Path::new("r.toml"), &roomy).unwrap();
    assert!(compile(&config).unwrap().map_bytes() > 1 << 20);
}

#[test]
fn the_rule_limit_counts_the_implicit_rule() {
    let rules: String = (0..MAX_RULES - 1)
        .map(|i| {
            format!(
                "[[rule]]\nname = \"r{i}\"\naction = \"allow\"\nproto = \"tcp\"\ndport = {}\n",
                i % 60000 + 1
            )
        })
        .collect();
    let text = format!("[filter]\ndefault = \"deny\"\n{rules}");
    let config = config::parse(Path::new("r.toml"), &text).unwrap();
    assert_eq!(compile(&config).unwrap().rules.len(), MAX_RULES as usize);
}

#[test]
fn too_many_rules_is_an_error() {
    let rules: String = (0..MAX_RULES)
        .map(|i| format!("[[rule]]\nname = \"r{i}\"\naction = \"allow\"\n"))
        .collect();
    let text = format!("[filter]\ndefault = \"deny\"\n{rules}");
    let config = config::parse(Path::new("r.toml"), &text).unwrap();
    assert_eq!(
        compile(&config).unwrap_err(),
        CompileError::TooManyRules {
            count: MAX_RULES as usize + 1
        }
    );
}

#[test]
fn limited_rules_get_limit_slots_and_masks() {
    let set = compile_text(
        "[[rule]]\nname = \"web\"\naction = \"allow\"\nlimit = { rate = \"1000/s\", burst = 3 }\n\
         [[rule]]\nname = \"ssh\"\naction = \"allow\"\n\
         [[rule]]\nname = \"dns\"\naction = \"allow\"\n\
         limit = { rate = \"4/min\", burst = 2, per = \"source\", ipv4_prefix = 20, ipv6_prefix = 56 }\n",
    );
    let entries: Vec<u32> = set.action_entries().collect();
    let slot = |n: u32| n << action::LIMIT_SHIFT;
    // After the implicit ND rule: web in slot 1, ssh unlimited, dns in slot 2.
    assert_eq!(entries, [0, slot(1), 0, slot(2)]);
    let limits = set.limits();
    assert_eq!(limits.len(), 3);
    assert_eq!(limits[1].interval_ns, 1_000_000);
    assert_eq!(limits[1].tolerance_ns, 2_000_000);
    assert_eq!(limits[1].per_source, 0);
    assert_eq!(limits[2].interval_ns, 15_000_000_000);
    assert_eq!(limits[2].per_source, 1);
    // Masks as big-endian halves; IPv4 /20 keeps the IPv4-mapped prefix.
    assert_eq!(limits[2].v4_mask, [u64::MAX, 0xffff_ffff_ffff_f000]);
    assert_eq!(limits[2].v6_mask, [0xffff_ffff_ffff_ff00, 0]);
    // A 2 ms tolerance needs the precise clock; 15 s does not.
    assert_eq!(limits[1].coarse_clock, 0);
    assert_eq!(limits[2].coarse_clock, 1);
    assert!(set.has_source_limits());
}
