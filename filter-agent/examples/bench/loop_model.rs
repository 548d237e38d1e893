//! What the program's classification (`filter-ebpf/src/rules.rs`) visits
//! for a frame, counted on the agent's own compiled tables: whether the
//! pair summary ends it before the five bitmap lookups, how many chunks
//! it enters and how many candidate words it ANDs. The worst-case tables
//! print it beside their timings, so a ratio can be read against the work
//! behind it. Its first match must be the reference model's, or the run
//! fails: a model that drifted from the program would explain nothing.

use anyhow::bail;
use filter_agent::{
    oracle::{
        packet::{IPPROTO_ICMP, IPPROTO_ICMPV6},
        reference::{self, Fields, Header, Parsed},
    },
    rules::{compile::RuleSet, config::Config},
};
use filter_common::{BitmapChunk, Outcome, RULES_PER_CHUNK, proto_index};

/// Per frame of a group, on average.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub(crate) struct Visits {
    /// Share of the frames the pair summary decides (no rule takes both
    /// addresses), before any bitmap lookup.
    pub(crate) ended_at_pair: f64,
    /// Chunks entered (their pair word is set).
    pub(crate) chunks: f64,
    /// Candidate words ANDed.
    pub(crate) words: f64,
}

/// One frame's walk.
#[derive(Default)]
struct Walk {
    first: Option<usize>,
    ended_at_pair: bool,
    chunks: u32,
    words: u32,
}

/// The average walk over `frames`, each checked against the reference.
pub(crate) fn visits(set: &RuleSet, config: &Config, frames: &[Vec<u8>]) -> anyhow::Result<Visits> {
    let mut total = Visits::default();
    for frame in frames {
        let Parsed::Ip(fields) = reference::parse(frame) else {
            bail!("a trace frame the model cannot read");
        };
        let walk = walk(set, &fields);
        let expected = match reference::classify(config, frame).0 {
            Outcome::Rule(rule) => Some(rule),
            _ => None,
        };
        if walk.first != expected {
            bail!(
                "the loop model says {:?}, the reference {expected:?}",
                walk.first
            );
        }
        total.ended_at_pair += f64::from(u8::from(walk.ended_at_pair));
        total.chunks += f64::from(walk.chunks);
        total.words += f64::from(walk.words);
    }
    let count = frames.len().max(1) as f64;
    Ok(Visits {
        ended_at_pair: total.ended_at_pair / count,
        chunks: total.chunks / count,
        words: total.words / count,
    })
}

/// The program's loop, step for step.
fn walk(set: &RuleSet, fields: &Fields) -> Walk {
    let classes = classes(set, fields);
    let [src, dst, ..] = classes;
    let pair = set.pairs.entry(src, dst).chunks;
    if pair.iter().all(|&word| word == 0) {
        return Walk {
            ended_at_pair: true,
            ..Walk::default()
        };
    }
    let chunks = set.chunks as usize;
    let dims = [
        &set.src.bitmaps,
        &set.dst.bitmaps,
        &set.proto.bitmaps,
        &set.sport.bitmaps,
        &set.dport.bitmaps,
    ];
    let mut walk = Walk::default();
    for chunk in (0..chunks).filter(|&chunk| pair[chunk] != 0) {
        walk.chunks += 1;
        let bits: Vec<&BitmapChunk> = dims
            .iter()
            .zip(classes)
            .map(|(bitmaps, class)| &bitmaps[class as usize * chunks + chunk])
            .collect();
        let mut candidates = bits.iter().fold(pair[chunk], |all, b| all & b.summary);
        while candidates != 0 {
            let word = candidates.trailing_zeros() as usize;
            walk.words += 1;
            let hits = bits.iter().fold(u64::MAX, |all, b| all & b.words[word]);
            if hits != 0 {
                let rule = chunk * RULES_PER_CHUNK as usize + word * 64;
                walk.first = Some(rule + hits.trailing_zeros() as usize);
                return walk;
            }
            candidates &= candidates - 1;
        }
    }
    walk
}

/// The five classes, as the program looks them up (`filter-ebpf/src/parse.rs`
/// fills the fields: ICMP type and code ride in the ports; a non-first
/// fragment, or ICMP of the other family, has no L4 header).
fn classes(set: &RuleSet, fields: &Fields) -> [u32; 5] {
    let icmp = [IPPROTO_ICMP, IPPROTO_ICMPV6].contains(&fields.proto);
    let (sport, dport, flags, has_l4) = match fields.header {
        Header::Tcp {
            sport,
            dport,
            flags,
        } => (sport, dport, flags, true),
        Header::Udp { sport, dport } => (sport, dport, 0, true),
        Header::Icmp { icmp_type, code } => (icmp_type.into(), code.into(), 0, true),
        Header::None => (0, 0, 0, !fields.fragment && !icmp),
    };
    [
        set.src.trie.lookup(fields.src),
        set.dst.trie.lookup(fields.dst),
        set.proto.table[proto_index(fields.proto, has_l4, flags) as usize],
        set.sport.table[usize::from(sport)],
        set.dport.table[usize::from(dport)],
    ]
}
