//! The program's sampled events: read from each interface's ring buffer,
//! served as lines to `filter-agent watch` clients, and summarised in the
//! log.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use aya::maps::RingBuf;
use filter_common::{Event, event, names};
use tokio::{
    io::{AsyncWriteExt as _, unix::AsyncFd},
    net::UnixListener,
    sync::{
        broadcast::{self, error::RecvError},
        mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel},
    },
};
use tracing::info;

use super::SUMMARY_EVERY;
use crate::{kernel::events, kernel::pins, rules::compile::RuleInfo};

/// Lines a slow `watch` client may fall behind by before it skips some.
const WATCH_BACKLOG: usize = 1024;

/// Event lines for `watch` clients: (interface, line).
type Lines = broadcast::Sender<Arc<(String, String)>>;

/// Every interface's events, their `watch` clients and their summaries.
pub(super) struct EventLines {
    receiver: UnboundedReceiver<(usize, Event)>,
    lines: Lines,
    /// Per interface, in the agent's interface order.
    tallies: Vec<EventTally>,
}

impl EventLines {
    /// Starts reading the ring buffer pinned in each `(name, dir,
    /// reading)` interface's directory (when `reading`) and serving its
    /// lines to `watch` clients.
    pub(super) fn start<'a>(
        interfaces: impl Iterator<Item = (&'a str, &'a Path, bool)>,
    ) -> anyhow::Result<Self> {
        let (sender, receiver) = unbounded_channel();
        let (lines, _) = broadcast::channel(WATCH_BACKLOG);
        let mut tallies = Vec::new();
        for (index, (name, dir, reading)) in interfaces.enumerate() {
            if reading {
                read_events(index, dir, sender.clone())?;
            }
            serve_watchers(name, &lines)?;
            tallies.push(EventTally::default());
        }
        Ok(Self {
            receiver,
            lines,
            tallies,
        })
    }

    /// The next event: (interface index, event). Never returns when no
    /// interface sends events.
    pub(super) async fn next(&mut self) -> (usize, Event) {
        match self.receiver.recv().await {
            Some(next) => next,
            None => std::future::pending().await,
        }
    }

    /// Formats an event of interface `index` for its `watch` clients and
    /// its summary.
    pub(super) fn record(
        &mut self,
        index: usize,
        iface: &str,
        event: &Event,
        rules: &[RuleInfo],
        range: (u16, u16),
    ) {
        let line = events::format(event, rules, range);
        self.tallies[index].record(event, &line);
        let _ = self.lines.send(Arc::new((iface.to_owned(), line)));
    }

    /// Logs one summary line per interface that had events.
    pub(super) fn summarise<'a>(&mut self, names: impl Iterator<Item = &'a str>) {
        for (name, tally) in names.zip(&mut self.tallies) {
            tally.log(name);
        }
    }
}

/// Reads the interface's pinned event ring buffer and hands every event,
/// tagged with `index`, to `sender`.
fn read_events(
    index: usize,
    dir: &Path,
    sender: UnboundedSender<(usize, Event)>,
) -> anyhow::Result<()> {
    let map = pins::open_map(dir, names::EVENTS)?;
    let ring = RingBuf::try_from(map).context("the event ring buffer")?;
    // SAFETY: the AsyncFd owns the ring buffer, so its fd outlives the registration.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .context("watching the event ring buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut ready) = ring.readable_mut().await else {
                break;
            };
            let ring = ready.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(event) = events::decode(&item)
                    && sender.send((index, event)).is_err()
                {
                    return;
                }
            }
            ready.clear_ready();
        }
    });
    Ok(())
}

/// Serves `iface`'s event lines to `filter-agent watch` on a Unix socket.
fn serve_watchers(iface: &str, lines: &Lines) -> anyhow::Result<()> {
    let path = events::socket_path(iface);
    // Root's only: events name peers and ports.
    pins::private_dir(Path::new(events::SOCKET_DIR))?;
    // A socket left by a crashed agent: this one holds the interface lock.
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    let (lines, iface) = (lines.clone(), iface.to_owned());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(send_lines(stream, lines.subscribe(), iface.clone()));
        }
    });
    Ok(())
}

/// Writes `iface`'s lines to one `watch` client until it goes away.
async fn send_lines(
    mut stream: tokio::net::UnixStream,
    mut receiver: broadcast::Receiver<Arc<(String, String)>>,
    iface: String,
) {
    loop {
        let text = match receiver.recv().await {
            Ok(line) if line.0 == iface => format!("{}\n", line.1),
            Ok(_) => continue,
            Err(RecvError::Lagged(skipped)) => {
                format!("... {skipped} events skipped (this reader is too slow)\n")
            }
            Err(RecvError::Closed) => break,
        };
        if stream.write_all(text.as_bytes()).await.is_err() {
            break;
        }
    }
}

/// Events seen since the last summary, per interface.
#[derive(Default)]
struct EventTally {
    drops: u64,
    would_drop: u64,
    guard: u64,
    last: Option<String>,
}

impl EventTally {
    fn record(&mut self, event: &Event, line: &str) {
        match event.verdict {
            event::DROP => self.drops += 1,
            event::WOULD_DROP => self.would_drop += 1,
            _ => {}
        }
        if event.guard != event::GUARD_NONE {
            self.guard += 1;
        }
        self.last = Some(line.to_owned());
    }

    /// One log line for the interval, if anything happened; then resets.
    fn log(&mut self, iface: &str) {
        if let Some(last) = self.last.take() {
            info!(
                %iface,
                drops = self.drops,
                would_drop = self.would_drop,
                guard = self.guard,
                %last,
                "sampled events in the last {}s (`filter-agent watch` shows each)",
                SUMMARY_EVERY.as_secs()
            );
        }
        *self = EventTally::default();
    }
}
