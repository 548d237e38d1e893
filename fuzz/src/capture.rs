//! pcap and pcapng reading for `replay`: never a panic, a frame never
//! longer than the file, as many frames handed on as counted, and an
//! error in one line.

use std::sync::LazyLock;

use filter_agent::oracle::pcap::{self, PcapError};
use tempfile::NamedTempFile;

use crate::assert_one_line;

/// One file, rewritten for each input (creating one each time would cost
/// more than reading it).
static FILE: LazyLock<NamedTempFile> =
    LazyLock::new(|| NamedTempFile::new().expect("a temporary file"));

pub fn check(data: &[u8]) {
    let file = &*FILE;
    std::fs::write(file.path(), data).expect("writing the capture");
    let mut frames = 0u64;
    let read = pcap::for_each_frame(file.path(), |_, frame| -> Result<(), PcapError> {
        assert!(frame.len() <= data.len(), "a frame longer than the file");
        frames += 1;
        Ok(())
    });
    match read {
        Ok(count) => assert_eq!(count, frames),
        Err(err) => assert_one_line(&err.to_string()),
    }
}
