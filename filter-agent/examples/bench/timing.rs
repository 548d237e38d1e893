//! Timing programs on frames: rounds repeated until their spread is small,
//! medians and quartiles, one CPU.

use std::time::Duration;

use filter_agent::kernel::loader::Filter;

/// Times one frame through one program.
pub(crate) type Timer<'a> = Box<dyn Fn(&[u8]) -> anyhow::Result<Duration> + 'a>;

/// A program to time, and the frames to time it on.
pub(crate) struct Subject<'a> {
    pub(crate) frames: &'a [Vec<u8>],
    pub(crate) time: Timer<'a>,
}

/// A row's result: the median over rounds of the mean ns/packet, and the
/// spread of the rounds (interquartile range over the median).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub(crate) struct Measured {
    pub(crate) ns: f64,
    pub(crate) spread: f64,
}

impl std::fmt::Display for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = format!("{:.1} ±{:.1}%", self.ns, self.spread * 100.0);
        f.pad(&text)
    }
}

/// The spread a row must get under before the rounds stop.
pub(crate) const MAX_SPREAD: f64 = 0.05;

/// Mean ns/packet over each subject's frames, one per round: `runs`
/// rounds, then `runs` more while any row's spread is over `MAX_SPREAD`
/// (at most `4 * runs` in all; the spread is reported either way). Every
/// round times every subject, so drift on a shared VM hits all of them
/// alike instead of whichever happened to run during it.
pub(crate) fn measure(runs: usize, subjects: &[Subject<'_>]) -> anyhow::Result<Vec<Rounds>> {
    let mut rounds: Vec<Rounds> = vec![Rounds(Vec::new()); subjects.len()];
    loop {
        for _ in 0..runs {
            for (subject, rounds) in subjects.iter().zip(&mut rounds) {
                let mut total = 0.0;
                for frame in subject.frames {
                    total += (subject.time)(frame)?.as_nanos() as f64;
                }
                rounds.0.push(total / subject.frames.len() as f64);
            }
        }
        let stable = rounds.iter().all(|row| row.summary().spread < MAX_SPREAD);
        if stable || rounds[0].0.len() >= 4 * runs {
            return Ok(rounds);
        }
    }
}

/// One subject's mean ns/packet in each round.
#[derive(Clone)]
pub(crate) struct Rounds(Vec<f64>);

impl Rounds {
    pub(crate) fn summary(&self) -> Measured {
        let quartiles = Quartiles::of(self.0.clone());
        Measured {
            ns: quartiles.median,
            spread: (quartiles.high - quartiles.low) / quartiles.median,
        }
    }

    /// `pair` of this subject's and `other`'s mean in each round: measured
    /// moments apart, the two share the round's drift, which a comparison
    /// of their medians over all rounds does not cancel.
    pub(crate) fn paired(&self, other: &Rounds, pair: impl Fn(f64, f64) -> f64) -> Quartiles {
        Quartiles::of(
            self.0
                .iter()
                .zip(&other.0)
                .map(|(&a, &b)| pair(a, b))
                .collect(),
        )
    }
}

/// The median and the quartiles around it.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub(crate) struct Quartiles {
    pub(crate) median: f64,
    pub(crate) low: f64,
    pub(crate) high: f64,
}

impl Quartiles {
    pub(crate) fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let at = |fraction: f64| values[((values.len() - 1) as f64 * fraction).round() as usize];
        Quartiles {
            median: at(0.5),
            low: at(0.25),
            high: at(0.75),
        }
    }
}

/// BPF_PROG_TEST_RUN runs on the calling CPU: stay on one.
pub(crate) fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; the calls only read `set`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Times `filter` on a frame, `repeat` runs.
pub(crate) fn filter_timer(filter: &Filter, repeat: u32) -> Timer<'_> {
    Box::new(move |frame| Ok(filter.time_packet(frame, repeat)?))
}
