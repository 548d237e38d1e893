//! Steady traffic through a filter, counted where it arrives: an allowed
//! and a denied datagram at a time, the next pair sent once the allowed one
//! has arrived (or after [`TIMEOUT`]), until stopped. Whether the filter
//! ever lost an allowed packet or let a denied one through, as a receiver
//! sees it.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::{Netns, TestbedError, traffic::TIMEOUT};

/// How often the receivers look at the stop flag.
const POLL: Duration = Duration::from_millis(20);

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

/// The traffic, running until [`Steady::stop`].
pub struct Steady {
    /// Set to stop: the sender first, then the receivers.
    stop_sending: Arc<AtomicBool>,
    stop_receiving: Arc<AtomicBool>,
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
        let allowed_sink = bind(server, allowed)?;
        let denied_sink = bind(server, denied)?;
        let sender = bind(client, wildcard(allowed))?;
        let (stop_sending, stop_receiving) = (Arc::default(), Arc::default());
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
        let sender = send_in_step(sender, (allowed, denied), arrivals, &stop_sending, &counts);
        Ok(Self {
            stop_sending,
            stop_receiving,
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

    /// Stops sending, lets the last datagrams arrive, and counts.
    pub fn stop(mut self) -> Tally {
        self.stop_sending.store(true, Ordering::Relaxed);
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
        self.stop_sending.store(true, Ordering::Relaxed);
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
/// arrive (at most [`TIMEOUT`]), and again, until `stopped`.
fn send_in_step(
    sender: UdpSocket,
    (allowed, denied): (SocketAddr, SocketAddr),
    arrivals: mpsc::Receiver<()>,
    stopped: &Arc<AtomicBool>,
    counts: &Arc<Counts>,
) -> JoinHandle<()> {
    let (stopped, counts) = (Arc::clone(stopped), Arc::clone(counts));
    let arrive = move |counts: &Counts| {
        if arrivals.recv_timeout(TIMEOUT).is_ok() {
            counts.allowed_received.fetch_add(1, Ordering::Relaxed);
            // Those that came late.
            for () in arrivals.try_iter() {
                counts.allowed_received.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            let sent = sender.send_to(b"denied", denied).is_ok()
                && sender.send_to(b"allowed", allowed).is_ok();
            if sent {
                counts.pairs_sent.fetch_add(1, Ordering::Relaxed);
            }
            arrive(&counts);
        }
    })
}

fn socket_error(ns: &Netns, source: io::Error) -> TestbedError {
    TestbedError::Socket {
        name: ns.name().to_owned(),
        source,
    }
}
