//! The properties the fuzz targets check (fuzz_targets/ holds the thin
//! entry points). A property that fails panics; libFuzzer keeps the input.

pub mod capture;
pub mod packet_path;
pub mod rules;
pub mod upstream;

/// Error messages reach the operator as one line.
pub fn assert_one_line(message: &str) {
    assert!(
        !message.is_empty() && !message.contains('\n'),
        "not a one-line error: {message:?}"
    );
}
