//! filter-agent's library: everything but the process entry point, so that
//! integration tests use the same code paths as the binary.
//!
//! Layers, data flowing one way (a module uses only those above it here):
//! - [`rules`]: what a rule does ([`rules::action`]), the rules file
//!   ([`rules::config`]), its warnings ([`rules::lint`]), cloud ACL import
//!   ([`rules::upstream`]) and the compiled maps ([`rules::compile`]). Pure.
//! - [`oracle`]: the reference model ([`oracle::reference`]), test frames
//!   ([`oracle::packet`]) and captures ([`oracle::pcap`]).
//! - [`kernel`]: loading and swapping ([`kernel::loader`]), the pinned
//!   layout ([`kernel::pins`]), what the program counted
//!   ([`kernel::counters`], [`kernel::guard`], [`kernel::events`]) and
//!   link events ([`kernel::links`]).
//! - [`host`]: other filters and containers ([`host::audit`]), the
//!   conntrack bypass ([`host::notrack`]), privileges
//!   ([`host::privileges`]) and established sessions ([`host::sessions`]).
//! - Front ends: [`metrics`] (Prometheus), [`control`] (the trial
//!   protocol), [`agent`] (the daemon), [`commands`] (one-shot
//!   subcommands) and [`cli`] (clap), which `main.rs` dispatches.

pub mod agent;
pub mod cli;
pub mod commands;
pub mod control;
pub mod host;
pub mod kernel;
pub mod metrics;
pub mod oracle;
pub mod rules;
