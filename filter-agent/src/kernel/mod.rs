//! The kernel layer: the XDP program and its maps. [`loader`] loads,
//! attaches and swaps rules; [`pins`] is the bpffs layout that outlives
//! the agent and [`layout`] its version; [`counters`], [`guard`] and
//! [`events`] read what the program recorded; [`links`] hears interfaces
//! come and go.

pub mod counters;
pub mod events;
pub mod guard;
pub mod layout;
pub mod links;
pub mod loader;
pub mod pins;
