//! Does replacing a large set stall traffic? A UDP echo stream crosses a
//! veth pair into a receiver whose XDP filter holds a set of a million
//! prefixes: the client sends a datagram, the server echoes it, the client
//! stamps the echo and sends the next, back to back. The set is replaced
//! (compile, load, `bpf_link_update`) and the old program and maps are
//! freed meanwhile; the longest gap between echoes in each phase is the
//! stall. For comparison, a kernel LPM trie of the same prefixes is freed
//! too.

use std::{
    net::UdpSocket,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use filter_agent::{
    kernel::loader::AttachMode, rules::compile::compile, rules::config::GuardAction,
};
use ipnet::IpNet;
use testbed::Pair;

use crate::{BASELINE_OBJECT, load, sets::fill_lpm, workload};

/// Echoes that make up each phase (the stream's own jitter shows in them
/// too).
const PHASE: u64 = 5_000;
/// How long a phase may take before the stream counts as stopped.
const PHASE_DEADLINE: Duration = Duration::from_secs(30);
/// How long the client waits for an echo before sending again: a lost
/// datagram or echo shows as a gap this long.
const ECHO_WAIT: Duration = Duration::from_millis(100);
const PORT: u16 = 9999;

/// The longest gap between echoes, per phase, in ms.
#[derive(Debug, serde::Serialize)]
pub struct StallRow {
    pub prefixes: usize,
    pub steady_ms: f64,
    pub swap_ms: f64,
    /// Compile, load and `bpf_link_update` of the new set, in s.
    pub swap_s: f64,
    pub teardown_ms: f64,
    pub kernel_lpm_teardown_ms: f64,
    /// Datagrams sent, and echoes back.
    pub sent: u64,
    pub received: u64,
}

/// The echo stream: its echoes' arrival times, their count, and the flag
/// that stops both ends.
struct Stream {
    stop: Arc<AtomicBool>,
    echoes: Arc<AtomicU64>,
    stamps: Arc<Mutex<Vec<Instant>>>,
    threads: (thread::JoinHandle<()>, thread::JoinHandle<u64>),
}

impl Stream {
    fn start(pair: &Pair) -> anyhow::Result<Self> {
        let server = pair
            .server
            .run(|| UdpSocket::bind((Pair::SERVER_V4, PORT)))??;
        let client = pair
            .client
            .run(|| UdpSocket::bind((Pair::CLIENT_V4, 0)))??;
        client.connect((Pair::SERVER_V4, PORT))?;
        for socket in [&server, &client] {
            socket.set_read_timeout(Some(ECHO_WAIT))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new(AtomicU64::new(0));
        let stamps = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let echo = thread::spawn({
            let stop = stop.clone();
            move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = server.recv_from(&mut buf) {
                        let _ = server.send_to(&buf[..len], from);
                    }
                }
            }
        });
        let send = thread::spawn({
            let (stop, echoes, stamps) = (stop.clone(), echoes.clone(), stamps.clone());
            move || {
                let (mut sent, mut buf) = (0u64, [0u8; 64]);
                while !stop.load(Ordering::Relaxed) {
                    sent += u64::from(client.send(b"stall").is_ok());
                    if client.recv(&mut buf).is_ok() {
                        stamps.lock().unwrap().push(Instant::now());
                        echoes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                sent
            }
        });
        Ok(Self {
            stop,
            echoes,
            stamps,
            threads: (echo, send),
        })
    }

    /// Returns once `PHASE` more echoes came back, when that was.
    fn phase(&self, what: &str) -> anyhow::Result<Instant> {
        let target = self.echoes.load(Ordering::Relaxed) + PHASE;
        let done = testbed::within(PHASE_DEADLINE, || {
            self.echoes.load(Ordering::Relaxed) >= target
        });
        ensure!(done, "the echo stream stopped {what}");
        Ok(Instant::now())
    }

    /// Stops both ends; returns the datagrams sent and the echo times.
    fn stop(self) -> (u64, Vec<Instant>) {
        self.stop.store(true, Ordering::Relaxed);
        let (echo, send) = self.threads;
        echo.join().expect("echo thread");
        let sent = send.join().expect("sending thread");
        let stamps = std::mem::take(&mut *self.stamps.lock().unwrap());
        (sent, stamps)
    }
}

pub fn measure(nets: &[IpNet], changed: &[IpNet]) -> anyhow::Result<StallRow> {
    let pair = Pair::create("stl")?;
    let client = IpNet::from(std::net::IpAddr::from(Pair::CLIENT_V4));
    // The stream's source stays out of the set.
    let keep = |nets: &[IpNet]| -> Vec<IpNet> {
        let outside = nets
            .iter()
            .filter(|net| !net.contains(&client) && !client.contains(*net));
        outside.copied().collect()
    };
    let config_of = |nets: &[IpNet]| {
        let mut config = workload::address_list(&keep(nets));
        config.guard.action = GuardAction::Off;
        config
    };
    let pins =
        std::path::PathBuf::from(format!("/sys/fs/bpf/fa-bench-stall-{}", std::process::id()));
    std::fs::create_dir_all(&pins)?;
    let result = (|| {
        let mut old = load(&compile(&config_of(nets))?)?;
        let iface = pair.server_if.clone();
        pair.server
            .run(|| old.attach_pinned(&iface, AttachMode::Auto, &pins))??;
        let stream = Stream::start(&pair)?;
        let start = Instant::now();
        let swap_start = stream.phase("before the swap")?;
        let mut new = load(&compile(&config_of(changed))?)?;
        pair.server
            .run(|| new.attach_pinned(&iface, AttachMode::Auto, &pins))??;
        let swap_end = Instant::now();
        stream.phase("after the swap")?;
        let teardown_start = Instant::now();
        drop(old);
        let teardown_end = stream.phase("while the old set was freed")?;
        let lpm = kernel_lpm(nets)?;
        let lpm_start = Instant::now();
        drop(lpm);
        let lpm_end = stream.phase("while a kernel LPM trie was freed")?;
        let (sent, stamps) = stream.stop();
        drop(new);
        let longest = |from: Instant, to: Instant| {
            let gaps = stamps
                .windows(2)
                .filter(|pair| pair[1] > from && pair[0] < to);
            let longest = gaps
                .map(|pair| pair[1] - pair[0])
                .max()
                .unwrap_or(to - from);
            longest.as_secs_f64() * 1e3
        };
        Ok(StallRow {
            prefixes: nets.len(),
            steady_ms: longest(start, swap_start),
            swap_ms: longest(swap_start, swap_end),
            swap_s: (swap_end - swap_start).as_secs_f64(),
            teardown_ms: longest(teardown_start, teardown_end),
            kernel_lpm_teardown_ms: longest(lpm_start, lpm_end),
            sent,
            received: stamps.len() as u64,
        })
    })();
    let _ = std::fs::remove_dir_all(&pins);
    result
}

/// The IPv4 prefixes of `nets` in a kernel LPM trie, to time its freeing.
fn kernel_lpm(nets: &[IpNet]) -> anyhow::Result<aya::Ebpf> {
    let mut lpm = aya::EbpfLoader::new()
        .map_max_entries("PREFIXES", nets.len() as u32)
        .load(BASELINE_OBJECT)?;
    let v4: Vec<IpNet> = nets
        .iter()
        .filter(|net| matches!(net, IpNet::V4(_)))
        .copied()
        .collect();
    fill_lpm::<4>(lpm.map_mut("PREFIXES").context("PREFIXES")?, &v4)?;
    Ok(lpm)
}
