//! A long-running child process whose stderr is captured line by line.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use crate::TestbedError;

/// How long a daemon gets to exit after SIGINT before it is killed.
const GRACE: Duration = Duration::from_secs(5);

pub struct Daemon {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    echo: Option<&'static str>,
}

impl Daemon {
    /// Starts `command`; with `echo`, every stderr line is also printed with
    /// that prefix.
    pub fn start(mut command: Command, echo: Option<&'static str>) -> Result<Self, TestbedError> {
        let shown = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| TestbedError::Spawn {
                command: shown,
                source,
            })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
            echo,
        })
    }

    /// Waits until a stderr line contains `needle`; returns that line, or
    /// `None` after `timeout` or when the process closed stderr.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.record(line);
                    if found {
                        return self.seen.last().cloned();
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// [`Daemon::wait_for`] that panics, with every line seen, when the
    /// line does not come: for tests.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        match self.wait_for(needle, timeout) {
            Some(line) => line,
            None => panic!(
                "no line with {needle:?} within {timeout:?}: {:?}",
                self.seen
            ),
        }
    }

    /// Sends SIGINT, waits for the exit, and returns the exit status with
    /// every stderr line seen.
    pub fn stop(mut self) -> (Option<ExitStatus>, Vec<String>) {
        let status = self.interrupt_and_wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.record(line);
        }
        (status, std::mem::take(&mut self.seen))
    }

    /// filter-agent (`binary`) run in `ns` with `args`; returns once it
    /// reports ready (rules attached, metrics served), and panics if it
    /// does not within 10 s.
    pub fn agent<S: AsRef<std::ffi::OsStr>>(
        binary: &str,
        ns: &crate::Netns,
        args: impl IntoIterator<Item = S>,
    ) -> Self {
        let mut command = ns.command(binary);
        command.args(args);
        let mut agent = Self::start(command, None).expect("starting filter-agent");
        agent.expect("ready", Duration::from_secs(10));
        agent
    }

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Every stderr line seen so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    fn record(&mut self, line: String) {
        if let Some(prefix) = self.echo {
            println!("{prefix}{line}");
        }
        self.seen.push(line);
    }

    fn interrupt_and_wait(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.interrupt_and_wait();
    }
}
