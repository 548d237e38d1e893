//! The cloud ACL importers (AWS, IBM, Sakura JSON): the first byte picks
//! the format, the rest is the document.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((&format, rest)) = data.split_first()
        && let Ok(text) = std::str::from_utf8(rest)
    {
        filter_agent_fuzz::upstream::check(format, text);
    }
});
