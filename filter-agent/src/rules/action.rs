//! What a rule or an ACL does with a packet: shared by the rules file
//! and the cloud ACLs it imports, so that neither depends on the other.

use filter_common::action;
use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// The value the XDP program understands.
    pub fn raw(self) -> u32 {
        match self {
            Action::Allow => action::ALLOW,
            Action::Deny => action::DENY,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// What to do with non-first IP fragments, which carry no L4 header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fragments {
    /// Match them against rules without port, flag or ICMP conditions.
    #[default]
    MatchL3,
    Allow,
    Deny,
}

impl Fragments {
    /// The value of the program's `FRAGMENTS` global.
    pub fn raw(self) -> u32 {
        match self {
            Fragments::MatchL3 => filter_common::fragments::MATCH_L3,
            Fragments::Allow => filter_common::fragments::ALLOW,
            Fragments::Deny => filter_common::fragments::DENY,
        }
    }
}
