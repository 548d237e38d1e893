//! filter-agent's library: everything but the process entry point, so that
//! integration tests use the same code paths as the binary. Data flows one
//! way: rules file -> [`config`] -> [`lint`] / [`compile`] -> [`loader`]
//! (through [`pins`]) -> kernel -> [`counters`] -> [`metrics`] and the
//! [`commands`]; [`agent`] is the daemon that keeps it running.

pub mod agent;
pub mod audit;
pub mod cli;
pub mod commands;
pub mod compile;
pub mod config;
pub mod control;
pub mod counters;
pub mod events;
pub mod guard;
pub mod links;
pub mod lint;
pub mod loader;
pub mod metrics;
pub mod notrack;
pub mod packet;
pub mod pcap;
pub mod pins;
pub mod privileges;
pub mod reference;
pub mod sessions;
pub mod upstream;
