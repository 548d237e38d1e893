//! The host layer: what the agent inspects or changes on the host beside
//! its own program. [`audit`] finds what other filters and containers
//! do; [`notrack`] owns the conntrack-bypass nftables table;
//! [`privileges`] checks the process may load BPF; [`sessions`] reads
//! the established TCP sessions a rule change would cut.

pub mod audit;
pub mod notrack;
pub mod privileges;
pub mod sessions;
