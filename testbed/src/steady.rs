//! Steady traffic through a filter, counted where it arrives: an allowed
//! and a denied datagram at a time, [`PAIRS_PER_SECOND`] at most, the next
//! pair sent once the allowed one has arrived (or after [`TIMEOUT`]), until
//! stopped. Whether the filter
//! ever lost an allowed packet or let a denied one through, as a receiver
//! sees it. It can be held while the path is knowingly broken (an
//! interface deleted and created again).

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{
    Netns, TestbedError,
    traffic::{TIMEOUT, socket_error},
};

/// How often the receivers look at the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// At most this many pairs a second: steady traffic, not a flood.
pub const PAIRS_PER_SECOND: u32 = 1_000;

/// What was sent and what arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub allowed_sent: u64,
    pub allowed_received: u64,
    pub denied_sent: u64,
    pub denied_delivered: u64,
}

impl Tally {
    /// Allowed datagrams that never arrived (yet).
    pub fn allowed_lost(&self) -> u64 {
        self.allowed_sent - self.allowed_received
    }
}

#[derive(Default)]
struct Counts {
    pairs_sent: AtomicU64,
    allowed_received: AtomicU64,
    denied_delivered: AtomicU64,
}

/// Whether the sender is to hold, and whether it does.
#[derive(Default)]
struct Hold {
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl Hold {
    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, bool)> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Asks the sender to hold; returns once it holds (nothing in flight).
    fn hold(&self, sender_ended: impl Fn() -> bool) {
        let mut state = self.lock();
        state.0 = true;
        while !state.1 && !sender_ended() {
            state = self
                .changed
                .wait_timeout(state, POLL)
                .unwrap_or_else(|poison| poison.into_inner())
                .0;
        }
    }

    fn release(&self) {
        self.lock().0 = false;
        self.changed.notify_all();
    }

    /// The sender's side: waits here while asked to hold.
    fn wait_if_held(&self) {
        let mut state = self.lock();
        if !state.0 {
            return;
        }
        state.1 = true;
        self.changed.notify_all();
        while state.0 {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poison| poison.into_inner());
        }
        state.1 = false;
    }
}

/// The traffic, running until [`Steady::stop`].
pub struct Steady {
    /// Sent (or dropped) to stop the sender; then the receivers stop.
    stop_sending: Option<mpsc::Sender<()>>,
    stop_receiving: Arc<AtomicBool>,
    hold: Arc<Hold>,
    counts: Arc<Counts>,
    sender: Option<JoinHandle<()>>,
    receivers: Vec<JoinHandle<()>>,
}

impl Steady {
    /// Sends from `client` to `allowed` and `denied` (the same address, two
    /// ports) where receivers in `server` count what arrives.
    pub fn start(
        client: &Netns,
        server: &Netns,
        allowed: SocketAddr,
        denied: SocketAddr,
    ) -> Result<Self, TestbedError> {
        let bind = |ns: &Netns, at: SocketAddr| -> Result<UdpSocket, TestbedError> {
            let socket = ns
                .run(|| UdpSocket::bind(at))?
                .map_err(|e| socket_error(ns, e))?;
            socket
                .set_read_timeout(Some(POLL))
                .map_err(|e| socket_error(ns, e))?;
            Ok(socket)
        };
        // Bound to any address: one deleted and added again stays usable.
        let any = |at: SocketAddr| SocketAddr::new(wildcard(at).ip(), at.port());
        let allowed_sink = bind(server, any(allowed))?;
        let denied_sink = bind(server, any(denied))?;
        let sender = bind(client, wildcard(allowed))?;
        let hold = Arc::new(Hold::default());
        let (stop_sending, sender_stopped) = mpsc::channel();
        let stop_receiving = Arc::default();
        let counts = Arc::new(Counts::default());
        let (arrived, arrivals) = mpsc::channel();
        let receivers = vec![
            receive(allowed_sink, &stop_receiving, move || {
                let _ = arrived.send(());
            }),
            receive(denied_sink, &stop_receiving, {
                let counts = Arc::clone(&counts);
                move || {
                    counts.denied_delivered.fetch_add(1, Ordering::Relaxed);
                }
            }),
        ];
        let sender = send_in_step(
            sender,
            (allowed, denied),
            arrivals,
            (sender_stopped, &hold),
            &counts,
        );
        Ok(Self {
            stop_sending: Some(stop_sending),
            stop_receiving,
            hold,
            counts,
            sender: Some(sender),
            receivers,
        })
    }

    /// The counts so far.
    pub fn tally(&self) -> Tally {
        let pairs = self.counts.pairs_sent.load(Ordering::Relaxed);
        Tally {
            allowed_sent: pairs,
            allowed_received: self.counts.allowed_received.load(Ordering::Relaxed),
            denied_sent: pairs,
            denied_delivered: self.counts.denied_delivered.load(Ordering::Relaxed),
        }
    }

    /// Holds the traffic: returns once the sender waits, with nothing in
    /// flight.
    pub fn pause(&self) {
        let sender = self.sender.as_ref();
        self.hold
            .hold(|| sender.is_none_or(JoinHandle::is_finished));
    }

    /// Lets held traffic go on.
    pub fn resume(&self) {
        self.hold.release();
    }

    /// Stops sending, lets the last datagrams arrive, and counts.
    pub fn stop(&mut self) -> Tally {
        self.stop_sending.take();
        self.hold.release();
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
        self.stop_receiving.store(true, Ordering::Relaxed);
        for receiver in self.receivers.drain(..) {
            let _ = receiver.join();
        }
        self.tally()
    }
}

impl Drop for Steady {
    fn drop(&mut self) {
        self.stop_sending.take();
        self.hold.release();
        self.stop_receiving.store(true, Ordering::Relaxed);
    }
}

/// The wildcard address of `at`'s family.
fn wildcard(at: SocketAddr) -> SocketAddr {
    match at {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

/// Calls `arrived` for each datagram `socket` receives, until `stopped`.
fn receive(
    socket: UdpSocket,
    stopped: &Arc<AtomicBool>,
    mut arrived: impl FnMut() + Send + 'static,
) -> JoinHandle<()> {
    let stopped = Arc::clone(stopped);
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stopped.load(Ordering::Relaxed) {
            if socket.recv(&mut buf).is_ok() {
                arrived();
            }
        }
    })
}

/// Sends a denied and an allowed datagram, waits for the allowed one to
/// arrive (at most [`TIMEOUT`]) and for the pair's time slot to end, and
/// again, until `stopped` says so (or is dropped).
fn send_in_step(
    sender: UdpSocket,
    (allowed, denied): (SocketAddr, SocketAddr),
    arrivals: mpsc::Receiver<()>,
    (stopped, hold): (mpsc::Receiver<()>, &Arc<Hold>),
    counts: &Arc<Counts>,
) -> JoinHandle<()> {
    let (hold, counts) = (Arc::clone(hold), Arc::clone(counts));
    let arrive = move |counts: &Counts| {
        if arrivals.recv_timeout(TIMEOUT).is_ok() {
            counts.allowed_received.fetch_add(1, Ordering::Relaxed);
            // Those that came late.
            for () in arrivals.try_iter() {
                counts.allowed_received.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let slot = Duration::from_secs(1) / PAIRS_PER_SECOND;
    thread::spawn(move || {
        loop {
            let started = Instant::now();
            hold.wait_if_held();
            let sent = sender.send_to(b"denied", denied).is_ok()
                && sender.send_to(b"allowed", allowed).is_ok();
            if sent {
                counts.pairs_sent.fetch_add(1, Ordering::Relaxed);
            }
            arrive(&counts);
            let left = slot.saturating_sub(started.elapsed());
            if stopped.recv_timeout(left) != Err(mpsc::RecvTimeoutError::Timeout) {
                return;
            }
        }
    })
}
