//! The rules layer, pure: what a rule does ([`action`]), the rules file read and checked ([`config`]),
//! the warnings of `check` ([`lint`]), the cloud ACLs imported as rules
//! ([`upstream`]), and the rules compiled to the maps' contents
//! ([`compile`]); text they quote in messages kept to one line
//! ([`quote`]). No I/O but reading the files named.

pub mod action;
pub mod compile;
pub mod config;
pub mod lint;
pub mod quote;
pub mod upstream;
