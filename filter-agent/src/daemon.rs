//! The agent itself: attaches the filter and the guard to each interface
//! through pinned links (taking over what an earlier agent left, without a
//! gap), reloads the rules on SIGHUP and on file changes, keeps the guard's
//! view of local services fresh, serves metrics and `watch` clients, logs
//! summaries of events, out-of-range traffic and namespace findings, and on
//! SIGINT/SIGTERM leaves the filter in place (or detaches it).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    ffi::OsString,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    Router,
    http::{StatusCode, header::CONTENT_TYPE},
    routing::get,
};
use aya::maps::{Map, MapData, RingBuf};
use filter_common::{Counter, Event, event, guard as guard_stat, names, reason};
use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode},
};
use prometheus_client::registry::Registry;
use sd_notify::NotifyState;
use tokio::{
    io::{AsyncWriteExt as _, unix::AsyncFd},
    net::UnixListener,
    signal::unix::{SignalKind, signal},
    sync::{
        broadcast::{self, error::RecvError},
        mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel},
    },
    time::{Instant, MissedTickBehavior, interval, interval_at},
};
use tracing::{error, info, warn};

use filter_agent::{
    audit,
    cli::{RunArgs, XdpModeArg},
    compile::{self, RuleInfo, RuleSet},
    config::{self, Config, GuardAction, GuardSettings},
    events,
    guard::{self, Listeners},
    links::LinkWatch,
    loader::{self, Attached, Filter},
    metrics::{self, Metrics, Status},
    privileges,
    state::{self, InterfaceLock},
};

/// How often listening sockets are rescanned (and out-of-range traffic
/// summarised).
const SERVICES_EVERY: Duration = Duration::from_secs(10);
/// How often every namespace is audited.
const AUDIT_EVERY: Duration = Duration::from_secs(60);
/// A writer is done once its file has been quiet this long...
const RELOAD_QUIET: Duration = Duration::from_millis(250);
/// ...or this long after its first change, so that a file rewritten
/// without pause is still reloaded.
const RELOAD_AT_MOST: Duration = Duration::from_secs(1);
/// The symlink Kubernetes swaps when a mounted ConfigMap changes.
const KUBERNETES_DATA_LINK: &str = "..data";
/// Ports and peers named in a summary line.
const SUMMARY_TOP: usize = 5;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let Some(rules) = args.rules else {
        unreachable!("clap requires --iface and --rules without a subcommand");
    };
    let config = config::load(&rules)?;
    let rule_set = compile::compile(&config)?;
    privileges::check(privileges::Task::Attach)?;
    loader::check_kernel()?;
    // All or none: an unknown second interface must not leave the first
    // one attached.
    if let Some(missing) = args
        .iface
        .iter()
        .find(|iface| !loader::interface_exists(iface))
    {
        anyhow::bail!(loader::LoadError::UnknownInterface(missing.clone()));
    }
    for iface in state::remove_vanished() {
        info!(%iface, "removed the pins of an interface that no longer exists");
    }
    // Another agent on one of the interfaces is the likelier conflict: say
    // so before anything else can fail.
    let locks = args
        .iface
        .iter()
        .map(|iface| InterfaceLock::acquire(iface))
        .collect::<Result<Vec<_>, _>>()?;
    // Before anything is attached: a busy port fails the start cleanly.
    let metrics_listener = std::net::TcpListener::bind(args.metrics).map_err(|err| {
        // Nothing was attached: the lock directories just made go again.
        for iface in &args.iface {
            let _ = std::fs::remove_dir(loader::pin_dir(iface));
        }
        let _ = std::fs::remove_dir(loader::PIN_ROOT);
        anyhow::anyhow!(
            "cannot listen for metrics on {} (--metrics): {err}",
            args.metrics
        )
    })?;
    let status = Arc::new(Mutex::new(Status {
        rules_loaded: config.rules.len() as u64,
        ..Status::default()
    }));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        // Services first: ACKs to local listeners are not return traffic.
        // Watching starts first: a change made while attaching is not missed.
        let files = FileWatch::new(&rules)?;
        let links = LinkWatch::open().context("watching link events (rtnetlink)")?;
        let mut watch = GuardWatch::new(&config.guard, args.metrics_hide_processes);
        watch.listeners = watch.scan();
        // A failed start removes what it added, on every interface: a
        // filter an earlier agent left in place stays.
        let fresh: Vec<PathBuf> = args
            .iface
            .iter()
            .map(|iface| loader::pin_dir(iface))
            .filter(|dir| !dir.join(loader::XDP_LINK_PIN).exists())
            .collect();
        let mut interfaces = Vec::new();
        for (iface, lock) in args.iface.iter().zip(locks) {
            let attached = Interface::attach(
                iface,
                lock,
                &rule_set,
                &watch.listeners,
                args.xdp_mode,
                args.events_per_second,
            );
            match attached {
                Ok(interface) => interfaces.push(interface),
                Err(err) => {
                    drop(interfaces);
                    fresh.iter().for_each(|dir| loader::remove_pins(dir));
                    return Err(err);
                }
            }
        }
        interfaces
            .iter()
            .for_each(|interface| watch.baseline(interface));
        info!(
            rules = %rules.display(),
            count = config.rules.len(),
            default = config.filter.default.name(),
            guard = ?config.guard.action,
            ephemeral = %format!("{}-{}", config.guard.ephemeral.0, config.guard.ephemeral.1),
            "rules loaded"
        );
        let registry = Metrics::registry(args.iface.clone(), Arc::clone(&status));
        let serving = Serving {
            rules: &rules,
            rule_set,
            files,
            links,
            status: &status,
            metrics: args.metrics,
        };
        let result = tokio::select! {
            result = serve(&mut interfaces, watch, serving) => result,
            result = serve_metrics(metrics_listener, registry, Arc::clone(&status)) => {
                result.context("serving metrics")
            }
        };
        notify(&[NotifyState::Stopping]);
        for interface in interfaces {
            interface.stop(args.detach_on_exit);
        }
        result
    });
    // A reload still compiling on its blocking thread is abandoned.
    runtime.shutdown_background();
    result
}

/// Pauses after a program swap so that packets already inside the old
/// program are counted before its counters are read.
const SWAP_SETTLE: Duration = Duration::from_millis(10);

/// One interface the agent filters.
struct Interface {
    name: String,
    /// The device the filter is attached to: a re-created interface with
    /// the same name is another device, with another index.
    ifindex: u32,
    /// False while the interface is gone (or could not be attached again).
    filtered: bool,
    /// A reload happened while it was gone: it needs the new rules.
    behind: bool,
    dir: PathBuf,
    mode: XdpModeArg,
    event_rate: u32,
    filter: Filter,
    rules: Vec<RuleInfo>,
    /// Per rule: what it counted under earlier rule sets.
    bases: Vec<Counter>,
    _lock: InterfaceLock,
}

impl Interface {
    /// Loads `rule_set` for the (locked) interface and attaches it, taking
    /// over the links a previous agent left pinned (without a gap) if any.
    fn attach(
        iface: &str,
        lock: InterfaceLock,
        rule_set: &RuleSet,
        listeners: &Listeners,
        mode: XdpModeArg,
        event_rate: u32,
    ) -> anyhow::Result<Self> {
        let dir = loader::pin_dir(iface);
        // Read before attaching: a re-creation in between shows as a change.
        let ifindex = loader::if_index(iface).unwrap_or_default();
        let mut filter = load_filter(rule_set, &dir, listeners, event_rate)?;
        if let Some(logger) = filter.logger() {
            forward_program_logs(logger)?;
        }
        let (filter, bases, attached) = install(iface, &dir, filter, rule_set, mode)?;
        if rule_set.guard.action != GuardAction::Off && !loader::has_tcx() {
            info!(
                %iface,
                kernel = %loader::kernel_version().map_or_else(String::new, |v| v.to_string()),
                "no TCX before Linux 6.6: the guard's egress program runs as a tc filter on a clsact qdisc instead (kept across restarts, removed by detach)"
            );
        }
        match attached {
            Attached::Fresh(mode) => info!(%iface, mode, "filter attached"),
            Attached::Adopted => info!(
                %iface,
                "filter attached: took over the pinned filter, new rules swapped in without a gap"
            ),
        }
        Ok(Self {
            name: iface.to_owned(),
            ifindex,
            filtered: true,
            behind: false,
            dir,
            mode,
            event_rate,
            filter,
            rules: rule_set.rules.clone(),
            bases,
            _lock: lock,
        })
    }

    /// Puts `filter` (loaded with `rule_set`) in place of the running one.
    /// Its aya-log buffer is not read: the program logs only on a path that
    /// cannot be taken, and the first instance's forwarding shows whether
    /// it ever is.
    fn swap(&mut self, filter: Filter, rule_set: &RuleSet) -> anyhow::Result<()> {
        let (filter, bases, _) = install(&self.name, &self.dir, filter, rule_set, self.mode)?;
        self.filter = filter;
        self.rules = rule_set.rules.clone();
        self.bases = bases;
        Ok(())
    }

    /// Follows the interface's device: when it was deleted, the interface
    /// is unfiltered until one with its name comes back; a new one gets the
    /// filter at once (the defunct pinned links are replaced).
    fn follow_link(&mut self, rule_set: &RuleSet, listeners: &Listeners) {
        let now = loader::if_index(&self.name);
        if self.filtered && now == Some(self.ifindex) {
            return;
        }
        if std::mem::take(&mut self.filtered) {
            warn!(
                iface = %self.name,
                index = self.ifindex,
                "interface deleted: it is not filtered until an interface with its name comes back"
            );
        }
        let Some(index) = now else { return };
        let started = std::time::Instant::now();
        let attached = if self.behind {
            load_filter(rule_set, &self.dir, listeners, self.event_rate)
                .and_then(|filter| self.swap(filter, rule_set))
        } else {
            // The program it ran is still loaded: attached to the new
            // device as it is, without another pass of the verifier.
            self.filter
                .attach_pinned(&self.name, self.mode, &self.dir)
                .map(drop)
                .map_err(anyhow::Error::from)
        };
        match attached {
            Ok(()) => {
                self.ifindex = index;
                self.filtered = true;
                self.behind = false;
                info!(
                    iface = %self.name,
                    index,
                    took_ms = started.elapsed().as_millis() as u64,
                    "interface created again: filter attached"
                );
            }
            Err(err) => error!(
                iface = %self.name,
                index,
                "interface created again, but the filter cannot be attached; it stays unfiltered: {err:#}"
            ),
        }
    }

    /// Logs the counters and leaves the filter in place, or removes it.
    fn stop(self, detach: bool) {
        let _ = std::fs::remove_file(events::socket_path(&self.name));
        let _ = std::fs::remove_dir(events::SOCKET_DIR);
        log_counters(&self);
        if detach {
            info!(iface = %self.name, "detaching");
            loader::remove_pins(&self.dir);
        } else {
            info!(
                iface = %self.name,
                "leaving the filter in place (fail-static); `filter-agent detach` removes it"
            );
        }
    }

    /// Per rule: name, action, total count (earlier rule sets included).
    fn rule_totals(&self) -> anyhow::Result<Vec<(&RuleInfo, Counter)>> {
        let counters = self.filter.rule_counters()?;
        Ok(self
            .rules
            .iter()
            .zip(counters.iter().zip(&self.bases))
            .map(|(rule, (counter, base))| {
                let mut total = *base;
                total.add(counter);
                (rule, total)
            })
            .collect())
    }
}

/// Loads `rule_set` with the interface's shared maps from `dir`.
fn load_filter(
    rule_set: &RuleSet,
    dir: &Path,
    listeners: &Listeners,
    event_rate: u32,
) -> anyhow::Result<Filter> {
    let mut filter =
        Filter::load_pinned(rule_set, dir, event_rate).context("loading the XDP program")?;
    filter.set_services(&rule_set.guard.services, listeners)?;
    Ok(filter)
}

/// Attaches `filter` through the pins in `dir` (taking over what is there
/// in one step) and publishes its rules; returns it with the rules' bases.
fn install(
    iface: &str,
    dir: &Path,
    mut filter: Filter,
    rule_set: &RuleSet,
    mode: XdpModeArg,
) -> anyhow::Result<(Filter, Vec<Counter>, Attached)> {
    let attached = filter.attach_pinned(iface, mode, dir)?;
    if attached == Attached::Adopted {
        std::thread::sleep(SWAP_SETTLE);
    }
    let bases = state::publish_rules(&filter, &rule_set.rules, dir)?;
    Ok((filter, bases, attached))
}

/// Serves `/metrics` and `/healthz` until the agent stops.
async fn serve_metrics(
    listener: std::net::TcpListener,
    registry: Registry,
    status: Arc<Mutex<Status>>,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let registry = Arc::new(registry);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = Arc::clone(&registry);
                async move {
                    (
                        [(CONTENT_TYPE, metrics::CONTENT_TYPE)],
                        metrics::render(&registry),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let unfiltered = lock(&status).unfiltered.clone();
                async move {
                    if unfiltered.is_empty() {
                        (StatusCode::OK, "ok\n".to_owned())
                    } else {
                        let names: Vec<String> = unfiltered.into_iter().collect();
                        let text = format!("unfiltered: {}\n", names.join(", "));
                        (StatusCode::SERVICE_UNAVAILABLE, text)
                    }
                }
            }),
        );
    axum::serve(listener, app).await?;
    Ok(())
}

/// Tells systemd (`Type=notify`) about the agent's state; a no-op when not
/// run by systemd.
fn notify(state: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(false, state) {
        warn!(%err, "cannot notify systemd");
    }
}

fn lock(status: &Mutex<Status>) -> std::sync::MutexGuard<'_, Status> {
    status.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Validates, compiles and loads the rules file for every filtered
/// interface, then swaps each in; returns the number of rules in the file
/// and the new rule set. Any error
/// before the swaps leaves every interface as it was, and a swap that
/// fails puts the previous rules (`current`) back on the interfaces
/// already swapped: nothing is half-applied. An interface that is gone
/// gets the new rules when it comes back.
fn reload(
    interfaces: &mut [Interface],
    (config, rule_set): (Config, RuleSet),
    watch: &mut GuardWatch,
    current: &RuleSet,
) -> anyhow::Result<(usize, RuleSet)> {
    // A new program starts from the scan: TCP listeners the running one
    // learnt from SYN-ACKs since the last one must be in it.
    watch.listeners.tcp = Listeners::discover().tcp;
    let mut targets: Vec<&mut Interface> = interfaces
        .iter_mut()
        .filter(|interface| interface.filtered)
        .collect();
    let loaded = targets
        .iter()
        .map(|interface| {
            load_filter(
                &rule_set,
                &interface.dir,
                &watch.listeners,
                interface.event_rate,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (done, filter) in loaded.into_iter().enumerate() {
        let Err(err) = targets[done].swap(filter, &rule_set) else {
            continue;
        };
        let failed = targets[done].name.clone();
        let mut restored = Vec::new();
        for interface in &mut targets[..done] {
            let back = load_filter(
                current,
                &interface.dir,
                &watch.listeners,
                interface.event_rate,
            )
            .and_then(|filter| interface.swap(filter, current));
            restored.push(match back {
                Ok(()) => format!("{} runs the previous rules again", interface.name),
                Err(back) => format!("{} runs the new rules ({back:#})", interface.name),
            });
        }
        return Err(err.context(format!(
            "swapping the new rules in on {failed}{}",
            if restored.is_empty() {
                String::new()
            } else {
                format!("; {}", restored.join("; "))
            }
        )));
    }
    drop(targets);
    for interface in interfaces
        .iter_mut()
        .filter(|interface| !interface.filtered)
    {
        interface.behind = true;
    }
    watch.settings = config.guard.clone();
    Ok((config.rules.len(), rule_set))
}

/// Reads, validates and compiles the rules file (no kernel involved).
fn prepare(rules: &Path) -> anyhow::Result<(Config, RuleSet)> {
    let config = config::load(rules)?;
    let rule_set = compile::compile(&config)?;
    Ok((config, rule_set))
}

/// Watches the rules file and its set files through their directories, so
/// that editors that write by rename and Kubernetes ConfigMap updates (a
/// symlink swap of `..data`) are seen as well as writes in place.
struct FileWatch {
    _watcher: RecommendedWatcher,
    changes: UnboundedReceiver<()>,
    /// When the first change not yet reloaded was seen. Kept here, not in
    /// the future that waits for the writer: `select!` drops that future
    /// whenever another branch (a drop event, a timer) wins, and a change
    /// must not be lost with it.
    first_change: Option<Instant>,
}

impl FileWatch {
    fn new(rules: &Path) -> anyhow::Result<Self> {
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
    fn pending(&mut self) -> bool {
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
    async fn changed(&mut self) {
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

/// Event lines for `watch` clients: (interface, line).
type Lines = broadcast::Sender<Arc<(String, String)>>;
/// Lines a slow `watch` client may fall behind by before it skips some.
const WATCH_BACKLOG: usize = 1024;

/// Reads the interface's pinned event ring buffer and hands every event,
/// tagged with `index`, to the main loop.
fn read_events(
    index: usize,
    dir: &Path,
    sender: UnboundedSender<(usize, Event)>,
) -> anyhow::Result<()> {
    let path = dir.join(names::EVENTS);
    let map = MapData::from_pin(&path)
        .and_then(Map::from_map_data)
        .with_context(|| format!("opening {}", path.display()))?;
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
    state::private_dir(Path::new(events::SOCKET_DIR))?;
    // A socket left by a crashed agent: this one holds the interface lock.
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    let (lines, iface) = (lines.clone(), iface.to_owned());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut receiver = lines.subscribe();
            let iface = iface.clone();
            tokio::spawn(async move {
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
            });
        }
    });
    Ok(())
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
                SERVICES_EVERY.as_secs()
            );
        }
        *self = EventTally::default();
    }
}

/// Runs until SIGINT or SIGTERM.
/// What [`serve`] works with besides the interfaces and the guard.
struct Serving<'a> {
    rules: &'a Path,
    /// The rules every filtered interface runs.
    rule_set: RuleSet,
    files: FileWatch,
    links: LinkWatch,
    status: &'a Mutex<Status>,
    metrics: std::net::SocketAddr,
}

async fn serve(
    interfaces: &mut [Interface],
    mut watch: GuardWatch,
    serving: Serving<'_>,
) -> anyhow::Result<()> {
    let Serving {
        rules,
        mut rule_set,
        mut files,
        mut links,
        status,
        metrics,
    } = serving;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let (event_sender, mut event_receiver) = unbounded_channel();
    let (lines, _) = broadcast::channel(WATCH_BACKLOG);
    for (index, interface) in interfaces.iter().enumerate() {
        if interface.event_rate > 0 {
            read_events(index, &interface.dir, event_sender.clone())?;
        }
        serve_watchers(&interface.name, &lines)?;
    }
    drop(event_sender);
    let mut tallies: Vec<EventTally> = interfaces.iter().map(|_| EventTally::default()).collect();
    let mut summaries = interval_at(Instant::now() + SERVICES_EVERY, SERVICES_EVERY);
    let mut services = interval_at(Instant::now() + SERVICES_EVERY, SERVICES_EVERY);
    let mut audits = interval(AUDIT_EVERY);
    // systemd's watchdog (WatchdogSec=): ping at half the deadline.
    let mut watchdog_usec = 0;
    let watchdog_on = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let mut watchdog = interval(Duration::from_micros(watchdog_usec.max(2_000_000) / 2));
    services.set_missed_tick_behavior(MissedTickBehavior::Delay);
    audits.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
    let ready = format!("filtering {}", names.join(", "));
    notify(&[NotifyState::Ready, NotifyState::Status(&ready)]);
    info!(%metrics, "ready: serving metrics at /metrics, watching the rules file, events for `filter-agent watch`");
    let mut changed_meanwhile = false;
    loop {
        let guard_on = watch.settings.action != GuardAction::Off;
        let why = if std::mem::take(&mut changed_meanwhile) {
            "the rules file changed during the last reload"
        } else {
            tokio::select! {
                _ = terminate.recv() => { info!("SIGTERM received"); break; }
                _ = interrupt.recv() => { info!("SIGINT received"); break; }
                _ = hangup.recv() => "SIGHUP",
                Some((index, event)) = event_receiver.recv() => {
                    let interface = &interfaces[index];
                    let line = events::format(&event, &interface.rules, watch.settings.ephemeral);
                    tallies[index].record(&event, &line);
                    let _ = lines.send(Arc::new((interface.name.clone(), line)));
                    continue;
                }
                _ = summaries.tick() => {
                    for (interface, tally) in interfaces.iter().zip(&mut tallies) {
                        tally.log(&interface.name);
                    }
                    continue;
                }
                _ = watchdog.tick(), if watchdog_on => {
                    notify(&[NotifyState::Watchdog]);
                    continue;
                }
                () = files.changed() => "the rules file changed",
                changed = links.changed() => {
                    if let Err(err) = changed {
                        warn!(%err, "cannot read link events; checking the interfaces anyway");
                    }
                    for interface in interfaces.iter_mut() {
                        interface.follow_link(&rule_set, &watch.listeners);
                    }
                    lock(status).unfiltered = interfaces
                        .iter()
                        .filter(|interface| !interface.filtered)
                        .map(|interface| interface.name.clone())
                        .collect();
                    continue;
                }
                _ = services.tick(), if guard_on => {
                    watch.listeners = watch.scan();
                    for interface in interfaces.iter_mut() {
                        watch.refresh(interface);
                    }
                    continue;
                }
                _ = audits.tick(), if guard_on => {
                    let range = watch.settings.ephemeral;
                    match tokio::task::spawn_blocking(move || audit::run(range)).await {
                        Ok(namespaces) => watch.report_audit(&namespaces, status),
                        Err(err) => warn!(%err, "namespace audit failed"),
                    }
                    continue;
                }
            }
        };
        notify(&[NotifyState::Reloading]);
        info!(trigger = why, "reloading");
        // Reading and compiling a big set takes seconds: off the runtime,
        // so that /healthz, /metrics and signals are served meanwhile.
        let path = rules.to_owned();
        let prepared = tokio::select! {
            prepared = tokio::task::spawn_blocking(move || prepare(&path)) => {
                prepared.context("compiling the rules")?
            }
            _ = terminate.recv() => { info!("SIGTERM received during a reload"); break; }
            _ = interrupt.recv() => { info!("SIGINT received during a reload"); break; }
        };
        let guard_was_on = watch.settings.action != GuardAction::Off;
        let result =
            prepared.and_then(|prepared| reload(interfaces, prepared, &mut watch, &rule_set));
        if !guard_was_on {
            interfaces
                .iter()
                .for_each(|interface| watch.baseline(interface));
        }
        notify(&[NotifyState::Ready]);
        {
            let mut status = lock(status);
            match &result {
                Ok((count, _)) => {
                    status.reloads_succeeded += 1;
                    status.rules_loaded = *count as u64;
                }
                Err(_) => status.reloads_failed += 1,
            }
        }
        match result {
            Ok((count, new)) => {
                rule_set = new;
                // Set files may have come or gone. The new watch is in
                // place before the old one goes, so no change is missed.
                match FileWatch::new(rules) {
                    Ok(new) => {
                        // A change seen while reloading is reloaded again.
                        changed_meanwhile = files.pending();
                        files = new;
                    }
                    Err(err) => warn!(err = %format!("{err:#}"), "cannot watch the rules file"),
                }
                info!(rules = %rules.display(), count, trigger = why, "rules reloaded");
            }
            Err(err) => error!(
                trigger = why,
                "reload rejected, the previous rules stay in force: {err:#}"
            ),
        }
    }
    Ok(())
}

/// The agent's side of the guard: service discovery and summaries.
struct GuardWatch {
    settings: GuardSettings,
    /// UDP listeners of the previous scan: a UDP port becomes a service
    /// only when seen twice, so short-lived client sockets do not.
    previous_udp: BTreeSet<u16>,
    /// Per interface: out-of-range return and outbound counts at the last
    /// summary.
    last: HashMap<String, (u64, u64)>,
    /// The last scan's result.
    listeners: Listeners,
    /// Findings already logged, so each is logged once.
    logged_findings: BTreeSet<(u64, String)>,
    /// `--metrics-hide-processes`.
    hide_processes: bool,
}

impl GuardWatch {
    fn new(settings: &GuardSettings, hide_processes: bool) -> Self {
        Self {
            hide_processes,
            settings: settings.clone(),
            previous_udp: BTreeSet::new(),
            last: HashMap::new(),
            listeners: Listeners::default(),
            logged_findings: BTreeSet::new(),
        }
    }

    /// Listening sockets now; UDP ones only when the previous scan saw
    /// them too.
    fn scan(&mut self) -> Listeners {
        let mut found = Listeners::discover();
        let stable_udp = found
            .udp
            .intersection(&self.previous_udp)
            .copied()
            .collect();
        self.previous_udp = std::mem::replace(&mut found.udp, stable_udp);
        found
    }

    fn refresh(&mut self, interface: &mut Interface) {
        let services = &self.settings.services;
        if let Err(err) = interface.filter.set_services(services, &self.listeners) {
            warn!(iface = %interface.name, %err, "cannot update the guard's service ports");
        }
        self.summarise(interface);
    }

    /// Starts the summaries from the counts pinned now: what an earlier
    /// agent (or this one, while the guard was off) counted is not new.
    fn baseline(&mut self, interface: &Interface) {
        if let Ok(report) = interface.filter.guard_report() {
            self.last
                .insert(interface.name.clone(), out_of_range(&report));
        }
    }

    /// One warning per interval in which out-of-range traffic was seen.
    fn summarise(&mut self, interface: &Interface) {
        let report = match interface.filter.guard_report() {
            Ok(report) => report,
            Err(err) => {
                return warn!(iface = %interface.name, %err, "cannot read the guard's counters");
            }
        };
        let (returned, outbound) = out_of_range(&report);
        let last = self.last.entry(interface.name.clone()).or_default();
        let (new_return, new_outbound) = (
            returned.saturating_sub(last.0),
            outbound.saturating_sub(last.1),
        );
        *last = (returned, outbound);
        if new_return == 0 && new_outbound == 0 {
            return;
        }
        let ports: Vec<String> = report
            .ports
            .iter()
            .take(SUMMARY_TOP)
            .map(|(port, counter)| {
                format!(
                    "{} {}/{} ({})",
                    guard::direction_name(port.direction),
                    guard::proto_name(port.proto),
                    port.port,
                    counter.packets
                )
            })
            .collect();
        let (low, high) = self.settings.ephemeral;
        warn!(
            iface = %interface.name,
            return_packets = new_return,
            outbound_attempts = new_outbound,
            top_ports = %ports.join(", "),
            "guard: traffic on local ports outside the ephemeral range {low}-{high} (see `filter-agent guard`)"
        );
    }

    fn report_audit(&mut self, namespaces: &[audit::Namespace], status: &Mutex<Status>) {
        let mut open = Vec::new();
        for ns in namespaces {
            for finding in &ns.findings {
                let label = if self.hide_processes {
                    ns.label_without_processes()
                } else {
                    ns.label()
                };
                open.push((label, finding.kind));
                if self
                    .logged_findings
                    .insert((ns.inode, finding.problem.clone()))
                {
                    warn!(
                        namespace = ?ns.label(),
                        fix = %finding.fix,
                        "audit: {}", finding.problem
                    );
                }
            }
        }
        lock(status).findings = open;
    }
}

/// Out-of-range return packets and outbound attempts counted so far.
fn out_of_range(report: &guard::GuardReport) -> (u64, u64) {
    (
        report.stats[guard_stat::RETURN_OUT_OF_RANGE as usize].packets,
        report.stats[guard_stat::OUTBOUND_OUT_OF_RANGE as usize].packets,
    )
}

/// Forwards aya-log records from the program to `log` (and so to tracing).
fn forward_program_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the logger, so its fd outlives the registration.
    let mut logger =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .context("watching the eBPF log buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                break;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

fn log_counters(interface: &Interface) {
    let iface = &interface.name;
    match interface.rule_totals() {
        Ok(totals) => {
            for (rule, counter) in totals {
                info!(
                    %iface,
                    rule = rule.name,
                    action = rule.action.name(),
                    packets = counter.packets,
                    bytes = counter.bytes,
                    "counted"
                );
            }
        }
        Err(err) => warn!(%iface, %err, "cannot read rule counters"),
    }
    match interface.filter.counters() {
        Ok(reasons) => {
            for (name, counter) in reason::NAMES.iter().zip(reasons) {
                info!(
                    %iface,
                    reason = name,
                    packets = counter.packets,
                    bytes = counter.bytes,
                    "counted"
                );
            }
        }
        Err(err) => warn!(%iface, %err, "cannot read counters"),
    }
    if let Ok(report) = interface.filter.guard_report() {
        for (name, counter) in guard_stat::STAT_NAMES.iter().zip(report.stats) {
            info!(
                %iface,
                guard = name,
                packets = counter.packets,
                bytes = counter.bytes,
                "counted"
            );
        }
    }
}
