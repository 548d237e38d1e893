//! The running agent's control socket, which `filter-agent try` and
//! `filter-agent confirm` talk to: one JSON request line, one JSON answer
//! line. Pure types and their encoding; the agent serves it
//! (`agent::trial`), `commands::trial` is the client.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the agent listens (its runtime directory, root's own).
pub const DEFAULT_SOCKET: &str = "/run/filter-agent/control.sock";

/// The trial's length when `try` does not say.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 120;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Apply `text` (read from `path`, which locates its errors and its set
    /// files) on every interface, reverted after `timeout_seconds` unless
    /// confirmed.
    Try {
        path: PathBuf,
        text: String,
        timeout_seconds: u64,
        /// Apply even if established sessions would be cut.
        force: bool,
    },
    /// Keep the rules on trial.
    Confirm,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// The new rules are in force on `interfaces` until `deadline_unix`.
    Trying {
        interfaces: Vec<String>,
        deadline_unix: u64,
    },
    /// The trial ended for good: the client writes `text` to the agent's
    /// own rules file, `rules`, so that a restart keeps it.
    Confirmed { rules: PathBuf, text: String },
    /// Nothing was changed: the rules would cut these established
    /// sessions (one line each).
    WouldCut { sessions: Vec<String> },
    /// Nothing was changed, for `reason` (one line).
    Refused { reason: String },
}

/// The longest request line the agent reads: a rules file's size limit,
/// with room for the JSON around it.
pub const MAX_LINE_BYTES: u64 = crate::rules::config::MAX_FILE_BYTES * 2 + 4096;

/// `unix` seconds as `HH:MM:SS UTC` (a trial ends within a day).
pub fn clock(unix: u64) -> String {
    let seconds = unix % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// One line of JSON for `value`.
pub fn encode<T: Serialize>(value: &T) -> String {
    let mut line = serde_json::to_string(value).expect("plain data serialises");
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_one_line_each_and_read_back() {
        let request = Request::Try {
            path: "/tmp/new.toml".into(),
            text: "[filter]\ndefault = \"deny\"\n".into(),
            timeout_seconds: 60,
            force: false,
        };
        let line = encode(&request);
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
        let answer = Answer::Refused {
            reason: "no trial in progress".into(),
        };
        assert_eq!(
            serde_json::from_str::<Answer>(&encode(&answer)).unwrap(),
            answer
        );
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
    }

    #[test]
    fn deadlines_read_as_a_utc_clock() {
        assert_eq!(clock(0), "00:00:00 UTC");
        // 2026-12-06 12:34:56 UTC.
        assert_eq!(clock(1_796_560_496), "12:34:56 UTC");
    }
}
