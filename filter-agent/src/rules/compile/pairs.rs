//! The pair summary: for a group of source classes and a group of
//! destination classes, the 64-rule words where one rule accepts both.
//!
//! The per-field summaries say which words hold *some* rule accepting each
//! field, not one rule accepting all of them. On real rule sets (wildcards
//! in one address, a specific prefix in the other) a packet decided late or
//! by no rule then visits many words whose AND is empty. Classes are
//! numbered in address order, so neighbouring classes, grouped by a shift of
//! their number, share most of their rules and the summary stays sharp.
//!
//! Pure logic: no I/O, unit tested without root.

use filter_common::{BitmapChunk, MAX_CHUNKS, MAX_PAIR_GROUPS, PairSummary, WORDS_PER_CHUNK};

/// `PAIR_SUMMARY` and how the program finds its entry.
#[derive(Clone, Debug)]
pub struct PairTable {
    pub src_shift: u32,
    pub dst_shift: u32,
    pub dst_groups: u32,
    /// Entry `src_group * dst_groups + dst_group`.
    pub summaries: Vec<PairSummary>,
}

/// One address field's classes, grouped.
struct Grouped {
    shift: u32,
    /// Per group and chunk, the OR of its classes' words.
    words: Vec<[u64; WORDS_PER_CHUNK]>,
}

impl PairTable {
    /// From the source and destination bitmaps (`chunks` per class).
    pub fn build(src: &[BitmapChunk], dst: &[BitmapChunk], chunks: u32) -> Self {
        let chunks = chunks as usize;
        let (src, dst) = (group(src, chunks), group(dst, chunks));
        let dst_groups = dst.words.len() / chunks;
        let summaries = src
            .words
            .chunks(chunks)
            .flat_map(|src_group| {
                dst.words
                    .chunks(chunks)
                    .map(move |dst_group| summary(src_group, dst_group))
            })
            .collect();
        Self {
            src_shift: src.shift,
            dst_shift: dst.shift,
            dst_groups: dst_groups as u32,
            summaries,
        }
    }

    /// The summary the program reads for a packet in these classes.
    pub fn entry(&self, src_class: u32, dst_class: u32) -> &PairSummary {
        let group = (src_class >> self.src_shift) * self.dst_groups + (dst_class >> self.dst_shift);
        &self.summaries[group as usize]
    }
}

/// The smallest shift that leaves at most `MAX_PAIR_GROUPS` groups, and
/// each group's words.
fn group(bitmaps: &[BitmapChunk], chunks: usize) -> Grouped {
    let classes = (bitmaps.len() / chunks).max(1);
    let mut shift = 0;
    while (classes - 1) >> shift >= MAX_PAIR_GROUPS as usize {
        shift += 1;
    }
    let groups = ((classes - 1) >> shift) + 1;
    let mut words = vec![[0u64; WORDS_PER_CHUNK]; groups * chunks];
    for (index, bitmap) in bitmaps.iter().enumerate() {
        let (class, chunk) = (index / chunks, index % chunks);
        let merged = &mut words[(class >> shift) * chunks + chunk];
        for (word, bits) in merged.iter_mut().zip(&bitmap.words) {
            *word |= bits;
        }
    }
    Grouped { shift, words }
}

fn summary(src: &[[u64; WORDS_PER_CHUNK]], dst: &[[u64; WORDS_PER_CHUNK]]) -> PairSummary {
    let mut chunks = [0u64; MAX_CHUNKS as usize];
    for ((summary, src), dst) in chunks.iter_mut().zip(src).zip(dst) {
        for (word, (src, dst)) in src.iter().zip(dst).enumerate() {
            if src & dst != 0 {
                *summary |= 1 << word;
            }
        }
    }
    PairSummary { chunks }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(rules: &[usize]) -> BitmapChunk {
        let mut chunk = BitmapChunk {
            summary: 0,
            words: [0; WORDS_PER_CHUNK],
        };
        for &rule in rules {
            chunk.words[rule / 64] |= 1 << (rule % 64);
            chunk.summary |= 1 << (rule / 64);
        }
        chunk
    }

    #[test]
    fn a_word_is_kept_only_where_one_rule_takes_both_addresses() {
        // Source class 0 is matched by rules 0 and 64, destination class 0
        // by rules 1 and 64, class 1 by rule 65: both words hold rules of
        // each class, but only rule 64 (word 1) takes both, and no rule
        // takes source class 0 and destination class 1.
        let src = [bitmap(&[0, 64])];
        let dst = [bitmap(&[1, 64]), bitmap(&[65])];
        let table = PairTable::build(&src, &dst, 1);
        assert_eq!(
            (table.src_shift, table.dst_shift, table.dst_groups),
            (0, 0, 2)
        );
        assert_eq!(table.entry(0, 0).chunks[0], 0b10);
        assert_eq!(table.entry(0, 1).chunks[0], 0);
    }

    #[test]
    fn many_classes_share_groups_and_lose_no_rule() {
        // 1,000 classes, each matched by one rule of its own, 4 per group;
        // a group's 4 rules lie in 4 different words, so a group that kept
        // fewer than all its classes would lose a word.
        let rule = |class: usize| (class % 4) * 1024 + class / 4;
        let classes: Vec<BitmapChunk> = (0..1000).map(|class| bitmap(&[rule(class)])).collect();
        let every = [bitmap(&(0..1000).map(rule).collect::<Vec<_>>())];
        let table = PairTable::build(&classes, &every, 1);
        assert_eq!(table.src_shift, 2);
        assert_eq!(table.summaries.len(), 250);
        for class in 0..1000 {
            let word = rule(class) / 64;
            let summary = table.entry(class as u32, 0).chunks[0];
            assert_eq!(summary >> word & 1, 1, "class {class}");
            // The group's 4 words and no other.
            assert_eq!(summary.count_ones(), 4, "class {class}");
        }
    }
}
