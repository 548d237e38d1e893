//! The verdict slot: which counter a verdict is recorded in, the same
//! number in `LAST_DECISION`, in events and in the agent's reading of
//! both. Encoded and decoded here only.

/// Set in a slot that names a rule (its index in the rest of the bits).
pub const DECISION_RULE: u32 = 1 << 31;
/// Set, with `DECISION_RULE`, when the rule's rate limit dropped the packet.
pub const DECISION_OVER_LIMIT: u32 = 1 << 30;

/// The slot of a verdict `rule` decided.
pub const fn rule_slot(rule: u32) -> u32 {
    DECISION_RULE | rule
}

/// The slot of a packet `rule`'s rate limit dropped.
pub const fn over_limit_slot(rule: u32) -> u32 {
    DECISION_RULE | DECISION_OVER_LIMIT | rule
}

/// What decided a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A `reason` counter: no rule decided.
    Reason(u32),
    /// A rule, by index in the effective rule order.
    Rule(usize),
    /// A rule whose rate limit dropped the packet.
    OverLimit(usize),
}

impl Outcome {
    /// The outcome a slot records.
    pub const fn from_slot(slot: u32) -> Self {
        if slot & DECISION_RULE == 0 {
            return Outcome::Reason(slot);
        }
        let index = (slot & !(DECISION_RULE | DECISION_OVER_LIMIT)) as usize;
        if slot & DECISION_OVER_LIMIT != 0 {
            Outcome::OverLimit(index)
        } else {
            Outcome::Rule(index)
        }
    }

    /// The slot that records this outcome.
    pub const fn slot(self) -> u32 {
        match self {
            Outcome::Reason(reason) => reason,
            Outcome::Rule(index) => rule_slot(index as u32),
            Outcome::OverLimit(index) => over_limit_slot(index as u32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_outcome_survives_its_slot() {
        for outcome in [
            Outcome::Reason(0),
            Outcome::Reason(7),
            Outcome::Rule(0),
            Outcome::Rule(16_383),
            Outcome::OverLimit(0),
            Outcome::OverLimit(16_383),
        ] {
            assert_eq!(Outcome::from_slot(outcome.slot()), outcome);
        }
        assert_eq!(Outcome::Rule(1).slot(), DECISION_RULE | 1);
    }
}
