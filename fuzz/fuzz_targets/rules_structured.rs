//! The rules file built from a structure (tables, rules, their values,
//! valid or nearly so) and then checked as text.
#![no_main]

libfuzzer_sys::fuzz_target!(|spec: filter_agent_fuzz::rules::RulesSpec| {
    filter_agent_fuzz::rules::check_text(&spec.to_toml());
});
