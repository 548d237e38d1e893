//! The sender: a one-instruction XDP_TX program run with
//! BPF_PROG_TEST_RUN live frames, or an AF_PACKET socket where the kernel
//! refuses those; and what a run cost the machine.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use filter_common::sender::{self, FRAME_BYTES};
use testbed::{Pair, within};

use crate::BASELINE_OBJECT;

/// How long the receiver may take to count the last batch.
const SETTLE: Duration = Duration::from_secs(2);
/// Frames the first round sends to time the sender, at least.
const PROBE: u32 = 60 * BATCH;

use super::{socket, *};

/// Live frames where this kernel sends them from BPF_PROG_TEST_RUN, the
/// socket where it answers EPERM (some sandboxed kernels do, for any
/// program), said in one line. Any other failure stays what it is.
pub(super) fn sending_path(pair: &Pair, macs: ([u8; 6], [u8; 6])) -> anyhow::Result<SendPath> {
    let frame = addressed(&[0; FRAME_BYTES], macs)?;
    let sender = Sender::new(&[frame], SendPath::LiveFrames)?;
    let sent = pair
        .client
        .run(|| sender.send(if_index(&pair.client_if)?, BATCH))?;
    let Err(err) = sent else {
        return Ok(SendPath::LiveFrames);
    };
    let refused = err
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.raw_os_error() == Some(libc::EPERM));
    if !refused {
        return Err(err);
    }
    println!(
        "(this kernel refuses XDP live frames: an AF_PACKET socket sends instead, \
         which adds an skb per frame on both sides, the same for every receiver)"
    );
    Ok(SendPath::PacketSocket)
}

pub(super) fn if_index(iface: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: `name` is a valid NUL-terminated string for the whole call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(index != 0, "no interface {iface}");
    Ok(index)
}

/// How frames leave the sender's veth.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum SendPath {
    /// `transmit` with live frames: no skb on the sending side.
    LiveFrames,
    /// An AF_PACKET socket (see `socket`).
    PacketSocket,
}

/// What one run sent, and what it cost.
pub(super) struct Sample {
    pub(super) packets: u64,
    /// Busy time of the whole machine during the run.
    pub(super) cpu_ns: u64,
    /// The sender's timing of its send loop (the kernel's, for live frames).
    pub(super) sender_ns_per_packet: f64,
    /// Packets a rate limit dropped, where the receiver counts them.
    pub(super) over_limit: u64,
}

/// The frames a run sends in turn, and what sends them.
pub(super) struct Sender {
    /// `transmit` with the frames in its map, for live frames.
    ebpf: Option<Ebpf>,
    /// The frames themselves, for the socket.
    frames: Vec<[u8; FRAME_BYTES]>,
}

impl Sender {
    pub(super) fn new(frames: &[Vec<u8>], path: SendPath) -> anyhow::Result<Self> {
        let frames: Vec<[u8; FRAME_BYTES]> = frames
            .iter()
            .map(|frame| <[u8; FRAME_BYTES]>::try_from(frame.as_slice()))
            .collect::<Result<_, _>>()?;
        let ebpf = match path {
            SendPath::LiveFrames => Some(transmit_program(&frames)?),
            SendPath::PacketSocket => None,
        };
        Ok(Self { ebpf, frames })
    }

    fn count(&self) -> u32 {
        self.frames.len() as u32
    }

    /// Sends `count` frames out of `ifindex`; returns the sender's time per
    /// frame (the kernel's timing of its loop for live frames).
    pub(super) fn send(&self, ifindex: u32, count: u32) -> anyhow::Result<f64> {
        match &self.ebpf {
            Some(ebpf) => send_live(ebpf, ifindex, count),
            None => socket::send(&self.frames, ifindex, count),
        }
    }

    /// Frames per run, so that a run takes about `seconds`: a whole number
    /// of rounds over the frames, and at least `PROBE` frames.
    pub(super) fn calibrate(&self, ifindex: u32, seconds: f64) -> anyhow::Result<u32> {
        let frames = self.count();
        let fewest = PROBE.div_ceil(frames);
        let ns_per_packet = self.send(ifindex, fewest * frames)?;
        let rounds = (seconds * 1e9 / ns_per_packet / f64::from(frames)) as u32;
        Ok(rounds.clamp(fewest, u32::MAX / frames) * frames)
    }

    /// Sends `count` frames and waits until `classified` (the receiver's
    /// count since the start) has them all, so that the softirq work the
    /// last batch scheduled lands in this sample's CPU time.
    pub(super) fn run(
        &self,
        ifindex: u32,
        count: u32,
        classified: impl Fn() -> anyhow::Result<u64>,
    ) -> anyhow::Result<Sample> {
        let cpu_before = busy_cpu_ns()?;
        let sender_ns_per_packet = self.send(ifindex, count)?;
        let all = within(SETTLE, || {
            classified().is_ok_and(|seen| seen >= u64::from(count))
        });
        ensure!(
            all,
            "the receiver did not classify all {count} frames within {SETTLE:?}"
        );
        Ok(Sample {
            packets: u64::from(count),
            cpu_ns: busy_cpu_ns()? - cpu_before,
            sender_ns_per_packet,
            over_limit: 0,
        })
    }
}

/// `transmit` loaded, with `frames` in its map.
fn transmit_program(frames: &[[u8; FRAME_BYTES]]) -> anyhow::Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(sender::FRAMES, u32::try_from(frames.len())?)
        .load(BASELINE_OBJECT)?;
    let map = ebpf.map_mut(sender::FRAMES).context("FRAMES map")?;
    let mut array = Array::<_, [u8; FRAME_BYTES]>::try_from(map)?;
    for (index, frame) in (0..).zip(frames) {
        array.set(index, *frame, 0)?;
    }
    let transmit: &mut Xdp = ebpf
        .program_mut("transmit")
        .context("transmit program")?
        .try_into()?;
    transmit.load()?;
    Ok(ebpf)
}

/// Sends `count` frames out of `ifindex` with live frames (the XDP_TX
/// verdict is carried out), `BATCH` at a time; returns the kernel's time
/// per frame.
fn send_live(ebpf: &Ebpf, ifindex: u32, count: u32) -> anyhow::Result<f64> {
    let transmit: &Xdp = ebpf
        .program("transmit")
        .context("transmit program")?
        .try_into()?;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex. Live frames need data_end and the
    // interface the frames "arrived" on (and so are transmitted from).
    let mut context = [0u8; 24];
    context[4..8].copy_from_slice(&(FRAME_BYTES as u32).to_ne_bytes());
    context[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let template = [0u8; FRAME_BYTES];
    let result = transmit.test_run(TestRunOptions {
        data_in: Some(&template),
        ctx_in: Some(&context),
        repeat: count,
        attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
        ..TestRunOptions::new()
    })?;
    Ok(result.duration.as_nanos() as f64)
}

/// Busy time of all CPUs together (/proc/stat: user, nice, system, irq
/// and softirq; not idle, iowait or the hypervisor's steal), in ns.
fn busy_cpu_ns() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(ticks.len() >= 8, "unexpected /proc/stat: {line}");
    let busy: u64 = ticks[..7].iter().sum::<u64>() - ticks[3] - ticks[4];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(busy * 1_000_000_000 / hz)
}
