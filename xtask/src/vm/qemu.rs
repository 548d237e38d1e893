//! One guest in qemu (TCG: this machine has no KVM): the kernel's console
//! goes to a file, and the second serial port carries commands from the
//! host and their answers (`guest/serve.sh`).

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use base64::{Engine as _, prelude::BASE64_STANDARD};

/// How long a boot to the command prompt may take under TCG.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
/// A little more than the guest's own limit on one command (serve.sh).
const COMMAND_DEADLINE: Duration = Duration::from_secs(130);
const ANSWER_END: &str = "@@rc=";

/// Guest ports that the host reaches through `127.0.0.1` forwards.
pub const FORWARDED: [u16; 2] = [8080, 9000];

pub struct Vm {
    qemu: Child,
    control: UnixStream,
    pub console: PathBuf,
    /// Host ports on 127.0.0.1 forwarded to [`FORWARDED`], in that order.
    pub forwards: [u16; 2],
    /// Seconds from starting qemu to the guest's prompt.
    pub boot_seconds: f64,
}

/// The output and exit status of a guest command.
pub struct Answer {
    pub rc: i32,
    pub output: String,
}

impl Vm {
    pub fn boot(vmlinuz: &Path, initrd: &Path, work: &Path) -> anyhow::Result<Self> {
        let started = Instant::now();
        let console = work.join("console.log");
        let socket = work.join("control.sock");
        let _ = fs::remove_file(&socket);
        let forwards = [free_port()?, free_port()?];
        let netdev = format!(
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{}-:{},hostfwd=tcp:127.0.0.1:{}-:{}",
            forwards[0], FORWARDED[0], forwards[1], FORWARDED[1]
        );
        let qemu = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35", "-cpu", "max", "-smp", "2", "-m", "1024"])
            .args([
                "-accel",
                "tcg",
                "-nographic",
                "-no-reboot",
                "-monitor",
                "none",
            ])
            .arg("-kernel")
            .arg(vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=net0"])
            .arg("-chardev")
            .arg(format!("file,id=console,path={}", console.display()))
            .args(["-serial", "chardev:console"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=control,path={},server=on,wait=off",
                socket.display()
            ))
            .args(["-serial", "chardev:control"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start qemu-system-x86_64")?;
        let mut vm_guard = KillOnDrop(Some(qemu));
        let control = wait_for(BOOT_DEADLINE, "qemu's control socket", || {
            UnixStream::connect(&socket).ok()
        })?;
        wait_for(
            BOOT_DEADLINE,
            "the guest's `vm: ready` on its console",
            || {
                let text = fs::read_to_string(&console).unwrap_or_default();
                text.contains("vm: ready").then_some(())
            },
        )
        .with_context(|| format!("console:\n{}", tail(&console)))?;
        control.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Self {
            qemu: vm_guard.0.take().expect("qemu is running"),
            control,
            console,
            forwards,
            boot_seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Runs `script` with the guest's `sh` and returns its output and status.
    pub fn run(&mut self, script: &str) -> anyhow::Result<Answer> {
        let mut line = BASE64_STANDARD.encode(script);
        line.push('\n');
        self.control.write_all(line.as_bytes())?;
        let deadline = Instant::now() + COMMAND_DEADLINE;
        let mut received = Vec::new();
        let mut buffer = [0u8; 8192];
        loop {
            let text = String::from_utf8_lossy(&received);
            if let Some(at) = text.rfind(ANSWER_END)
                && let Some(end) = text[at..].find('\n')
            {
                let rc = text[at + ANSWER_END.len()..at + end].trim().parse()?;
                return Ok(Answer {
                    rc,
                    output: text[..at].to_owned(),
                });
            }
            if Instant::now() > deadline {
                bail!("the guest did not answer `{script}` within {COMMAND_DEADLINE:?}");
            }
            match self.control.read(&mut buffer) {
                Ok(0) => bail!(
                    "the guest closed its control port (console:\n{})",
                    tail(&self.console)
                ),
                Ok(read) => received.extend_from_slice(&buffer[..read]),
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Runs `script` and fails unless it exits 0; returns its output.
    pub fn ok(&mut self, script: &str) -> anyhow::Result<String> {
        let answer = self.run(script)?;
        if answer.rc != 0 {
            bail!("`{script}` exited {}: {}", answer.rc, answer.output.trim());
        }
        Ok(answer.output)
    }

    /// Runs `script` until its output satisfies `done`, for at most
    /// `deadline`; the error names `what` and the last output.
    pub fn wait_until(
        &mut self,
        what: &str,
        deadline: Duration,
        script: &str,
        done: impl Fn(&Answer) -> bool,
    ) -> anyhow::Result<String> {
        let end = Instant::now() + deadline;
        loop {
            let answer = self.run(script)?;
            if done(&answer) {
                return Ok(answer.output);
            }
            if Instant::now() > end {
                bail!(
                    "{what} never happened within {deadline:?}; last output: {}",
                    answer.output.trim()
                );
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `probe` every 50 ms until it returns something or `deadline` passes.
pub fn wait_for<T>(
    deadline: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if Instant::now() > end {
            bail!("{what} never came within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The last lines of the guest's console, for error messages.
pub fn tail(console: &Path) -> String {
    let text = fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
