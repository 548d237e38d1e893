//! Does replacing a large set stall traffic? A steady UDP stream crosses a
//! veth pair into a receiver whose XDP filter holds a set of a million
//! prefixes; the set is replaced (compile, load, `bpf_link_update`) and the
//! old program and maps are freed, while the receiver stamps every datagram.
//! The longest gap between received datagrams in each phase is the stall.
//! For comparison, a kernel LPM trie of the same prefixes is freed too.

use std::{
    net::UdpSocket,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use filter_agent::{compile::compile, config::GuardAction, loader::AttachMode};
use ipnet::IpNet;
use testbed::Pair;

use crate::{BASELINE_OBJECT, fill_lpm, load, workload};

/// How long each quiet phase lasts (the stream's own jitter).
const QUIET: Duration = Duration::from_millis(500);
/// The sender's pause between datagrams (about 10,000 per second here).
const PACE: Duration = Duration::from_micros(50);
const PORT: u16 = 9999;

/// The longest gap between received datagrams, per phase, in ms.
#[derive(Debug, serde::Serialize)]
pub struct StallRow {
    pub prefixes: usize,
    pub steady_ms: f64,
    pub swap_ms: f64,
    /// Compile, load and `bpf_link_update` of the new set, in s.
    pub swap_s: f64,
    pub teardown_ms: f64,
    pub kernel_lpm_teardown_ms: f64,
    pub sent: u64,
    pub received: u64,
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
        let receiver = pair
            .server
            .run(|| UdpSocket::bind((Pair::SERVER_V4, PORT)))??;
        let sender = pair
            .client
            .run(|| UdpSocket::bind((Pair::CLIENT_V4, 0)))??;
        sender.connect((Pair::SERVER_V4, PORT))?;
        receiver.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stamps = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let sent = thread::spawn({
            let stop = stop.clone();
            move || {
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    sent += u64::from(sender.send(b"stall").is_ok());
                    thread::sleep(PACE);
                }
                sent
            }
        });
        let received = thread::spawn({
            let (stop, stamps) = (stop.clone(), stamps.clone());
            move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if receiver.recv(&mut buf).is_ok() {
                        stamps.lock().unwrap().push(Instant::now());
                    }
                }
            }
        });
        let start = Instant::now();
        thread::sleep(QUIET);
        let swap_start = Instant::now();
        let mut new = load(&compile(&config_of(changed))?)?;
        pair.server
            .run(|| new.attach_pinned(&iface, AttachMode::Auto, &pins))??;
        let swap_end = Instant::now();
        thread::sleep(QUIET);
        let teardown_start = Instant::now();
        drop(old);
        thread::sleep(QUIET);
        let teardown_end = Instant::now();
        let mut lpm = aya::EbpfLoader::new()
            .map_max_entries("PREFIXES", nets.len() as u32)
            .load(BASELINE_OBJECT)?;
        let v4: Vec<IpNet> = nets
            .iter()
            .filter(|net| matches!(net, IpNet::V4(_)))
            .copied()
            .collect();
        fill_lpm::<4>(lpm.map_mut("PREFIXES").context("PREFIXES")?, &v4)?;
        let lpm_start = Instant::now();
        drop(lpm);
        thread::sleep(QUIET);
        let lpm_end = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let sent = sent.join().expect("sender");
        received.join().expect("receiver");
        drop(new);
        let stamps = stamps.lock().unwrap();
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
