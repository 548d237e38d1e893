//! One guest in qemu (TCG: this machine has no KVM): the kernel's console
//! goes to a file, and the second serial port carries commands from the
//! host and their answers (`guest/serve.sh`).

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener},
    os::{
        fd::AsRawFd as _,
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use base64::{Engine as _, prelude::BASE64_STANDARD};

/// How long qemu may take to connect to the control socket (it does so
/// while starting, before the guest runs).
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// How long a boot to the command prompt may take under TCG.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
/// The longest one guest command may take; past it the guest is hung.
const COMMAND_DEADLINE: Duration = Duration::from_secs(130);
/// What the guest says on the control port once it reads commands.
const READY: &str = "vm: ready";
const ANSWER_END: &str = "@@rc=";

/// Guest ports that the host reaches through `127.0.0.1` forwards: the
/// allowed and the denied web port, and SSH (systemd guests run sshd).
pub const FORWARDED: [u16; 3] = [8080, 9000, 22];

pub struct Vm {
    qemu: Qemu,
    machine: Machine,
    work: PathBuf,
    control: UnixStream,
    pub console: PathBuf,
    /// Host ports on 127.0.0.1 forwarded to [`FORWARDED`], in that order.
    pub forwards: [u16; 3],
    /// Seconds from starting qemu to the guest's prompt.
    pub boot_seconds: f64,
}

/// The output and exit status of a guest command.
pub struct Answer {
    pub rc: i32,
    pub output: String,
}

/// What qemu boots.
#[derive(Clone)]
pub struct Machine {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    /// A raw disk image, the guest's `/dev/vda`.
    pub disk: Option<PathBuf>,
    /// Whether a reboot in the guest boots again (else qemu exits).
    pub reboot: bool,
    /// Debian's name of the guest's architecture: `amd64` or `arm64`.
    pub arch: &'static str,
    /// More words for the kernel's command line.
    pub append: String,
}

impl Machine {
    /// qemu for the architecture, with its machine, the console on the
    /// first serial port and `control` as the guest's command channel
    /// (named to the guest's init by `vm.control=` on its command line).
    fn qemu(&self) -> Command {
        let (program, machine, console, control): (_, &[&str], _, &[&str]) = match self.arch {
            // -M virt has one UART: the channel is a virtio console.
            "arm64" => (
                "qemu-system-aarch64",
                &["-machine", "virt", "-cpu", "max,pauth-impdef=on"],
                "ttyAMA0",
                &[
                    "-device",
                    "virtio-serial-pci",
                    "-device",
                    "virtconsole,chardev=control",
                ],
            ),
            _ => (
                "qemu-system-x86_64",
                &["-machine", "q35", "-cpu", "max"],
                "ttyS0",
                &["-serial", "chardev:control"],
            ),
        };
        let channel = if self.arch == "arm64" {
            "/dev/hvc0"
        } else {
            "/dev/ttyS1"
        };
        let mut qemu = Command::new(program);
        qemu.args(machine)
            .args(["-smp", "2", "-m", "1024", "-accel", "tcg", "-nographic"])
            .args(["-monitor", "none", "-serial", "chardev:console"])
            .args(control)
            .arg("-append")
            .arg(format!(
                "console={console} panic=-1 quiet vm.control={channel} {}",
                self.append
            ));
        qemu
    }
}

impl Vm {
    pub fn boot(machine: &Machine, work: &Path) -> anyhow::Result<Self> {
        let started = Instant::now();
        let console = work.join("console.log");
        let socket = work.join("control.sock");
        let _ = fs::remove_file(&socket);
        // Listening before qemu starts, qemu connecting while it starts:
        // the connection exists before the guest can write to it.
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
        let forwards = [free_port()?, free_port()?, free_port()?];
        let mut netdev = "user,id=net0,restrict=on".to_owned();
        for (host, guest) in forwards.iter().zip(FORWARDED) {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        let mut qemu = machine.qemu();
        if !machine.reboot {
            qemu.arg("-no-reboot");
        }
        if let Some(disk) = &machine.disk {
            // The disk is a throwaway copy: no need to flush it.
            qemu.arg("-drive").arg(format!(
                "file={},if=virtio,format=raw,cache=unsafe",
                disk.display()
            ));
        }
        let qemu = qemu
            .arg("-kernel")
            .arg(&machine.vmlinuz)
            .arg("-initrd")
            .arg(&machine.initrd)
            .args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=net0"])
            .arg("-chardev")
            .arg(format!("file,id=console,path={}", console.display()))
            .arg("-chardev")
            .arg(format!("socket,id=control,path={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(work.join("qemu.log"))?)
            .spawn()
            .context("cannot start qemu")?;
        let qemu = Qemu(qemu);
        let control = accept(&listener, CONNECT_DEADLINE).with_context(|| {
            let log = fs::read_to_string(work.join("qemu.log")).unwrap_or_default();
            format!("qemu never connected to its control socket: {}", log.trim())
        })?;
        let mut vm = Self {
            qemu,
            machine: machine.clone(),
            work: work.to_owned(),
            control,
            console,
            forwards,
            boot_seconds: 0.0,
        };
        vm.wait_ready()?;
        vm.boot_seconds = started.elapsed().as_secs_f64();
        Ok(vm)
    }

    /// [`Vm::boot`], once more if it fails: an emulated boot now and then
    /// dies in the guest's clock code.
    pub fn boot_with_retry(machine: &Machine, work: &Path) -> anyhow::Result<Self> {
        Self::boot(machine, work).or_else(|_| Self::boot(machine, work))
    }

    /// Waits for the guest's `vm: ready` line (the whole line, so that
    /// none of it is left for the first answer).
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        self.read_until(BOOT_DEADLINE, |text| {
            text[text.find(READY)?..].contains('\n').then_some(())
        })
        .with_context(|| {
            format!(
                "the guest never said `{READY}`; console:\n{}",
                tail(&self.console)
            )
        })
    }

    /// Reboots the guest with `systemctl reboot` and waits until it reads
    /// commands again; returns the seconds that took.
    pub fn reboot(&mut self) -> anyhow::Result<f64> {
        let started = Instant::now();
        // No answer to wait for: the command channel goes down with the
        // system, and what it said before is skipped up to `ready`.
        let line = BASE64_STANDARD.encode("systemctl reboot");
        self.control.write_all(format!("{line}\n").as_bytes())?;
        self.wait_ready()?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Powers the guest off (`systemctl poweroff`), waits for qemu to exit,
    /// and boots the same machine again with `append` on the kernel's
    /// command line; returns the seconds that took.
    pub fn boot_again(&mut self, append: &str) -> anyhow::Result<f64> {
        let started = Instant::now();
        let line = BASE64_STANDARD.encode("systemctl poweroff");
        self.control.write_all(format!("{line}\n").as_bytes())?;
        // qemu exits with the guest, closing the command channel.
        let closed = self.read_until(BOOT_DEADLINE, |_| None::<()>);
        match closed {
            Err(err) if format!("{err}").contains("closed its control port") => {}
            _ => bail!("the guest did not power off within {BOOT_DEADLINE:?}"),
        }
        self.qemu.0.wait()?;
        let machine = Machine {
            append: append.to_owned(),
            ..self.machine.clone()
        };
        *self = Self::boot_with_retry(&machine, &self.work.clone())?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Runs `script` with the guest's `sh` and returns its output and status.
    pub fn run(&mut self, script: &str) -> anyhow::Result<Answer> {
        let mut line = BASE64_STANDARD.encode(script);
        line.push('\n');
        self.control.write_all(line.as_bytes())?;
        self.read_until(COMMAND_DEADLINE, |text| {
            let at = text.rfind(ANSWER_END)?;
            let end = text[at..].find('\n')?;
            let rc = text[at + ANSWER_END.len()..at + end].trim().parse().ok()?;
            Some(Answer {
                rc,
                output: text[..at].to_owned(),
            })
        })
        .with_context(|| format!("the guest did not answer `{script}`"))
    }

    /// Reads from the control port until `complete` finds what it waits
    /// for in everything read so far, blocking at most until `deadline`.
    fn read_until<T>(
        &mut self,
        deadline: Duration,
        complete: impl Fn(&str) -> Option<T>,
    ) -> anyhow::Result<T> {
        let end = Instant::now() + deadline;
        let mut received = Vec::new();
        let mut buffer = [0u8; 8192];
        loop {
            if let Some(done) = complete(&String::from_utf8_lossy(&received)) {
                return Ok(done);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("nothing complete within {deadline:?}");
            }
            self.control.set_read_timeout(Some(left))?;
            match self.control.read(&mut buffer) {
                Ok(0) => bail!(
                    "the guest closed its control port (console:\n{})",
                    tail(&self.console)
                ),
                Ok(read) => received.extend_from_slice(&buffer[..read]),
                // A signal to this process (vm-test runs two lanes, and
                // children come and go) interrupts a read with a timeout.
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
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

/// The qemu process, killed when the VM is dropped (also on failure).
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Accepts one connection on `listener`, blocking at most `deadline`.
fn accept(listener: &UnixListener, deadline: Duration) -> anyhow::Result<UnixStream> {
    let end = Instant::now() + deadline;
    loop {
        let mut ready = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let left = end.saturating_duration_since(Instant::now());
        let millis = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&raw mut ready, 1, millis) };
        match ready {
            1 => return Ok(listener.accept()?.0),
            0 => bail!("no connection within {deadline:?}"),
            _ => {
                let err = std::io::Error::last_os_error();
                // Interrupted by a signal: poll again for what is left.
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err.into());
                }
            }
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The last lines of the guest's console, for error messages.
fn tail(console: &Path) -> String {
    let text = fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
