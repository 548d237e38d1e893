//! `filter-agent try` and `filter-agent confirm`: the clients of the
//! running agent's control socket. `try` checks the new file here first,
//! so a file that does not pass `check` never reaches the agent; `confirm`
//! writes the confirmed rules to the agent's rules file, atomically.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    control::{self, Answer, Request},
    host::privileges::{self, Task},
    rules::compile,
    rules::config,
};

/// How long the agent may take to answer: compiling and loading a large
/// rule set on several interfaces takes seconds.
const ANSWER_DEADLINE: Duration = Duration::from_secs(300);

/// `filter-agent try`.
pub fn try_rules(
    rules: &Path,
    timeout_seconds: u64,
    force: bool,
    socket: &Path,
) -> anyhow::Result<()> {
    let config = config::load(rules)?;
    compile::compile(&config)?;
    privileges::check(Task::Control)?;
    // The agent finds set files relative to the file: an absolute path.
    let path = fs::canonicalize(rules).with_context(|| format!("reading {}", rules.display()))?;
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let request = Request::Try {
        path: path.clone(),
        text,
        timeout_seconds,
        force,
    };
    match ask(socket, &request)? {
        Answer::Trying {
            interfaces,
            deadline_unix,
        } => {
            println!(
                "{}: in force on {} until {} ({timeout_seconds} s); `sudo filter-agent confirm` keeps \
                 it, else the previous rules come back then",
                path.display(),
                interfaces.join(", "),
                control::clock(deadline_unix)
            );
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// `filter-agent confirm`.
pub fn confirm(socket: &Path) -> anyhow::Result<()> {
    privileges::check(Task::Control)?;
    match ask(socket, &Request::Confirm)? {
        Answer::Confirmed { rules, text } => {
            write_atomically(&rules, &text).with_context(|| {
                format!(
                    "the agent keeps the rules on trial, but writing them to {} failed (a restart \
                     would load the previous rules)",
                    rules.display()
                )
            })?;
            println!(
                "confirmed: {} holds the rules that were on trial",
                rules.display()
            );
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// A refusal's reason as the error; any other answer is a bug.
fn unexpected(answer: Answer) -> anyhow::Error {
    match answer {
        Answer::Refused { reason } => anyhow!(reason),
        Answer::WouldCut { sessions } => {
            for session in &sessions {
                eprintln!("{session}");
            }
            anyhow!(
                "refused: the new rules would cut {} established {}; nothing was applied \
                 (--force applies them anyway)",
                sessions.len(),
                if sessions.len() == 1 {
                    "session"
                } else {
                    "sessions"
                }
            )
        }
        other => anyhow!("the agent answered {other:?}"),
    }
}

/// Sends `request` to the agent at `socket` and reads its answer.
fn ask(socket: &Path, request: &Request) -> anyhow::Result<Answer> {
    let mut stream = UnixStream::connect(socket).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow!(
            "no running agent: nothing listens on {} ({err})",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow!(
            "cannot reach the agent at {}: it is root's own; run as root",
            socket.display()
        ),
        _ => anyhow!("cannot reach the agent at {}: {err}", socket.display()),
    })?;
    stream.set_read_timeout(Some(ANSWER_DEADLINE))?;
    stream
        .write_all(control::encode(request).as_bytes())
        .with_context(|| format!("sending the request to {}", socket.display()))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .with_context(|| format!("waiting for the agent's answer on {}", socket.display()))?;
    if line.is_empty() {
        bail!("the agent closed {} without an answer", socket.display());
    }
    serde_json::from_str(&line).context("reading the agent's answer")
}

/// Replaces `path` with `text` in one rename (the mode of the file it
/// replaces kept), so the agent's file watch and a crash see either
/// file, never half of one.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .context("the rules file has no name")?
        .to_string_lossy();
    let partial = path.with_file_name(format!(".{name}.confirm"));
    let mode = fs::metadata(path).map_or(0o644, |meta| meta.permissions().mode());
    let mut file = fs::File::create(&partial)?;
    file.write_all(text.as_bytes())?;
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.sync_all()?;
    fs::rename(&partial, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
