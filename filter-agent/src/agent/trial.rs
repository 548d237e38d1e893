//! Rules on trial (`filter-agent try`, `confirm`): the control socket the
//! clients talk to, and what the agent keeps of the rules it ran before so
//! that it can go back to them at the deadline.
//!
//! Nothing of a trial is written to disk: the rules file stays as it was
//! until the client of `confirm` writes it, so an agent that dies during a
//! trial (or a host that reboots) comes back with the previous rules.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::{Instant, Interval, MissedTickBehavior, interval_at},
};
use tracing::error;

use crate::{
    control::{self, Answer, Request},
    rules::compile::RuleSet,
    rules::config::GuardSettings,
};

/// How soon a revert that failed is tried again.
pub(super) const REVERT_RETRY: Duration = Duration::from_secs(5);
/// How long a client may take to send its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// The control socket, served by a task of its own: requests reach the
/// agent's loop through [`Control::next`].
pub(super) struct Control {
    requests: mpsc::Receiver<Pending>,
    task: JoinHandle<()>,
    path: PathBuf,
}

/// A request waiting for the loop's answer.
pub(super) struct Pending {
    pub(super) request: Request,
    reply: oneshot::Sender<Answer>,
}

impl Pending {
    pub(super) fn answer(self, answer: Answer) {
        // A client that went away needs no answer.
        let _ = self.reply.send(answer);
    }
}

impl Control {
    /// Listens on `path` (root only: its mode is 0600).
    pub(super) fn bind(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // A socket left by an agent that died: this one holds the locks.
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path)
            .with_context(|| format!("listening on {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(listener)?;
        let (sender, requests) = mpsc::channel(4);
        let task = tokio::spawn(accept(listener, sender));
        Ok(Self {
            requests,
            task,
            path: path.to_owned(),
        })
    }

    /// The next request; pending forever once the socket is gone.
    pub(super) async fn next(&mut self) -> Pending {
        match self.requests.recv().await {
            Some(pending) => pending,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept(listener: UnixListener, sender: mpsc::Sender<Pending>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_client(stream, sender.clone()));
            }
            // A client that gave up while queued, or a signal: the next one.
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::Interrupted
                ) => {}
            Err(err) => {
                error!(
                    %err,
                    "the control socket stopped accepting: `filter-agent try` and `confirm` \
                     reach this agent again once it restarts"
                );
                return;
            }
        }
    }
}

/// Reads one request, hands it to the loop, writes its answer.
async fn serve_client(stream: UnixStream, sender: mpsc::Sender<Pending>) {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(reader.take(control::MAX_LINE_BYTES));
    let read = tokio::time::timeout(REQUEST_DEADLINE, reader.read_line(&mut line)).await;
    let answer = match read.map(|read| read.map(|_| serde_json::from_str::<Request>(&line))) {
        Ok(Ok(Ok(request))) => {
            let (reply, answered) = oneshot::channel();
            if sender.send(Pending { request, reply }).await.is_err() {
                return;
            }
            match answered.await {
                Ok(answer) => answer,
                Err(_) => return,
            }
        }
        Ok(Ok(Err(err))) => refused(format!("not a request the agent knows: {err}")),
        Ok(Err(err)) => refused(format!("reading the request: {err}")),
        Err(_) => refused(format!("no request within {REQUEST_DEADLINE:?}")),
    };
    let _ = writer.write_all(control::encode(&answer).as_bytes()).await;
}

pub(super) fn refused(reason: String) -> Answer {
    Answer::Refused { reason }
}

/// The rules an agent ran before a trial: what it goes back to.
pub(super) struct Previous {
    pub(super) rule_set: Arc<RuleSet>,
    pub(super) guard: GuardSettings,
    pub(super) count: usize,
}

/// Rules on trial.
pub(super) struct Trial {
    /// Fires at the deadline, then every [`REVERT_RETRY`] while the
    /// previous rules cannot be put back.
    revert_due: Interval,
    pub(super) deadline_unix: u64,
    pub(super) previous: Previous,
    /// Where the rules on trial were read, and their text (`confirm`
    /// writes it to the rules file).
    pub(super) path: PathBuf,
    pub(super) text: String,
}

impl Trial {
    pub(super) fn new(previous: Previous, timeout: Duration, path: PathBuf, text: String) -> Self {
        let deadline_unix = SystemTime::now()
            .checked_add(timeout)
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map_or(u64::MAX, |since| since.as_secs());
        let mut revert_due = interval_at(Instant::now() + timeout, REVERT_RETRY);
        revert_due.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            revert_due,
            deadline_unix,
            previous,
            path,
            text,
        }
    }
}

/// The trial's revert timer firing: at the deadline, and again after a
/// revert that failed; pending forever without a trial.
pub(super) async fn revert_due(trial: Option<&mut Trial>) {
    match trial {
        Some(trial) => drop(trial.revert_due.tick().await),
        None => std::future::pending().await,
    }
}
