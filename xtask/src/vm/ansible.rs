//! The Ansible rollout of `packaging/ansible` (Debian's ansible-core on
//! this host) over real SSH to two Debian 12 guests with systemd, as an
//! operator runs it: a first rollout installs the package and enforces
//! good rules on both hosts; then a change that denies SSH goes on trial
//! on host 1, the controller cannot reach it through the new rules, the
//! play stops there, host 1 reverts by itself and answers SSH again, and
//! host 2 is never touched.

use std::{
    fmt::Write as _,
    fs,
    io::Read as _,
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::{Report, observe::host_get, qemu::Vm};
use crate::util::workspace_root;

/// How long rules stay on trial in the bad change, and how long the
/// controller tries to reach the host through them.
const TRY_TIMEOUT: u64 = 40;
const RECONNECT_TIMEOUT: u64 = 15;
/// Rules that keep SSH (and the allowed web port); 9000 is denied.
const GOOD_RULES: &str = "[filter]\ndefault = \"deny\"\n\n[[rule]]\nname = \"ssh\"\naction = \"allow\"\nproto = \"tcp\"\ndport = 22\n\n[[rule]]\nname = \"web\"\naction = \"allow\"\nproto = \"tcp\"\ndport = 8080\n";
/// A change that forgets SSH (and opens 9000, so that it shows where it
/// is in force).
const BAD_RULES: &str = "[filter]\ndefault = \"deny\"\n\n[[rule]]\nname = \"web\"\naction = \"allow\"\nproto = \"tcp\"\ndport = [8080, 9000]\n";

/// The controller's side: a key, the inventory, the rules templates.
pub struct Controller {
    dir: PathBuf,
    pub public_key: String,
}

impl Controller {
    /// Makes (or reuses) root's SSH key pair for the guests.
    pub fn new(target: &Path) -> anyhow::Result<Self> {
        let dir = target.join("ansible");
        fs::create_dir_all(&dir)?;
        let key = dir.join("id_ed25519");
        if !key.exists() {
            crate::util::run(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", "vm-test", "-f"])
                    .arg(&key),
            )?;
        }
        let public_key = fs::read_to_string(key.with_extension("pub"))?;
        fs::write(dir.join("good.toml.j2"), GOOD_RULES)?;
        fs::write(dir.join("bad.toml.j2"), BAD_RULES)?;
        Ok(Self { dir, public_key })
    }

    /// Writes the inventory for `hosts` (their SSH forwards) filtering `nic`.
    fn inventory(&self, hosts: &[&Vm], nic: &str) -> anyhow::Result<PathBuf> {
        let mut text = String::from("[filter_agent]\n");
        for (index, vm) in hosts.iter().enumerate() {
            writeln!(text, "host{} ansible_port={}", index + 1, vm.forwards[2])?;
        }
        write!(
            text,
            "\n[filter_agent:vars]\nansible_host=127.0.0.1\nansible_user=root\n\
             ansible_ssh_private_key_file={}\n\
             ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n\
             ansible_python_interpreter=/usr/bin/python3\nfilter_agent_interfaces=[\"{nic}\"]\n",
            self.dir.join("id_ed25519").display()
        )?;
        let path = self.dir.join("inventory.ini");
        fs::write(&path, text)?;
        Ok(path)
    }

    /// `ansible-playbook site.yml` with `rules` and `extra` variables.
    fn play(
        &self,
        inventory: &Path,
        deb: &Path,
        rules: &str,
        extra: &[&str],
    ) -> anyhow::Result<Output> {
        let playbook = workspace_root().join("packaging/ansible/site.yml");
        let mut command = Command::new("ansible-playbook");
        command
            .arg("-i")
            .arg(inventory)
            .arg(&playbook)
            .arg("-e")
            .arg(format!("filter_agent_deb={}", deb.display()))
            .arg("-e")
            .arg(format!(
                "filter_agent_rules_template={}",
                self.dir.join(rules).display()
            ))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_LOCAL_TEMP", self.dir.join("tmp"));
        for variable in extra {
            command.arg("-e").arg(variable);
        }
        command.output().context("cannot run ansible-playbook")
    }
}

/// Both rollouts against `hosts` (two booted guests), one line each.
pub fn run(controller: &Controller, hosts: &mut [Vm; 2], deb: &Path, report: &mut Report) {
    let nic = match hosts[0].ok("ls /sys/class/net | grep '^en'") {
        Ok(nic) => nic.trim().to_owned(),
        Err(err) => {
            report.record("ansible: the hosts' NIC", Err(err));
            return;
        }
    };
    let inventory = match controller.inventory(&[&hosts[0], &hosts[1]], &nic) {
        Ok(inventory) => inventory,
        Err(err) => {
            report.record("ansible: inventory", Err(err));
            return;
        }
    };
    let first = first_rollout(controller, &inventory, hosts, deb);
    if report.record("ansible: first rollout enforces on both hosts", first) {
        report.record(
            "ansible: a change cutting SSH reverts, stops the play, spares host 2",
            bad_change(controller, &inventory, hosts, deb),
        );
    }
}

fn first_rollout(
    controller: &Controller,
    inventory: &Path,
    hosts: &[Vm; 2],
    deb: &Path,
) -> anyhow::Result<String> {
    let started = Instant::now();
    let output = controller.play(inventory, deb, "good.toml.j2", &[])?;
    ensure!(
        output.status.success(),
        "the first rollout failed:\n{}",
        text(&output)
    );
    for (index, vm) in hosts.iter().enumerate() {
        let [allowed, denied, _] = vm.forwards;
        ensure!(
            host_get(allowed),
            "host{}: :8080 is not answered",
            index + 1
        );
        ensure!(
            !host_get(denied),
            "host{}: :9000 is answered: the rules are not enforced",
            index + 1
        );
    }
    Ok(format!(
        "installed, tried, reached again and confirmed on host1 then host2 in {:.0} s; :8080 answered, :9000 denied on both",
        started.elapsed().as_secs_f64()
    ))
}

fn bad_change(
    controller: &Controller,
    inventory: &Path,
    hosts: &mut [Vm; 2],
    deb: &Path,
) -> anyhow::Result<String> {
    let timeout = format!("filter_agent_try_timeout={TRY_TIMEOUT}");
    let reconnect = format!("filter_agent_reconnect_timeout={RECONNECT_TIMEOUT}");
    // Forced past the live-session check, which would refuse it (the
    // controller's own session is established): the revert is the test.
    let extra = [
        timeout.as_str(),
        reconnect.as_str(),
        "filter_agent_force=true",
    ];
    let started = Instant::now();
    let output = controller.play(inventory, deb, "bad.toml.j2", &extra)?;
    let said = text(&output);
    ensure!(
        !output.status.success(),
        "the play that cuts SSH succeeded:\n{said}"
    );
    // host1 fails after `try`: reaching it again times out, or (when one
    // attempt outlasts the trial) it is reached after the revert and the
    // confirm finds nothing on trial. Either way nothing was confirmed.
    let failed_task = said
        .split("TASK [")
        .find(|task| task.contains("fatal: [host1]"))
        .unwrap_or_default();
    let reverted_first =
        failed_task.contains("Confirm the new rules") && failed_task.contains("nothing to confirm");
    ensure!(
        failed_task.contains("Reach the host again") || reverted_first,
        "the play did not fail at host1 after the try:\n{said}"
    );
    ensure!(
        !said.contains("[host2]"),
        "the play went on to host2:\n{said}"
    );
    // Host 1 comes back by itself at the trial's deadline.
    let deadline = Duration::from_secs(TRY_TIMEOUT * 3);
    let back = wait_for_ssh(hosts[0].forwards[2], deadline)
        .with_context(|| format!("host1 never answered SSH again after the bad change:\n{said}"))?;
    let seconds = back.duration_since(started).as_secs_f64();
    ensure!(
        !host_get(hosts[0].forwards[1]),
        "host1 reverted, but :9000 is still open"
    );
    ensure!(
        ssh_answers(hosts[1].forwards[2]),
        "host2 does not answer SSH"
    );
    ensure!(
        !host_get(hosts[1].forwards[1]),
        "host2's :9000 is open: the bad rules reached it"
    );
    for (index, host) in hosts.iter_mut().enumerate() {
        let kept = host.ok("grep -c 'dport = 22' /etc/filter-agent/rules.toml")?;
        ensure!(kept.trim() == "1", "host{}'s rules file changed", index + 1);
    }
    let failed_at = if reverted_first {
        "the confirm (reached only after the revert)"
    } else {
        "reaching it again"
    };
    Ok(format!(
        "play failed at host1, at {failed_at} (reconnect {RECONNECT_TIMEOUT} s); host1 answered SSH again {seconds:.0} s after the play started \
         (trial {TRY_TIMEOUT} s) with :9000 closed again; host2 never reached, old rules in force"
    ))
}

/// Waits until `port` on 127.0.0.1 answers with an SSH banner; when.
fn wait_for_ssh(port: u16, deadline: Duration) -> anyhow::Result<Instant> {
    let end = Instant::now() + deadline;
    loop {
        if ssh_answers(port) {
            return Ok(Instant::now());
        }
        ensure!(
            Instant::now() < end,
            "no SSH banner on :{port} within {deadline:?}"
        );
    }
}

/// Whether `port` on 127.0.0.1 greets with `SSH-` within a few seconds.
fn ssh_answers(port: u16) -> bool {
    let timeout = Duration::from_secs(3);
    let Ok(mut stream) = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), timeout)
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let mut banner = [0u8; 4];
    stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-"
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
