//! The reference model's rate limits: the program's buckets, kept the
//! same way so that the differential test can be exact about them.

use std::{collections::HashMap, net::IpAddr};

use filter_common::{address_words, source_bucket_count, source_hash};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::rules::config::Limit;

/// Rate-limit state, as the program keeps it: a token bucket per limited
/// rule, and for per-source limits the program's array of hashed buckets
/// (see `filter_common::SourceBucket`), so that sources sharing a bucket
/// behave here exactly as there. A bucket holds up to `burst` tokens,
/// starts full, refills one token per interval (kept in nanoseconds of
/// credit, so refills are exact), and each packet that finds a whole token
/// takes it; a source whose hash differs from the bucket's takes it over,
/// full.
#[derive(Debug, Default)]
pub struct Buckets {
    /// The key of `source_hash`: the seed the program was loaded with.
    seed: u64,
    /// Limit slot -> (credit in ns, time of last update).
    rules: HashMap<u32, (u64, u64)>,
    /// `SOURCE_BUCKETS` index -> (tag, credit in ns, time of last update).
    sources: HashMap<u32, (u64, u64, u64)>,
}

impl Buckets {
    /// The state of a program loaded with the per-source hash key `seed`.
    pub fn with_seed(seed: u64) -> Self {
        Buckets {
            seed,
            ..Buckets::default()
        }
    }

    /// Takes a token for the rule whose limit is in `slot` (the program's
    /// `LIMITS` index), from a table of `source_buckets` per-source buckets.
    pub(super) fn take(
        &mut self,
        slot: u32,
        limit: &Limit,
        src: IpAddr,
        now: u64,
        source_buckets: u32,
    ) -> bool {
        let token = limit.interval_ns();
        let full = limit.burst * token;
        let (credit, last) = match limit.per_source {
            None => {
                let (credit, last) = self.rules.entry(slot).or_insert((full, now));
                (credit, last)
            }
            Some(prefixes) => {
                let tag = source_hash(self.seed, address_words(masked_source(src, prefixes)), slot);
                let index = tag as u32 & (source_bucket_count(source_buckets) - 1);
                let (held, credit, last) = self.sources.entry(index).or_insert((tag, full, now));
                if *held != tag {
                    (*held, *credit, *last) = (tag, full, now);
                }
                (credit, last)
            }
        };
        *credit = full.min(*credit + now.saturating_sub(*last));
        *last = now;
        if *credit < token {
            return false;
        }
        *credit -= token;
        true
    }
}

/// `src` under a per-source limit's prefixes, as the program stores it
/// (IPv4-mapped for IPv4).
fn masked_source(src: IpAddr, (v4, v6): (u8, u8)) -> [u8; 16] {
    match src {
        IpAddr::V4(addr) => Ipv4Net::new(addr, v4).unwrap().network().to_ipv6_mapped(),
        IpAddr::V6(addr) => Ipv6Net::new(addr, v6).unwrap().network(),
    }
    .octets()
}
