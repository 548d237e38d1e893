//! Command-line interface (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{agent::Settings, commands, kernel::loader::AttachMode, rules::upstream};

#[derive(Debug, Parser)]
#[command(
    name = "filter-agent",
    version,
    about = "Stateless XDP packet filter and ephemeral-port guard",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a rules file and exit: 0 if it is valid, 1 if not.
    Check {
        /// The rules file (TOML).
        #[arg(long)]
        rules: PathBuf,
        /// Also run this host's established TCP sessions through the rules
        /// (the real program) and fail naming each one they would cut.
        #[arg(long)]
        live: bool,
    },
    /// Run packets through the real XDP program (BPF_PROG_TEST_RUN, nothing
    /// attached) and print each verdict and the rule that decided it.
    #[command(group(clap::ArgGroup::new("decider").required(true).args(["rules", "upstream"])))]
    Test {
        #[command(flatten)]
        source: Source,
        /// Which way the packets cross the upstream ACL.
        #[arg(long, value_enum, default_value_t = DirectionArg::Ingress)]
        direction: DirectionArg,
        /// e.g. "tcp 203.0.113.5:443 -> 10.0.0.11:51000 flags SA",
        /// "udp [2001:db8::1]:53 -> [2001:db8::2]:40000 vlan 7",
        /// "icmp 192.0.2.1 -> 192.0.2.2 type 3 code 4". Repeatable.
        #[arg(long, required = true)]
        packet: Vec<String>,
    },
    /// Run every packet of a pcap/pcapng capture (Ethernet) through the real
    /// XDP program and print per-rule hits and a verdict summary.
    Replay {
        /// The rules file (TOML).
        #[arg(long)]
        rules: PathBuf,
        /// The capture file.
        #[arg(long)]
        pcap: PathBuf,
        /// One JSON object per packet instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Show the ephemeral-port guard's counters and the local ports and
    /// peers of out-of-range traffic, from the maps the agent pinned.
    Guard {
        /// Only this interface (default: every interface with an agent).
        #[arg(long)]
        iface: Option<String>,
        /// How many ports and peers to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show per-rule and per-reason counters from the pinned maps (works
    /// while the agent is down).
    Stats {
        /// Only these interfaces (default: every interface with a filter).
        #[arg(long)]
        iface: Vec<String>,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Print again every SECONDS with per-second rates, until interrupted.
        #[arg(long, value_name = "SECONDS")]
        watch: Option<u64>,
    },
    /// Print the running agent's sampled drop and guard events as they
    /// happen, one line each.
    Watch {
        /// Only these interfaces (default: every interface with an agent).
        #[arg(long)]
        iface: Vec<String>,
    },
    /// Apply new rules to the running agent for a trial: they are in force
    /// on every interface it filters until the deadline, then the previous
    /// rules come back unless `filter-agent confirm` keeps them. The rules
    /// file is not changed until then.
    Try {
        /// The new rules file (it must pass `check`).
        #[arg(long)]
        rules: PathBuf,
        /// Seconds until the previous rules come back.
        #[arg(long, value_name = "SECONDS", default_value_t = crate::control::DEFAULT_TIMEOUT_SECONDS,
              value_parser = clap::value_parser!(u64).range(1..=86_400))]
        timeout: u64,
        /// Apply the rules even if they would cut established TCP sessions
        /// (without it, `try` refuses and names each one).
        #[arg(long)]
        force: bool,
        /// The running agent's control socket.
        #[arg(long, value_name = "PATH", default_value = crate::control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
    },
    /// Keep the rules on trial: the agent's rules file then holds them
    /// (written atomically), so that a restart or reboot keeps them too.
    Confirm {
        /// The running agent's control socket.
        #[arg(long, value_name = "PATH", default_value = crate::control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
    },
    /// Remove the filter and everything pinned for it from an interface
    /// (refused while an agent runs for it).
    Detach {
        #[arg(long, required = true)]
        iface: Vec<String>,
    },
    /// Turn a cloud provider's stateless ACL (as its API prints it) into a
    /// rules file for one direction that means exactly what the ACL means.
    Import {
        #[command(flatten)]
        acl: AclFile,
        /// Write the rules file here instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// List every network namespace with its ephemeral port range and NAT
    /// rules, and flag those that do not fit the guard's range (or, with
    /// --upstream, that a cloud ACL would cut off). Exit 1 if any is flagged.
    Audit {
        #[command(flatten)]
        source: Source,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Where verdicts come from: the rules file (`--rules`) or a cloud ACL
/// (`--upstream`), never both.
#[derive(Debug, Args)]
pub struct Source {
    /// The rules file (TOML).
    #[arg(long, conflicts_with = "upstream")]
    pub rules: Option<PathBuf>,
    /// A cloud provider's ACL (JSON, as its API prints it) instead.
    #[arg(long, requires = "upstream_format")]
    pub upstream: Option<PathBuf>,
    /// The upstream ACL's format.
    #[arg(long, value_enum, requires = "upstream")]
    pub upstream_format: Option<FormatArg>,
    /// Which ACL of the upstream file (an AWS NetworkAclId).
    #[arg(long, requires = "upstream")]
    pub acl: Option<String>,
}

impl Source {
    /// What decides: the ACL when `--upstream` names one.
    pub fn decider(&self, direction: DirectionArg) -> commands::Decider<'_> {
        match (&self.upstream, self.upstream_format) {
            (Some(file), Some(format)) => commands::Decider::Upstream(commands::Upstream {
                file,
                format: format.into(),
                acl: self.acl.as_deref(),
                direction: direction.into(),
            }),
            _ => commands::Decider::Rules(self.rules.as_deref()),
        }
    }
}

/// The ACL `import` reads, and the direction it turns into rules.
#[derive(Debug, Args)]
pub struct AclFile {
    /// The ACL's format.
    #[arg(long, value_enum)]
    pub format: FormatArg,
    /// Which ACL, when the file holds several (an AWS NetworkAclId).
    #[arg(long)]
    pub acl: Option<String>,
    /// The packets whose entries are turned into rules.
    #[arg(long, value_enum, default_value_t = DirectionArg::Ingress)]
    pub direction: DirectionArg,
    /// The ACL file (JSON).
    pub file: PathBuf,
}

impl AclFile {
    pub fn upstream(&self) -> commands::Upstream<'_> {
        commands::Upstream {
            file: &self.file,
            format: self.format.into(),
            acl: self.acl.as_deref(),
            direction: self.direction.into(),
        }
    }
}

/// `--upstream-format` and `import --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// `aws ec2 describe-network-acls` output.
    AwsNacl,
    /// An IBM Cloud VPC network ACL (`GET /v1/network_acls/{id}`, or its
    /// `/rules`).
    IbmVpc,
    /// A Sakura Cloud packet filter (`GET /packetfilter/{id}`).
    Sakura,
}

impl From<FormatArg> for upstream::Format {
    fn from(format: FormatArg) -> Self {
        match format {
            FormatArg::AwsNacl => upstream::Format::AwsNacl,
            FormatArg::IbmVpc => upstream::Format::IbmVpc,
            FormatArg::Sakura => upstream::Format::Sakura,
        }
    }
}

/// `--direction`: which packets an upstream entry judges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DirectionArg {
    /// Packets arriving at the host.
    Ingress,
    /// Packets leaving it.
    Egress,
}

impl From<DirectionArg> for upstream::Direction {
    fn from(direction: DirectionArg) -> Self {
        match direction {
            DirectionArg::Ingress => upstream::Direction::Ingress,
            DirectionArg::Egress => upstream::Direction::Egress,
        }
    }
}
/// Running the filter: the default when no subcommand is given.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Network interface to filter; repeat, or separate with commas, for
    /// several: each gets its own attachment.
    #[arg(long, required = true, value_delimiter = ',', value_parser = interface_name)]
    pub iface: Vec<String>,
    /// The rules file (TOML).
    #[arg(long, required = true)]
    pub rules: Option<PathBuf>,
    /// Wait up to SECONDS for an interface that does not exist yet (at
    /// boot, a NIC's driver may create it after the agent started); 0 fails
    /// at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub iface_timeout: u64,
    /// How to attach: `native` runs in the driver (fastest), `skb` is the
    /// generic mode every interface supports, `auto` tries native first.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    /// Serve Prometheus metrics at http://ADDR/metrics (and /healthz).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9469")]
    pub metrics: std::net::SocketAddr,
    /// Label audit findings in /metrics by namespace inode only, without
    /// the pid and command name of a process in it: any local user can
    /// read a port on 127.0.0.1.
    #[arg(long)]
    pub metrics_hide_processes: bool,
    /// Drop and guard events sent to the agent (and `filter-agent watch`)
    /// per second and CPU, sampled in the kernel; 0 turns them off.
    #[arg(long, value_name = "N", default_value_t = filter_common::event::DEFAULT_RATE)]
    pub events_per_second: u32,
    /// Remove the filter when the agent stops. By default it stays in
    /// place (fail-static) and the next start takes it over without a gap.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Where the agent takes `filter-agent try` and `confirm` (if another
    /// agent already serves it, this one takes none).
    #[arg(long, value_name = "PATH", default_value = crate::control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
    /// How log lines are written: `text` for people, `json` (one object
    /// per line) for log shippers.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The daemon's settings (clap requires --iface and --rules here).
    pub fn settings(self) -> anyhow::Result<Settings> {
        Ok(Settings {
            rules: self
                .rules
                .ok_or_else(|| anyhow::anyhow!("--rules is required"))?,
            iface: self.iface,
            iface_timeout: self.iface_timeout,
            xdp_mode: self.xdp_mode.into(),
            metrics: self.metrics,
            metrics_hide_processes: self.metrics_hide_processes,
            events_per_second: self.events_per_second,
            detach_on_exit: self.detach_on_exit,
            control_socket: self.control_socket,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    Auto,
    Native,
    Skb,
}

impl From<XdpModeArg> for AttachMode {
    fn from(mode: XdpModeArg) -> Self {
        match mode {
            XdpModeArg::Auto => AttachMode::Auto,
            XdpModeArg::Native => AttachMode::Native,
            XdpModeArg::Skb => AttachMode::Skb,
        }
    }
}

/// An interface name: not empty (an unset variable in a service's command
/// line is the usual cause).
fn interface_name(name: &str) -> Result<String, String> {
    if name.trim().is_empty() {
        return Err(
            "an interface name is needed (the Debian package's service reads them \
                    from FILTER_AGENT_IFACES in /etc/default/filter-agent)"
                .to_owned(),
        );
    }
    Ok(name.to_owned())
}

/// A failure as one line, with its causes: paths and values from the
/// command line and from files may hold control characters, escaped here.
pub fn one_line_failure(err: &anyhow::Error) -> String {
    crate::rules::quote::one_line(&format!("{err:#}"))
}

/// Folds clap's multi-line error report into one line.
pub fn one_line_error(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let message = rendered.split("\n\n").next().unwrap_or_default();
    let folded: Vec<&str> = message.lines().map(str::trim).collect();
    let folded = folded.join(" ");
    let folded = folded.strip_prefix("error: ").unwrap_or(&folded);
    format!("{folded} (see --help)")
}

/// Logs to standard error, at `RUST_LOG` or info: as text, coloured on
/// a terminal and without a timestamp of its own under journald (which
/// adds one), or as one JSON object per line.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::{EnvFilter, fmt, prelude::*};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = fmt::layer().with_writer(std::io::stderr).with_target(false);
    // systemd sets JOURNAL_STREAM when standard error goes to the journal.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let layer = match format {
        LogFormat::Json => layer.json().flatten_event(true).boxed(),
        LogFormat::Text if journal => layer.with_ansi(false).without_time().boxed(),
        LogFormat::Text => layer.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    tracing_subscriber::registry()
        .with(layer)
        .with(filter)
        .init();
}
