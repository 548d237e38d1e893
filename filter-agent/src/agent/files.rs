//! Watching the rules file and its set files for changes.

use std::{
    collections::{BTreeSet, HashSet},
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode},
};
use tokio::{
    sync::mpsc::{UnboundedReceiver, unbounded_channel},
    time::Instant,
};

use crate::rules::config;

/// A writer is done once its file has been quiet this long...
const RELOAD_QUIET: Duration = Duration::from_millis(250);
/// ...or this long after its first change, so that a file rewritten
/// without pause is still reloaded.
const RELOAD_AT_MOST: Duration = Duration::from_secs(1);
/// The symlink Kubernetes swaps when a mounted ConfigMap changes.
const KUBERNETES_DATA_LINK: &str = "..data";

/// Watches the rules file and its set files through their directories, so
/// that editors that write by rename and Kubernetes ConfigMap updates (a
/// symlink swap of `..data`) are seen as well as writes in place.
pub(super) struct FileWatch {
    _watcher: RecommendedWatcher,
    changes: UnboundedReceiver<()>,
    /// When the first change not yet reloaded was seen. Kept here, not in
    /// the future that waits for the writer: `select!` drops that future
    /// whenever another branch (a drop event, a timer) wins, and a change
    /// must not be lost with it.
    first_change: Option<Instant>,
}

impl FileWatch {
    pub(super) fn new(rules: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(rules).unwrap_or_default();
        let mut files = vec![rules.to_owned()];
        files.extend(config::set_files(rules, &text));
        let mut names: HashSet<OsString> = files
            .iter()
            .filter_map(|file| file.file_name().map(ToOwned::to_owned))
            .collect();
        names.insert(OsString::from(KUBERNETES_DATA_LINK));
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .map(|file| match file.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
                _ => PathBuf::from("."),
            })
            .collect();
        let (sender, changes) = unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                let written = !matches!(
                    event.kind,
                    EventKind::Access(AccessKind::Open(_) | AccessKind::Read)
                        | EventKind::Access(AccessKind::Close(AccessMode::Read))
                );
                let ours = event
                    .paths
                    .iter()
                    .any(|path| path.file_name().is_some_and(|name| names.contains(name)));
                if written && ours {
                    let _ = sender.send(());
                }
            })
            .context("watching the rules file")?;
        for dir in &dirs {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .with_context(|| format!("watching {}", dir.display()))?;
        }
        Ok(Self {
            _watcher: watcher,
            changes,
            first_change: None,
        })
    }

    /// Whether a change was seen and not yet waited for (drains them).
    pub(super) fn pending(&mut self) -> bool {
        let mut any = self.first_change.take().is_some();
        while self.changes.try_recv().is_ok() {
            any = true;
        }
        any
    }

    /// Waits for a change, then for the writer to finish: until no further
    /// change comes for [`RELOAD_QUIET`], or [`RELOAD_AT_MOST`] after the
    /// first. Cancel-safe: dropped and called again, it goes on waiting
    /// for the same change.
    pub(super) async fn changed(&mut self) {
        loop {
            let first = match self.first_change {
                Some(first) => first,
                None => {
                    if self.changes.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                    *self.first_change.insert(Instant::now())
                }
            };
            let quiet_until = (Instant::now() + RELOAD_QUIET).min(first + RELOAD_AT_MOST);
            match tokio::time::timeout_at(quiet_until, self.changes.recv()).await {
                // Another write: the writer is not done yet.
                Ok(Some(())) => {}
                Ok(None) => std::future::pending::<()>().await,
                Err(_quiet) => {
                    self.first_change = None;
                    return;
                }
            }
        }
    }
}
