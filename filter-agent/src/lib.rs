//! filter-agent's library: everything but the process entry point, so that
//! integration tests use the same code paths as the binary.

pub mod audit;
pub mod cli;
pub mod compile;
pub mod config;
pub mod events;
pub mod guard;
pub mod links;
pub mod lint;
pub mod loader;
pub mod metrics;
pub mod packet;
pub mod pcap;
pub mod privileges;
pub mod reference;
pub mod state;
mod tc;
