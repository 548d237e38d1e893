//! The sender: a one-instruction XDP_TX program run with
//! BPF_PROG_TEST_RUN live frames, and what a run cost the machine.

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

use super::*;

/// Some kernels (sandboxed ones) refuse to send packets from
/// BPF_PROG_TEST_RUN at all; nothing here can run then.
#[derive(Debug)]
pub struct LiveFramesRefused(std::io::Error);

impl std::fmt::Display for LiveFramesRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this kernel refuses XDP live frames (BPF_PROG_TEST_RUN with \
             BPF_F_TEST_XDP_LIVE_FRAMES: {}), the only way this harness sends packets",
            self.0
        )
    }
}

impl std::error::Error for LiveFramesRefused {}

/// Sends one batch of a frame: a kernel that refuses live frames with
/// EPERM is [`LiveFramesRefused`], any other failure stays what it is.
pub(super) fn refuses_live_frames(pair: &Pair, macs: ([u8; 6], [u8; 6])) -> anyhow::Result<()> {
    let frame = addressed(&[0; FRAME_BYTES], macs)?;
    let sender = Sender::new(&[frame])?;
    let sent = pair
        .client
        .run(|| sender.send(if_index(&pair.client_if)?, BATCH))?;
    match sent {
        Ok(_) => Ok(()),
        Err(err) => {
            let refused = err
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .find(|io| io.raw_os_error() == Some(libc::EPERM));
            match refused {
                Some(io) => Err(LiveFramesRefused(std::io::Error::from_raw_os_error(
                    io.raw_os_error().unwrap_or(libc::EPERM),
                ))
                .into()),
                None => Err(err),
            }
        }
    }
}

pub(super) fn if_index(iface: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: `name` is a valid NUL-terminated string for the whole call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(index != 0, "no interface {iface}");
    Ok(index)
}

/// What one run sent, and what it cost.
pub(super) struct Sample {
    pub(super) packets: u64,
    /// Busy time of the whole machine during the run.
    pub(super) cpu_ns: u64,
    /// The kernel's own timing of its send loop.
    pub(super) kernel_ns_per_packet: f64,
}

/// The `transmit` program with the frames it sends in turn.
pub(super) struct Sender {
    pub(super) ebpf: Ebpf,
    pub(super) frames: u32,
}

impl Sender {
    pub(super) fn new(frames: &[Vec<u8>]) -> anyhow::Result<Self> {
        let count = u32::try_from(frames.len())?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(sender::FRAMES, count)
            .load(BASELINE_OBJECT)?;
        let map = ebpf.map_mut(sender::FRAMES).context("FRAMES map")?;
        let mut array = Array::<_, [u8; FRAME_BYTES]>::try_from(map)?;
        for (index, frame) in (0..).zip(frames) {
            array.set(index, <[u8; FRAME_BYTES]>::try_from(frame.as_slice())?, 0)?;
        }
        let transmit: &mut Xdp = ebpf
            .program_mut("transmit")
            .context("transmit program")?
            .try_into()?;
        transmit.load()?;
        Ok(Self {
            ebpf,
            frames: count,
        })
    }

    /// Sends `count` frames out of `ifindex` (live frames: the XDP_TX
    /// verdict is carried out), `BATCH` at a time; returns the kernel's
    /// time per frame.
    pub(super) fn send(&self, ifindex: u32, count: u32) -> anyhow::Result<f64> {
        let transmit: &Xdp = self
            .ebpf
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

    /// Frames per run, so that a run takes about `seconds`: a whole number
    /// of rounds over the mix, at least one batch of each frame.
    pub(super) fn calibrate(&self, ifindex: u32, seconds: f64) -> anyhow::Result<u32> {
        let probe = self.frames * BATCH;
        let ns_per_packet = self.send(ifindex, probe)?;
        let rounds = (seconds * 1e9 / ns_per_packet / f64::from(self.frames)) as u32;
        Ok(rounds.clamp(BATCH, u32::MAX / self.frames) * self.frames)
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
        let kernel_ns_per_packet = self.send(ifindex, count)?;
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
            kernel_ns_per_packet,
        })
    }
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
