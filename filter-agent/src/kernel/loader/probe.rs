//! Running packets through a loaded, unattached instance
//! (BPF_PROG_TEST_RUN): `filter-agent test` and `replay`, the tests and the
//! benchmark. Nothing here is on the agent's path.

use aya::{
    maps::{Array, RingBuf},
    programs::{TestRun as _, TestRunOptions, TestRunResult, Xdp},
};
use filter_common::{Counter, Event, names};

use super::{Filter, LoadError, map_mut, missing_map};
use filter_common::Outcome;

/// XDP actions as BPF_PROG_TEST_RUN reports them (the kernel's `enum
/// xdp_action`, which the program returns through aya-ebpf's bindings).
pub mod xdp_action {
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
}

impl Filter {
    /// Runs `frame` through the loaded program (BPF_PROG_TEST_RUN) and
    /// returns the XDP action it chose.
    pub fn run_packet(&self, frame: &[u8]) -> Result<u32, LoadError> {
        Ok(test_run(self.program()?, frame, 1)?.return_value)
    }

    /// Runs `frame` `repeat` times and returns the kernel's mean time per run.
    pub fn time_packet(&self, frame: &[u8], repeat: u32) -> Result<std::time::Duration, LoadError> {
        time_program(self.program()?, frame, repeat)
    }

    fn program(&self) -> Result<&Xdp, LoadError> {
        let program = self
            .ebpf
            .program(names::PROGRAM)
            .ok_or(LoadError::MissingProgram(names::PROGRAM))?;
        Ok(program.try_into()?)
    }

    /// Runs `frame` through an instance from [`Filter::load_traced`] and
    /// reports the XDP action and the slot the program recorded: one map
    /// read, however many rules there are.
    pub fn trace_frame(&self, frame: &[u8]) -> Result<(u32, Outcome), LoadError> {
        let action = self.run_packet(frame)?;
        Ok((action, self.last_outcome()?))
    }

    /// What the last packet through an instance from
    /// [`Filter::load_traced`] was counted as.
    pub fn last_outcome(&self) -> Result<Outcome, LoadError> {
        let map = self
            .ebpf
            .map(names::LAST_DECISION)
            .ok_or_else(|| missing_map(names::LAST_DECISION))?;
        let decision = Array::<_, u32>::try_from(map)?.get(&0, 0)?;
        Ok(Outcome::from_slot(decision))
    }

    /// [`Filter::trace_frame`] at `clock_ns` (see [`Filter::set_clock`]).
    pub fn trace_frame_at(
        &mut self,
        frame: &[u8],
        clock_ns: u64,
    ) -> Result<(u32, Outcome), LoadError> {
        self.set_clock(clock_ns)?;
        self.trace_frame(frame)
    }

    /// Sets the clock that rate limits decide by in an instance from
    /// [`Filter::load_traced`] (others read the kernel's): a capture
    /// replays at its own pace, a test at the times it chooses.
    pub fn set_clock(&mut self, clock_ns: u64) -> Result<(), LoadError> {
        super::fill_array(&mut self.ebpf, names::CLOCK, [(0, clock_ns)])
    }

    /// Runs `frame` through the program and reports the XDP action and the
    /// one counter it moved (which rule, or why no rule decided).
    pub fn classify_frame(&self, frame: &[u8]) -> Result<(u32, Outcome), LoadError> {
        let reasons = self.counters()?;
        let rules = self.rule_counters()?;
        let over_limit = self.over_limit_counters()?;
        let action = self.run_packet(frame)?;
        let moved = changed(&reasons, &self.counters()?)
            .map(|index| Outcome::Reason(index as u32))
            .chain(changed(&rules, &self.rule_counters()?).map(Outcome::Rule))
            .chain(changed(&over_limit, &self.over_limit_counters()?).map(Outcome::OverLimit))
            .collect::<Vec<_>>();
        match moved.as_slice() {
            [outcome] => Ok((action, *outcome)),
            _ => Err(LoadError::Counted(moved.len())),
        }
    }

    /// Takes the events waiting in this instance's ring buffer (those of an
    /// agent are read by the agent; this is for instances of one's own).
    pub fn take_events(&mut self) -> Result<Vec<Event>, LoadError> {
        let map = map_mut(&mut self.ebpf, names::EVENTS)?;
        let mut ring = RingBuf::try_from(map)?;
        let mut taken = Vec::new();
        while let Some(item) = ring.next() {
            taken.extend(crate::kernel::events::decode(&item));
        }
        Ok(taken)
    }
}

/// The indexes where `before` and `after` differ.
fn changed<'a>(before: &'a [Counter], after: &'a [Counter]) -> impl Iterator<Item = usize> + 'a {
    (0..before.len()).filter(|&index| before[index] != after[index])
}

/// Runs `frame` through any loaded XDP program `repeat` times
/// (BPF_PROG_TEST_RUN) and returns the kernel's mean time per run.
pub fn time_program(
    program: &Xdp,
    frame: &[u8],
    repeat: u32,
) -> Result<std::time::Duration, LoadError> {
    Ok(test_run(program, frame, repeat)?.duration)
}

/// Runs `frame` through any loaded XDP program once; returns its verdict
/// (an [`xdp_action`]).
pub fn program_verdict(program: &Xdp, frame: &[u8]) -> Result<u32, LoadError> {
    Ok(test_run(program, frame, 1)?.return_value)
}

fn test_run(program: &Xdp, frame: &[u8], repeat: u32) -> Result<TestRunResult, LoadError> {
    Ok(program.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    })?)
}
