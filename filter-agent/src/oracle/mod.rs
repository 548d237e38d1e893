//! The oracle, apart from the data path: a reference model of the XDP
//! program ([`reference`], its rate limits in [`buckets`]), test frames built from descriptions
//! ([`packet`]) and frames read from captures ([`pcap`]). `test`,
//! `replay`, the session check and the differential tests decide packets
//! with it; the kernel layer never uses it.

pub mod buckets;
pub mod packet;
pub mod pcap;
pub mod reference;
