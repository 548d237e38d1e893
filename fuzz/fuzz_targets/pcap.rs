//! pcap and pcapng files as `replay` reads them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    filter_agent_fuzz::capture::check(data);
});
