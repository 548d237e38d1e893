//! Country sets (`@country:XX`) from Debian's `geoip-database`: MaxMind's
//! legacy GeoIP Country files, a binary tree over the address bits whose
//! leaves are country numbers.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

/// Where Debian's package puts the files.
pub const DEFAULT_DIR: &str = "/usr/share/GeoIP";
pub const V4_FILE: &str = "GeoIP.dat";
pub const V6_FILE: &str = "GeoIPv6.dat";

/// A record at or above this is a leaf: the country number above it.
const COUNTRY_BEGIN: u32 = 16_776_960;
/// Two records of three bytes (little-endian) per tree node.
const NODE_BYTES: usize = 6;
/// The edition byte after the trailing `ff ff ff` marker.
const EDITION_COUNTRY: u8 = 1;
const EDITION_COUNTRY_V6: u8 = 12;

/// The database's country numbers, in its order (0: unknown).
const CODES: &str = concat!(
    "--APEUADAEAFAGAIALAMCWAOAQARASATAUAWAZBA",
    "BBBDBEBFBGBHBIBJBMBNBOBRBSBTBVBWBYBZCACC",
    "CDCFCGCHCICKCLCMCNCOCRCUCVCXCYCZDEDJDKDM",
    "DODZECEEEGEHERESETFIFJFKFMFOFRSXGAGBGDGE",
    "GFGHGIGLGMGNGPGQGRGSGTGUGWGYHKHMHNHRHTHU",
    "IDIEILINIOIQIRISITJMJOJPKEKGKHKIKMKNKPKR",
    "KWKYKZLALBLCLILKLRLSLTLULVLYMAMCMDMGMHMK",
    "MLMMMNMOMPMQMRMSMTMUMVMWMXMYMZNANCNENFNG",
    "NINLNONPNRNUNZOMPAPEPFPGPHPKPLPMPNPRPSPT",
    "PWPYQARERORURWSASBSCSDSESGSHSISJSKSLSMSN",
    "SOSRSTSVSYSZTCTDTFTGTHTJTKTMTNTOTLTRTTTV",
    "TWTZUAUGUMUSUYUZVAVCVEVGVIVNVUWFWSYEYTRS",
    "ZAZMMEZWA1A2O1AXGGIMJEBLMFBQSS",
);

#[derive(Debug, Error)]
pub enum GeoIpError {
    #[error("cannot read {path} (Debian: apt install geoip-database): {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
}

/// Every country's prefixes, IPv4 and IPv6, merged (adjacent ones joined).
#[derive(Debug, Default)]
pub struct Countries {
    nets: HashMap<String, Vec<IpNet>>,
}

impl Countries {
    /// Reads `GeoIP.dat` and, if present, `GeoIPv6.dat` from `dir`.
    pub fn read(dir: &Path) -> Result<Self, GeoIpError> {
        let mut countries = Countries::default();
        let v4 = dir.join(V4_FILE);
        let data = std::fs::read(&v4).map_err(|source| GeoIpError::Read {
            path: v4.clone(),
            source,
        })?;
        countries.add(&v4, &data, EDITION_COUNTRY)?;
        let v6 = dir.join(V6_FILE);
        match std::fs::read(&v6) {
            Ok(data) => countries.add(&v6, &data, EDITION_COUNTRY_V6)?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(GeoIpError::Read { path: v6, source }),
        }
        for nets in countries.nets.values_mut() {
            *nets = IpNet::aggregate(nets);
        }
        Ok(countries)
    }

    /// The prefixes of country `code` (ISO 3166 alpha-2, any case).
    pub fn get(&self, code: &str) -> Option<&[IpNet]> {
        self.nets.get(&code.to_ascii_uppercase()).map(Vec::as_slice)
    }

    /// Every country with its prefixes.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[IpNet])> {
        self.nets
            .iter()
            .map(|(code, nets)| (code.as_str(), nets.as_slice()))
    }

    fn add(&mut self, path: &Path, data: &[u8], edition: u8) -> Result<(), GeoIpError> {
        let format = |message: String| GeoIpError::Format {
            path: path.to_owned(),
            message,
        };
        if self::edition(data) != Some(edition) {
            return Err(format("not a GeoIP Country database of this family".into()));
        }
        let bits = if edition == EDITION_COUNTRY { 32 } else { 128 };
        walk(data, bits, |bits_value, len, country| {
            let Some(code) = CODES.get(2 * country as usize..2 * country as usize + 2) else {
                return;
            };
            let net = if bits == 32 {
                IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::from(bits_value as u32), len))
            } else {
                // IPv4 also appears inside the IPv6 tree (mapped and
                // compatible forms); only global unicast is IPv6 proper.
                if len < 3 || bits_value >> 125 != 1 {
                    return;
                }
                IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::from(bits_value), len))
            };
            self.nets.entry(code.to_owned()).or_default().push(net);
        })
        .map_err(format)
    }
}

/// The edition byte after the last `ff ff ff` in the file's last 23 bytes
/// (where libGeoIP looks for it).
fn edition(data: &[u8]) -> Option<u8> {
    (0..20).find_map(|back| {
        let at = data.len().checked_sub(4 + back)?;
        (data[at..at + 3] == [0xff; 3]).then(|| data[at + 3])
    })
}

/// Calls `leaf(bits, len, country)` for every leaf of the tree with a known
/// country; `bits` is the prefix in the low `width` bits. Refuses a tree
/// that points outside the file or visits more nodes than the file holds.
fn walk(data: &[u8], width: u32, mut leaf: impl FnMut(u128, u8, u32)) -> Result<(), String> {
    let nodes = data.len() / NODE_BYTES;
    let mut visited = 0usize;
    let mut stack: Vec<(u32, u128, u32)> = vec![(0, 0, 0)];
    while let Some((node, prefix, depth)) = stack.pop() {
        visited += 1;
        if node as usize >= nodes || visited > nodes {
            return Err(format!("tree node {node} is not in the file"));
        }
        let at = node as usize * NODE_BYTES;
        for branch in 0..2u32 {
            let bytes = &data[at + 3 * branch as usize..at + 3 * branch as usize + 3];
            let record = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], 0]);
            let prefix = prefix | u128::from(branch) << (width - 1 - depth);
            if record >= COUNTRY_BEGIN {
                let country = record - COUNTRY_BEGIN;
                if country != 0 {
                    leaf(prefix, (depth + 1) as u8, country);
                }
            } else if depth + 1 >= width {
                return Err(format!("tree deeper than {width} bits"));
            } else {
                stack.push((record, prefix, depth + 1));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A tree by hand: 0.0.0.0/1 is DE (56), 128.0.0.0/2 US (225),
    /// 192.0.0.0/2 unknown.
    pub(in crate::rules::config) fn tiny() -> Vec<u8> {
        let record = |value: u32| value.to_le_bytes()[..3].to_vec();
        let mut data = Vec::new();
        data.extend(record(COUNTRY_BEGIN + 56));
        data.extend(record(1));
        data.extend(record(COUNTRY_BEGIN + 225));
        data.extend(record(COUNTRY_BEGIN));
        data.extend([0, 0, 0, 0xff, 0xff, 0xff, EDITION_COUNTRY]);
        data
    }

    #[test]
    fn codes_are_pairs_in_database_order() {
        assert_eq!(CODES.len() % 2, 0);
        assert_eq!(&CODES[2 * 56..2 * 56 + 2], "DE");
        assert_eq!(&CODES[2 * 225..2 * 225 + 2], "US");
        assert_eq!(CODES.len() / 2, 255);
    }

    #[test]
    fn leaves_become_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(V4_FILE), tiny()).unwrap();
        let countries = Countries::read(dir.path()).unwrap();
        assert_eq!(
            countries.get("de").unwrap(),
            ["0.0.0.0/1".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            countries.get("US").unwrap(),
            ["128.0.0.0/2".parse::<IpNet>().unwrap()]
        );
        assert_eq!(countries.iter().count(), 2);
    }

    #[test]
    fn broken_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = tiny();
        data[3] = 7; // node 0's right branch points past the end
        std::fs::write(dir.path().join(V4_FILE), &data).unwrap();
        let err = Countries::read(dir.path()).unwrap_err().to_string();
        assert!(err.ends_with("tree node 7 is not in the file"), "{err}");
        let last = data.len() - 1;
        data[last] = EDITION_COUNTRY_V6;
        std::fs::write(dir.path().join(V4_FILE), &data).unwrap();
        let err = Countries::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a GeoIP Country database"), "{err}");
        let err = Countries::read(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("apt install geoip-database"), "{err}");
    }
}
