//! Throwaway network namespaces joined by veth, and real traffic across them.
//!
//! Used by the integration tests and by `cargo xtask demo`. Every name is
//! unique per process and call, and everything is removed on drop, so runs
//! never collide or leave debris, even when a test fails.

mod chain;
mod daemon;
pub mod docker;
mod netns;
mod refused;
pub mod steady;
pub mod traffic;
mod wait;

pub use chain::Chain;
pub use daemon::Daemon;
pub use netns::{Netns, Pair, TestbedError};
pub use refused::refused_object;
pub use wait::{wait_until, within};
