//! The rules file as arbitrary bytes: parse, validate, lint, compile.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        filter_agent_fuzz::rules::check_text(text);
    }
});
