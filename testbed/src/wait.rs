//! Waiting for a condition instead of sleeping and hoping.

use std::{
    thread,
    time::{Duration, Instant},
};

/// How often a condition is checked again.
const POLL: Duration = Duration::from_millis(2);

/// Checks `condition` until it holds (true) or `timeout` passes (false).
pub fn within(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// Checks `condition` until it holds; panics naming `what` never happened
/// when `timeout` passes first.
pub fn wait_until(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    assert!(
        within(timeout, condition),
        "{what}: did not happen within {timeout:?}"
    );
}
