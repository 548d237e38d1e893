//! Rate limits as the program keeps them: a GCRA bucket per rule, or per
//! rule and source prefix in a fixed array of hashed buckets.

/// A rule's rate limit (an entry of `LIMITS`), kept as GCRA: the bucket is
/// the time its next packet is due, so one 64-bit add takes a token and
/// every CPU shares the same bucket without a lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Nanoseconds per packet at the limit's rate.
    pub interval_ns: u64,
    /// How far ahead of now the due time may run: (burst - 1) intervals.
    pub tolerance_ns: u64,
    /// The rule-wide bucket: when the next packet is due (program state).
    pub due_ns: u64,
    /// Non-zero: one bucket per source prefix (`SOURCE_BUCKETS`): the
    /// source as the program stores addresses (IPv4-mapped for IPv4),
    /// masked with `v4_mask` or `v6_mask`, hashed with [`source_hash`].
    pub per_source: u32,
    /// Non-zero: decide with the shared clock copy refreshed at each tick
    /// (see [`COARSE_CLOCK_MIN_TOLERANCE_NS`]) instead of reading the
    /// clock for every packet.
    pub coarse_clock: u32,
    /// The prefix masks, as the two big-endian halves of a 16-byte
    /// address (IPv4-mapped for IPv4).
    pub v4_mask: [u64; 2],
    pub v6_mask: [u64; 2],
}

/// A limit whose tolerance (its burst less one, in time) is at least this
/// long may decide with a clock up to one timer tick old: the longest tick
/// is 10 ms (HZ=100), so a bucket cannot fill up within one, and a token
/// noticed a tick late is taken by a later packet instead of being lost.
pub const COARSE_CLOCK_MIN_TOLERANCE_NS: u64 = 10_000_000;

/// One per-source bucket: an entry of the `SOURCE_BUCKETS` array, which
/// has a power-of-two number of entries and is indexed by the low bits of
/// [`source_hash`] of a rule's limit slot and a masked source. `tag` is
/// the whole hash of the source it holds; a packet whose hash differs
/// takes the bucket over, full (no insert, no eviction: a fixed cost per
/// packet however many sources arrive).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceBucket {
    pub tag: u64,
    /// When the next packet of this source is due (GCRA, as `RateLimit`).
    pub due_ns: u64,
}

/// The hash that places a source in `SOURCE_BUCKETS`: the limit slot and
/// the masked source (IPv4-mapped for IPv4, as the program stores
/// addresses), keyed by a seed the agent draws at each load so that which
/// sources share a bucket cannot be chosen from outside. Two rounds of
/// MurmurHash3's 64-bit finaliser; the program and the reference model
/// both call this.
#[inline(always)]
pub fn source_hash(seed: u64, source: [u64; 2], slot: u32) -> u64 {
    let first = fmix64(seed ^ source[0] ^ ((slot as u64) << 32));
    fmix64(first ^ source[1]).wrapping_add(seed)
}

/// A 16-byte address as [`source_hash`] takes it: its big-endian halves.
pub fn address_words(addr: [u8; 16]) -> [u64; 2] {
    let value = u128::from_be_bytes(addr);
    [(value >> 64) as u64, value as u64]
}

#[inline(always)]
const fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Entries of `SOURCE_BUCKETS` for `[filter] limit_sources`: the next
/// power of two, so that a bucket's index is a mask of the hash.
pub const fn source_bucket_count(limit_sources: u32) -> u32 {
    match limit_sources.checked_next_power_of_two() {
        Some(count) => count,
        None => 1 << 31,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    /// Pairs of `sources` that share a bucket, of `buckets` (a power of two).
    fn pairs_sharing(seed: u64, buckets: u32, sources: impl Iterator<Item = [u8; 16]>) -> u64 {
        let mut per_bucket = std::vec![0u64; buckets as usize];
        for addr in sources {
            per_bucket
                [(source_hash(seed, address_words(addr), 1) as u32 & (buckets - 1)) as usize] += 1;
        }
        per_bucket
            .iter()
            .map(|&n| n * n.saturating_sub(1) / 2)
            .sum()
    }

    /// Neighbouring sources (what a prefix or a scan sends from) meet in
    /// buckets as they would under a uniform hash, for IPv4 /32s and IPv6
    /// /64s, under any seed: the pairs sharing a bucket are within four
    /// standard deviations of the Poisson(C(k, 2) / buckets) a uniform hash
    /// gives.
    #[test]
    fn neighbouring_sources_share_buckets_as_a_uniform_hash_would() {
        let buckets = source_bucket_count(65_536);
        for seed in [0, 1, 0x9e37_79b9_7f4a_7c15, u64::MAX] {
            for sources in [1_000u32, 10_000, 65_536] {
                let v4 = (0..sources).map(|i| {
                    let v4 = core::net::Ipv4Addr::from(0x0a00_0000 + i);
                    v4.to_ipv6_mapped().octets()
                });
                let v6 = (0..sources).map(|i| {
                    let prefix = 0x2001_0db8_0000_0000_u128 + u128::from(i);
                    (prefix << 64).to_be_bytes()
                });
                let k = f64::from(sources);
                let expected = k * (k - 1.0) / 2.0 / f64::from(buckets);
                for (family, pairs) in [
                    ("IPv4", pairs_sharing(seed, buckets, v4)),
                    ("IPv6", pairs_sharing(seed, buckets, v6)),
                ] {
                    assert!(
                        (pairs as f64 - expected).abs() < 4.0 * expected.sqrt() + 1.0,
                        "{family}, seed {seed:#x}, {sources} sources: {pairs} pairs share a \
                         bucket, a uniform hash {expected:.1}"
                    );
                }
            }
        }
    }

    /// The seed decides which sources meet: two seeds place the same
    /// sources differently, and one source's slots differ.
    #[test]
    fn the_seed_and_the_slot_move_a_source() {
        let addr = core::net::Ipv4Addr::new(203, 0, 113, 5)
            .to_ipv6_mapped()
            .octets();
        let addr = address_words(addr);
        assert_ne!(source_hash(1, addr, 1), source_hash(2, addr, 1));
        assert_ne!(source_hash(1, addr, 1), source_hash(1, addr, 2));
        let moved = (0..1000u32)
            .filter(|&i| {
                let addr = core::net::Ipv4Addr::from(0x0a00_0000 + i)
                    .to_ipv6_mapped()
                    .octets();
                let addr = address_words(addr);
                source_hash(1, addr, 1) & 0xffff != source_hash(2, addr, 1) & 0xffff
            })
            .count();
        assert!(moved > 990, "{moved} of 1000 moved");
    }

    #[test]
    fn bucket_counts_are_powers_of_two() {
        assert_eq!(source_bucket_count(1), 1);
        assert_eq!(source_bucket_count(3), 4);
        assert_eq!(source_bucket_count(65_536), 65_536);
        assert_eq!(source_bucket_count(u32::MAX), 1 << 31);
    }
}
