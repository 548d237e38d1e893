//! The real XDP program (BPF_PROG_TEST_RUN) against the reference model,
//! verdict and counters, on structure-aware frames and random rule sets.
//! Needs root.
#![no_main]

use std::sync::LazyLock;

use filter_agent_fuzz::packet_path::{Input, RuleSets};

static SETS: LazyLock<RuleSets> = LazyLock::new(RuleSets::load);

libfuzzer_sys::fuzz_target!(|input: Input| {
    SETS.check(&input);
});
